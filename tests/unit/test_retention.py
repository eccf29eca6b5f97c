"""Retention removes old checkpoints and unused dataset versions, never what is still needed."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest

from visionpipe import retention, settings, tracking
from visionpipe.config import RetentionConfig

DAY = 86_400.0


def _run(flow_run_id: str, started_days_ago: float, *, finished: bool, dataset: str | None = None,
         size: int = 1000) -> Path:
    retention.mark_run_started(flow_run_id, dataset)
    folder = settings.stage_dir(flow_run_id, "finetune-resnet50")
    (folder / "last.pt").write_bytes(b"x" * size)
    if finished:
        retention.mark_run_finished(flow_run_id)
    marker = folder.parent / retention.RUN_MARKER
    data = json.loads(marker.read_text())
    marker.write_text(json.dumps({**data, "started": time.time() - started_days_ago * DAY}))
    return folder.parent


def _dataset(version: str, used_days_ago: float, name: str = "photos") -> Path:
    folder = settings.cache_dir("datasets") / name / version
    (folder / "decoded").mkdir(parents=True)
    pd.DataFrame({"path": ["a.png"], "label": [0], "split": ["train"]}).to_parquet(
        folder / "manifest.parquet")
    (folder / "decoded" / "train.pt").write_bytes(b"y" * 5000)
    used = time.time() - used_days_ago * DAY
    (folder / retention.USED_MARKER).write_text(f"{used}\n")
    os.utime(folder / "manifest.parquet", (used, used))
    return folder


def _champion_on(version: str) -> None:
    """A registered model version, tagged with its dataset version, holding the alias."""
    client = tracking.client()
    client.create_registered_model("photos-classifier")
    model = client.create_model_version("photos-classifier", source=str(settings.visionpipe_home()),
                                        tags={"dataset_version": version})
    client.set_registered_model_alias("photos-classifier", "champion", model.version)


def test_retention_keeps_what_runs_in_progress_and_champions_need(vp_home: Path) -> None:
    old_done = _run("run-old", 10, finished=True, dataset="v-old-run")
    recent_done = _run("run-recent", 2, finished=True, dataset="v-recent")
    # Started before both and still running (a retried nightly resuming from its checkpoints).
    in_progress = _run("run-in-progress", 20 / 24, finished=False, dataset="v-running")
    abandoned = _run("run-killed", 5, finished=False)  # never finished, days ago
    newest = _dataset("v-newest", 0)
    champion = _dataset("v-champion", 90)
    running_data = _dataset("v-running", 60)
    recent_data = _dataset("v-recent", 40)
    stale = _dataset("v-stale", 45)
    used = _dataset("v-used", 3)
    _champion_on("v-champion")
    cfg = RetentionConfig(keep_flow_runs=1, dataset_max_age_days=30, abandoned_after_hours=48)

    dry = retention.apply_retention(cfg, dry_run=True)
    removed = {Path(r.path) for r in dry.removed}
    assert removed == {old_done, abandoned, stale}
    assert all(path.exists() for path in removed), "a dry run removes nothing"
    kept = {Path(p): why for p, why in dry.kept.items()}
    assert kept[in_progress] == "in progress" and kept[recent_done] == "one of the newest 1"
    assert "photos-classifier@champion" in kept[champion]
    assert kept[running_data] == "the dataset of flow run run-in-progress"
    assert kept[recent_data] == "the dataset of flow run run-recent"
    assert kept[newest] == "the newest version of its dataset" and "within 30" in kept[used]

    report = retention.apply_retention(cfg)
    assert {Path(r.path) for r in report.removed} == removed and report.freed_bytes >= 7000
    assert not any(path.exists() for path in removed)
    for path in (in_progress, recent_done, newest, champion, running_data, recent_data, used):
        assert path.exists(), path
    assert (in_progress / "finetune-resnet50" / "last.pt").is_file(), "a resumable run's checkpoint"


def test_a_registry_that_does_not_answer_removes_no_dataset(vp_home: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    stale = _dataset("v-stale", 45)
    _dataset("v-newest", 0)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    with pytest.raises(Exception, match="127.0.0.1:9"):
        retention.apply_retention(RetentionConfig())
    assert stale.exists()


def test_the_command_lists_without_removing_on_a_dry_run(vp_home: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    old = _run("run-old", 10, finished=True)
    _run("run-new", 1, finished=True)
    assert retention.main(["--dry-run", "--keep-flow-runs", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("would remove 1 folder(s)") and str(old) in out and old.exists()
    assert retention.main(["--keep-flow-runs", "1"]) == 0
    assert capsys.readouterr().out.startswith("removed 1 folder(s)") and not old.exists()
