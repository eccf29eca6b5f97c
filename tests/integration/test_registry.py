"""Registration, the champion gate and a consumer in a fresh process, on MLflow over SQLite."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException

from visionpipe import registry, settings, tracking
from visionpipe.config import DataConfig, FinetuneConfig, Phase
from visionpipe.data import PreparedDataset, prepare_dataset
from visionpipe.digests import file_sha256
from visionpipe.evaluation import evaluate_checkpoint
from visionpipe.models import ModelSpec, build_resnet
from visionpipe.training.checkpoint import save_checkpoint
from visionpipe.training.finetune import finetune

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PreparedDataset, Path, Path]:
    """A briefly trained resnet18 and an untrained one on the same tiny digits split."""
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("VISIONPIPE_HOME", str(home))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    dataset = prepare_dataset(DataConfig(max_per_class=15))
    torch.manual_seed(0)
    weights = home / "w.pth"
    torch.save(build_resnet("resnet18", 1000).state_dict(), weights)
    cfg = FinetuneConfig(arch="resnet18", batch_size=16,
                         phases=[Phase(name="full", trainable=["*"], epochs=4, lr=2e-3)])
    good = Path(finetune(cfg, dataset, weights, home / "good", random_init=True).best_checkpoint)
    spec = ModelSpec(arch="resnet18", num_classes=10, class_names=dataset.class_names, image_size=32)
    bad = home / "bad" / "best.pt"
    torch.manual_seed(3)
    save_checkpoint({"model": build_resnet("resnet18", 10).state_dict(), "spec": spec.model_dump_json()}, bad)
    yield home, dataset, good, bad
    mp.undo()


def _register(name: str, checkpoint: Path, dataset: PreparedDataset, work: Path,
              model: str = "digits-test", times: int = 1) -> registry.Registration:
    """Log ``checkpoint`` in a new run and register it ``times`` times (a retried task)."""
    experiment = tracking.ensure_experiment("test")
    run_id = tracking.start_run(experiment, name)
    uri = registry.log_pyfunc_model(run_id, checkpoint, work / name, dataset)
    # The lineage register-model gives a fine-tuned candidate: what its training started from.
    tags = registry.version_tags({"arch": "resnet18", "weights_source": "random-init",
                                  "weights_sha256": "0" * 64}, work / name)
    versions = {registry.register_version(name, model, uri, run_id, tags).version
                for _ in range(times)}
    assert len(versions) == 1, f"a retried registration created versions {versions}"
    return registry.register_version(name, model, uri, run_id, tags)


def _champion(trained: tuple[Path, PreparedDataset, Path, Path], monkeypatch: pytest.MonkeyPatch,
              work: Path, name: str, model: str) -> tuple[PreparedDataset, registry.Registration]:
    """The briefly trained model, registered under ``model`` and promoted to its champion."""
    home, dataset, good, _ = trained
    monkeypatch.setenv("VISIONPIPE_HOME", str(home))
    version = _register(name, good, dataset, work, model=model)
    assert registry.gate_champion(version, dataset, "top1", "champion").promoted
    return dataset, version


def test_the_champion_is_the_starting_weights_of_a_next_fine_tune(
    trained: tuple[Path, PreparedDataset, Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from visionpipe.config import WeightsConfig
    from visionpipe.weights import fetch_weights

    dataset, version = _champion(trained, monkeypatch, tmp_path, "next", "digits-start")
    tags = tracking.client().get_model_version("digits-start", version.version).tags
    assert tags["init_weights_sha256"] == "0" * 64 and tags["init_weights_source"] == "random-init"
    fetched = fetch_weights(WeightsConfig(uri="models:/digits-start@champion"), "resnet18")
    assert fetched.sha256 == tags["weights_sha256"] == file_sha256(tmp_path / "next" / "state_dict.pt")
    cfg = FinetuneConfig(arch="resnet18", batch_size=16,
                         phases=[Phase(name="head", trainable=["fc"], epochs=1, lr=0.01)])
    result = finetune(cfg, dataset, Path(fetched.path), tmp_path / "again", weights_sha256=fetched.sha256)
    assert result.best_val_top1 > 0.5, "the head on the champion's backbone, not a random one"


def test_gate_promotes_first_and_better_and_keeps_champion_against_worse(
    trained: tuple[Path, PreparedDataset, Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    home, dataset, good, bad = trained
    monkeypatch.setenv("VISIONPIPE_HOME", str(home))
    first = _register("bad-1", bad, dataset, tmp_path)
    decision = registry.gate_champion(first, dataset, "top1", "champion")
    assert decision.promoted and decision.champion_version is None
    better = _register("good", good, dataset, tmp_path)
    decision = registry.gate_champion(better, dataset, "top1", "champion")
    assert decision.promoted and decision.champion_version == first.version
    assert decision.candidate_score > decision.champion_score  # type: ignore[operator]
    retried = registry.gate_champion(better, dataset, "top1", "champion")  # a retried task
    assert retried.promoted and retried.champion_version == first.version
    worse = _register("bad-2", bad, dataset, tmp_path)
    decision = registry.gate_champion(worse, dataset, "top1", "champion")
    assert not decision.promoted and "does not beat" in decision.reason
    assert registry.champion_version("digits-test", "champion") == better.version
    mv = tracking.client().get_model_version("digits-test", worse.version)
    assert mv.tags["gate_decision"] == "kept_champion"
    assert float(mv.tags["gate_champion_score"]) == pytest.approx(decision.champion_score)
    promoted = tracking.client().get_model_version("digits-test", better.version)
    assert promoted.tags["previous_champion"] == first.version
    # The documented way back: python -m visionpipe.registry rollback <model>
    assert registry.main(["rollback", "digits-test"]) == 0
    assert registry.champion_version("digits-test", "champion") == first.version


def test_a_retried_registration_reuses_its_version(
    trained: tuple[Path, PreparedDataset, Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    home, dataset, good, _ = trained
    monkeypatch.setenv("VISIONPIPE_HOME", str(home))
    _register("retry", good, dataset, tmp_path, model="digits-retry", times=3)
    assert len(tracking.client().search_model_versions("name='digits-retry'")) == 1


def test_champion_is_none_only_when_mlflow_says_the_model_or_alias_does_not_exist(vp_home: Path) -> None:
    assert registry.champion_version("digits-none", "champion") is None  # no registered model
    tracking.client().create_registered_model("digits-none")
    assert registry.champion_version("digits-none", "champion") is None  # model without the alias


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_registry_is_a_failure_not_no_champion_nor_a_new_version(
    vp_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(MlflowException, match="API request to .* failed"):
        registry.champion_version("digits-down", "champion")
    with pytest.raises(MlflowException, match="could not check whether run r1 already has a "
                                              "version of digits-down.*registered nothing"):
        registry.register_version("c", "digits-down", "runs:/r1/model", "r1", {})


def test_a_broken_registry_stops_the_gate_before_it_tags_or_moves_the_alias(
    trained: tuple[Path, PreparedDataset, Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _, dataset, _, bad = trained
    home = tmp_path / "home"
    monkeypatch.setenv("VISIONPIPE_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri exports it
    champion = _register("champion", bad, dataset, tmp_path, model="digits-broken")
    assert registry.gate_champion(champion, dataset, "top1", "champion").promoted
    # The same weights: a working gate ties and keeps the champion.
    registered = _register("tie", bad, dataset, tmp_path, model="digits-broken")
    # Score the candidate from a local copy, so that only the alias lookup meets the damage.
    candidate = registered.model_copy(update={"model_uri": download_artifacts(
        registered.model_uri, dst_path=str(tmp_path / "local"))})
    db = home / "mlflow.db"
    with sqlite3.connect(db) as con:  # a real database error: the alias table is gone
        con.execute("ALTER TABLE registered_model_aliases RENAME TO aliases_away")
    with pytest.raises(MlflowException, match="could not read alias 'champion' of digits-broken "
                                              "before comparing.*did not move 'champion'") as info:
        registry.gate_champion(candidate, dataset, "top1", "champion")
    assert info.value.error_code == "TEMPORARILY_UNAVAILABLE"
    assert "no such table" in str(info.value)
    with sqlite3.connect(db) as con:
        con.execute("ALTER TABLE aliases_away RENAME TO registered_model_aliases")
    assert registry.champion_version("digits-broken", "champion") == champion.version
    tags = tracking.client().get_model_version("digits-broken", registered.version).tags
    assert not {k for k in tags if k.startswith("gate_") or k == "previous_champion"}, tags


CONSUMER = """
import json, sys, mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/digits-consumer@champion")
images = [open(p, "rb").read() for p in json.loads(sys.argv[2])]
out = model.predict(pd.DataFrame({"image": images}))
print(json.dumps({"columns": list(out.columns), "labels": out["label"].tolist(),
                  "probability": out["probability"].tolist(), "schema": str(model.metadata.signature)}))
"""


def test_consumer_in_a_fresh_process_loads_the_champion_and_predicts_raw_images(
    trained: tuple[Path, PreparedDataset, Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    dataset, _ = _champion(trained, monkeypatch, tmp_path, "consumer", "digits-consumer")
    manifest = pd.read_parquet(dataset.manifest_path)
    test = manifest[manifest["split"] == "test"].sort_values("path")
    paths = [str(Path(dataset.root) / p) for p in test["path"]]
    out = subprocess.run([sys.executable, "-c", CONSUMER, settings.tracking_uri(), json.dumps(paths)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["columns"] == ["label", "class_name", "probability"]
    assert "'image': binary" in answer["schema"]
    accuracy = (pd.Series(answer["labels"]) == test["label"].reset_index(drop=True)).mean()
    expected = evaluate_checkpoint("good", trained[2], dataset, 64, tmp_path / "eval").metrics["top1"]
    # The pyfunc applies the training preprocessing itself: same predictions as evaluation.
    assert accuracy == pytest.approx(expected)
    assert all(0.0 < p <= 1.0 for p in answer["probability"])
