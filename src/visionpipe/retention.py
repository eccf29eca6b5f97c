"""Retention: what the state folder may forget, so that a nightly schedule does not fill the disk.

Two kinds of folders grow with every run:

- ``runs/<flow-run-id>/``: each flow run's checkpoints (hundreds of MB per candidate). The
  newest ``keep_flow_runs`` of the runs that ended stay, and so does every run still in
  progress: a retried or resumed run needs its checkpoints. A run is in progress from ``mark_run_started``
  until ``mark_run_finished``; a run that never finished (its process was killed) counts as in
  progress for ``abandoned_after_hours``, the time Prefect's retries could still resume it.
- ``datasets/<name>/<version>/``: a dataset version's manifest, decoded splits and prepared
  copy. A version stays while it is the newest of its name, was used by a flow run within
  ``dataset_max_age_days`` (``mark_dataset_used``), is the dataset of a flow run that stays, or
  is the ``dataset_version`` of a registered model version that holds an alias (a champion).

Nothing else is touched: the weights cache, MLflow's database and artifacts (registered versions
keep their own copies of the weights), the materialised sources.

    python -m visionpipe.retention --dry-run      # what would go, and how much
    python -m visionpipe.retention                # remove it
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel

from visionpipe import settings, tracking
from visionpipe.config import RetentionConfig

log = logging.getLogger(__name__)

RUN_MARKER = "flow-run.json"
USED_MARKER = "last-used"
DAY_S = 86_400.0


class Removal(BaseModel):
    path: str
    kind: str  # "flow-run" or "dataset-version"
    reason: str
    bytes: int


class RetentionReport(BaseModel):
    dry_run: bool
    removed: list[Removal]
    kept: dict[str, str]  # path -> why it stays

    @property
    def freed_bytes(self) -> int:
        return sum(r.bytes for r in self.removed)

    def render(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        lines = [f"{verb} {len(self.removed)} folder(s), {self.freed_bytes / 2**20:.1f} MiB"]
        lines += [f"  - {r.path} ({r.kind}: {r.reason})" for r in self.removed]
        lines += [f"kept {len(self.kept)}:"] + [f"  + {p} ({why})" for p, why in self.kept.items()]
        return "\n".join(lines)


def mark_run_started(flow_run_id: str, dataset_version: str | None = None) -> None:
    """Record that a flow run is in progress (and which dataset version it trains on)."""
    marker = _read_marker(settings.cache_dir("runs") / flow_run_id)  # a retry keeps its start
    _write_marker(flow_run_id, {"started": time.time(), **marker, "state": "running",
                                "dataset": dataset_version or marker.get("dataset")})


def mark_run_finished(flow_run_id: str) -> None:
    """Record that a flow run ended: from now on only ``keep_flow_runs`` protects it."""
    marker = _read_marker(settings.cache_dir("runs") / flow_run_id)
    _write_marker(flow_run_id, {**marker, "state": "finished", "finished": time.time()})


def mark_dataset_used(name: str, version: str) -> None:
    """Record that a flow run used this dataset version now."""
    folder = settings.cache_dir("datasets") / name / version
    if folder.is_dir():
        (folder / USED_MARKER).write_text(f"{time.time()}\n")


def _write_marker(flow_run_id: str, data: dict[str, object]) -> None:
    folder = settings.cache_dir("runs") / flow_run_id
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{RUN_MARKER}.tmp"
    tmp.write_text(json.dumps(data))
    tmp.replace(folder / RUN_MARKER)


def _read_marker(folder: Path) -> dict[str, object]:
    try:
        return dict(json.loads((folder / RUN_MARKER).read_text()))
    except (OSError, ValueError):
        return {}


def _started(folder: Path, marker: dict[str, object]) -> float:
    started = marker.get("started")
    return float(started) if isinstance(started, (int, float)) else folder.stat().st_mtime


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def plan(cfg: RetentionConfig) -> tuple[list[Removal], dict[str, str]]:
    """What retention would remove under ``cfg``, and what it keeps and why."""
    now = time.time()
    removals: list[Removal] = []
    kept: dict[str, str] = {}
    kept_datasets: dict[str, str] = {}
    runs = [(f, _read_marker(f)) for f in settings.cache_dir("runs").iterdir() if f.is_dir()]
    runs.sort(key=lambda run: _started(*run), reverse=True)
    ended = 0  # flow runs not in progress, newest first: the first keep_flow_runs stay
    for folder, marker in runs:
        age_h = (now - _started(folder, marker)) / 3600
        running = marker.get("state") == "running" and age_h < cfg.abandoned_after_hours
        ended += not running
        if running or ended <= cfg.keep_flow_runs:
            kept[str(folder)] = "in progress" if running else f"one of the newest {cfg.keep_flow_runs}"
            if isinstance(marker.get("dataset"), str):
                kept_datasets[str(marker["dataset"])] = f"the dataset of flow run {folder.name}"
            continue
        removals.append(Removal(path=str(folder), kind="flow-run", bytes=_size(folder),
                                reason=f"older than the newest {cfg.keep_flow_runs} flow runs "
                                f"and {'finished' if marker.get('state') == 'finished' else 'not in progress'}"))
    versions = _dataset_versions()
    if any(_dataset_unused(v, now, cfg) for v in versions):
        kept_datasets.update({key: why for key, why in champion_datasets().items()
                              if key not in kept_datasets})
    for name, group in _by_name(versions).items():
        newest = max(group, key=lambda v: _last_used(v))
        for version in group:
            key = version.name  # a content hash: the same key whatever the dataset's name
            if version == newest:
                kept[str(version)] = "the newest version of its dataset"
            elif key in kept_datasets:
                kept[str(version)] = kept_datasets[key]
            elif not _dataset_unused(version, now, cfg):
                kept[str(version)] = f"used within {cfg.dataset_max_age_days:g} days"
            else:
                removals.append(Removal(path=str(version), kind="dataset-version", bytes=_size(version),
                                        reason=f"not used for {cfg.dataset_max_age_days:g} days"))
    return removals, kept


def _dataset_versions() -> list[Path]:
    root = settings.cache_dir("datasets")
    return [v for n in root.iterdir() if n.is_dir() and not n.name.startswith("_")
            for v in n.iterdir() if v.is_dir() and (v / "manifest.parquet").is_file()]


def _by_name(versions: Iterable[Path]) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for version in versions:
        groups.setdefault(version.parent.name, []).append(version)
    return groups


def _last_used(version: Path) -> float:
    marker = version / USED_MARKER
    try:
        return float(marker.read_text().strip())
    except (OSError, ValueError):
        return (version / "manifest.parquet").stat().st_mtime


def _dataset_unused(version: Path, now: float, cfg: RetentionConfig) -> bool:
    return now - _last_used(version) > cfg.dataset_max_age_days * DAY_S


def champion_datasets() -> dict[str, str]:
    """The dataset version of every registered model version that holds an alias.

    Asked of MLflow only when a dataset version is old enough to go; a registry that does not
    answer raises, and then nothing is removed (a champion's dataset must never go by mistake).
    """
    mlflow_client = tracking.client()
    found: dict[str, str] = {}
    for model in mlflow_client.search_registered_models():
        for alias, version in (model.aliases or {}).items():
            tags = mlflow_client.get_model_version(model.name, version).tags
            if tags.get("dataset_version"):
                found[tags["dataset_version"]] = (f"the dataset of {model.name}@{alias} "
                                                  f"(version {version})")
    return found


def apply_retention(cfg: RetentionConfig, dry_run: bool = False) -> RetentionReport:
    """Remove what ``plan`` finds (nothing with ``dry_run``); return what went and what stayed."""
    removals, kept = plan(cfg)
    if not dry_run:
        for removal in removals:
            shutil.rmtree(removal.path, ignore_errors=True)
            log.info("retention removed %s (%s)", removal.path, removal.reason)
    return RetentionReport(dry_run=dry_run, removed=removals, kept=kept)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Remove old flow runs' checkpoints and unused "
                                     "dataset versions from VISIONPIPE_HOME.")
    parser.add_argument("--dry-run", action="store_true", help="list what would go; remove nothing")
    parser.add_argument("--keep-flow-runs", type=int, default=RetentionConfig().keep_flow_runs)
    parser.add_argument("--dataset-max-age-days", type=float,
                        default=RetentionConfig().dataset_max_age_days)
    args = parser.parse_args(argv)
    cfg = RetentionConfig(keep_flow_runs=args.keep_flow_runs,
                          dataset_max_age_days=args.dataset_max_age_days)
    print(apply_retention(cfg, dry_run=args.dry_run).render())
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv[1:]))
