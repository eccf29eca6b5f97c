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
from visionpipe.config import DataConfig, FinetuneConfig, Phase, RegistryConfig
from visionpipe.data import PreparedDataset, prepare_dataset
from visionpipe.digests import file_sha256
from visionpipe.evaluation import evaluate_checkpoint
from visionpipe.models import build_backbone
from visionpipe.training.finetune import finetune
from tests.checkpoints import untrained_checkpoint

pytestmark = pytest.mark.integration
# These tests register briefly trained or untrained models: no quality floor unless a test sets one.
NO_FLOOR = RegistryConfig(min_score=0)


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
    torch.save(build_backbone("resnet18", 1000).state_dict(), weights)
    cfg = FinetuneConfig(arch="resnet18", batch_size=16,
                         phases=[Phase(name="full", trainable=["*"], epochs=4, lr=2e-3)])
    good = Path(finetune(cfg, dataset, weights, home / "good", random_init=True).best_checkpoint)
    bad = untrained_checkpoint(home / "bad" / "best.pt", dataset, seed=3)
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
    assert registry.gate_champion(version, dataset, NO_FLOOR).promoted
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
    decision = registry.gate_champion(first, dataset, NO_FLOOR)
    assert decision.promoted and decision.champion_version is None
    better = _register("good", good, dataset, tmp_path)
    decision = registry.gate_champion(better, dataset, NO_FLOOR)
    assert decision.promoted and decision.champion_version == first.version
    assert decision.candidate_score > decision.champion_score  # type: ignore[operator]
    retried = registry.gate_champion(better, dataset, NO_FLOOR)  # a retried task
    assert retried.promoted and retried.champion_version == first.version
    worse = _register("bad-2", bad, dataset, tmp_path)
    decision = registry.gate_champion(worse, dataset, NO_FLOOR)
    assert not decision.promoted and "does not beat" in decision.reason and decision.rule == "tie"
    assert registry.champion_version("digits-test", "champion") == better.version
    mv = tracking.client().get_model_version("digits-test", worse.version)
    assert mv.tags["gate_decision"] == "kept_champion"
    assert float(mv.tags["gate_champion_score"]) == pytest.approx(decision.champion_score)
    promoted = tracking.client().get_model_version("digits-test", better.version)
    assert promoted.tags["previous_champion"] == first.version
    # The documented way back: python -m visionpipe.registry rollback <model>
    assert registry.main(["rollback", "digits-test"]) == 0
    assert registry.champion_version("digits-test", "champion") == first.version


def _with_manifest(dataset: PreparedDataset, folder: Path, class_names: list[str],
                   shift: int = 0) -> PreparedDataset:
    """``dataset``'s images under other class names: its manifest's labels moved by ``shift``
    (a class added in front of the sorted names renumbers every class after it)."""
    manifest = pd.read_parquet(dataset.manifest_path)
    manifest["label"] = manifest["label"] + shift
    folder.mkdir(parents=True, exist_ok=True)
    manifest.to_parquet(folder / "manifest.parquet")
    return dataset.model_copy(update={"class_names": class_names, "num_classes": len(class_names),
                                      "manifest_path": str(folder / "manifest.parquet")})


def test_the_gate_refuses_a_random_init_below_the_floor_or_within_the_margin(
    trained: tuple[Path, PreparedDataset, Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    home, dataset, good, bad = trained
    monkeypatch.setenv("VISIONPIPE_HOME", str(home))
    model = "digits-rules"
    good_score = registry.score_model(_register("probe", good, dataset, tmp_path, model="digits-probe")
                                      .model_uri, dataset, "top1")
    bad_score = registry.score_model(_register("probe-bad", bad, dataset, tmp_path,
                                               model="digits-probe").model_uri, dataset, "top1")
    assert good_score > max(bad_score, 0.5), (good_score, bad_score)
    # The first candidate, below an explicit floor: no champion at all.
    floor = RegistryConfig(min_score=(good_score + bad_score) / 2)
    low = registry.gate_champion(_register("low", bad, dataset, tmp_path, model=model), dataset, floor)
    assert not low.promoted and low.rule == "min_score" and "quality floor" in low.reason
    assert registry.champion_version(model, "champion") is None
    # A fine-tune trained from a random init for want of weights: refused unless allowed.
    fallback = _register("fallback", good, dataset, tmp_path, model=model)
    refused = registry.gate_champion(fallback, dataset, floor, random_init=True)
    assert not refused.promoted and refused.rule == "random_init"
    assert registry.champion_version(model, "champion") is None
    tags = tracking.client().get_model_version(model, fallback.version).tags
    assert tags["gate_rule"] == "random_init" and tags["gate_decision"] == "kept_champion"
    allowed = floor.model_copy(update={"promote_random_init": True})
    first = registry.gate_champion(_register("allowed", good, dataset, tmp_path, model=model),
                                   dataset, allowed, random_init=True)
    assert first.promoted and first.rule == "first"
    # Better, but not by more than the margin: the champion stays.
    margin = RegistryConfig(min_score=0, min_improvement=1.0)
    assert registry.gate_champion(_register("bad-first", bad, dataset, tmp_path, model="digits-margin"),
                                  dataset, margin).promoted
    within = registry.gate_champion(_register("better", good, dataset, tmp_path, model="digits-margin"),
                                    dataset, margin)
    assert not within.promoted and within.rule == "min_improvement"
    assert within.candidate_score > within.champion_score  # type: ignore[operator]


def test_a_champion_of_other_classes_is_replaced_or_compared_on_the_shared_ones(
    trained: tuple[Path, PreparedDataset, Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    home, dataset, good, bad = trained
    monkeypatch.setenv("VISIONPIPE_HOME", str(home))
    names = list(dataset.class_names)
    _champion(trained, monkeypatch, tmp_path, "old-classes", "digits-classes")
    good_score = registry.score_model("models:/digits-classes@champion", dataset, "top1")
    champion = registry.champion_version("digits-classes", "champion")
    # A class renamed: the default replaces the champion, which cannot predict the new name.
    renamed = _with_manifest(dataset, tmp_path / "renamed",
                             [n if n != "3" else "three" for n in names])
    candidate = _register("renamed", bad, dataset, tmp_path, model="digits-classes")
    decision = registry.gate_champion(candidate, renamed, RegistryConfig(min_score=0))
    assert decision.promoted and decision.rule == "class_change"
    assert "added today: ['three'], gone: ['3']" in decision.reason
    assert registry.main(["rollback", "digits-classes"]) == 0
    assert registry.champion_version("digits-classes", "champion") == champion
    # A class added in front: every label number moves by one. Compared on the shared classes
    # by name, the champion keeps the score it has on its own classes (by number it would be
    # wrong on nearly every image).
    added = _with_manifest(dataset, tmp_path / "added", ["0-new", *names], shift=1)
    shared = RegistryConfig(min_score=0, on_class_change="shared-classes")
    candidate = _register("added", bad, dataset, tmp_path, model="digits-classes")
    decision = registry.gate_champion(candidate, added, shared)
    assert not decision.promoted and decision.rule == "shared_classes"
    assert decision.champion_score == pytest.approx(good_score)
    assert "on the 10 shared classes" in decision.reason and "added today: ['0-new']" in decision.reason
    assert registry.champion_version("digits-classes", "champion") == champion


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
    assert registry.gate_champion(champion, dataset, NO_FLOOR).promoted
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
        registry.gate_champion(candidate, dataset, NO_FLOOR)
    assert info.value.error_code == "TEMPORARILY_UNAVAILABLE"
    assert "no such table" in str(info.value)
    with sqlite3.connect(db) as con:
        con.execute("ALTER TABLE aliases_away RENAME TO registered_model_aliases")
    assert registry.champion_version("digits-broken", "champion") == champion.version
    tags = tracking.client().get_model_version("digits-broken", registered.version).tags
    assert not {k for k in tags if k.startswith("gate_") or k == "previous_champion"}, tags


def test_a_callers_batch_size_reaches_predict_and_every_class_gets_a_probability(
    trained: tuple[Path, PreparedDataset, Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import logging

    import mlflow

    dataset, _ = _champion(trained, monkeypatch, tmp_path, "params", "digits-params")
    model = mlflow.pyfunc.load_model("models:/digits-params@champion")
    classifier = model.unwrap_python_model()
    sizes: list[int] = []
    scored = classifier._predict_batch
    monkeypatch.setattr(classifier, "_predict_batch", lambda images: sizes.append(len(images))
                        or scored(images))
    images, labels = registry.test_split_images(dataset, limit=15)
    caught: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: caught.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("mlflow").addHandler(handler)
    try:
        out = model.predict(pd.DataFrame({"image": images}), params={"batch_size": 7})
    finally:
        logging.getLogger("mlflow").removeHandler(handler)
    assert sizes == [7, 7, 1], "the caller's batch_size reached predict"
    assert not [m for m in caught if "params schema" in m or "Ignoring" in m], caught
    assert list(out.columns) == ["label", "class_name", "probability", "probabilities"]
    probabilities = torch.tensor([list(p) for p in out["probabilities"]])  # 15 x classes
    assert probabilities.shape == (15, dataset.num_classes)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(15, dtype=torch.float64))
    assert (probabilities.argmax(1) == torch.tensor(out["label"].tolist())).all()
    assert out["probability"].tolist() == pytest.approx(probabilities.max(1).values.tolist())
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        model.predict(pd.DataFrame({"image": images[:1]}), params={"batch_size": 0})


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
    assert answer["columns"] == ["label", "class_name", "probability", "probabilities"]
    assert "'image': binary" in answer["schema"]
    accuracy = (pd.Series(answer["labels"]) == test["label"].reset_index(drop=True)).mean()
    expected = evaluate_checkpoint("good", trained[2], dataset, 64, tmp_path / "eval").metrics["top1"]
    # The pyfunc applies the training preprocessing itself: same predictions as evaluation.
    assert accuracy == pytest.approx(expected)
    assert all(0.0 < p <= 1.0 for p in answer["probability"])
