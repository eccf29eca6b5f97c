"""Log candidates as pyfunc models, register them, and move the champion alias behind a gate."""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array
from pydantic import BaseModel
from sklearn.metrics import accuracy_score, f1_score

import visionpipe
from visionpipe import settings
from visionpipe.config import RegistryConfig
from visionpipe.data import PreparedDataset
from visionpipe.data.paths import confined_path
from visionpipe.digests import file_sha256
from visionpipe.serving import DEFAULT_BATCH_SIZE, ImageClassifier
from visionpipe.models import inference_weights
from visionpipe.tracking import client, configure_tracking, redact
from visionpipe.training.checkpoint import load_checkpoint
from visionpipe.weights.state_dict import RANDOM_INIT

log = logging.getLogger(__name__)

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.binary, "image")]),
    outputs=Schema([ColSpec(DataType.long, "label"), ColSpec(DataType.string, "class_name"),
                    ColSpec(DataType.double, "probability"),
                    ColSpec(Array(DataType.double), "probabilities")]),
    # Declared, so MLflow passes a caller's params={"batch_size": n} on to predict.
    params=ParamSchema([ParamSpec("batch_size", DataType.long, DEFAULT_BATCH_SIZE)]),
)
SCORE_BATCH = 256  # test images read, decoded and scored at a time when the gate re-scores
# What a consumer's environment needs to rebuild the model; the visionpipe code travels with it.
_REQUIREMENTS = ("torch", "torchvision", "pillow", "numpy", "pandas", "pydantic", "mlflow",
                 "scikit-learn", "pyarrow", "boto3")


# What MLflow answers when there is nothing to find (SQLAlchemy and file stores; a tracking server
# sends the same codes, as HTTP 404 and 400). Checked against MLflow 3.17:
# - no such registered model: RESOURCE_DOES_NOT_EXIST (SqlAlchemyStore._get_registered_model);
# - no such alias on an existing model: INVALID_PARAMETER_VALUE ("Registered model alias ... not
#   found", SqlAlchemyStore.get_model_version_by_alias) -- the code MLflow also uses for invalid
#   arguments, so champion_version confirms it on the registered model before answering None.
# Anything else (TEMPORARILY_UNAVAILABLE for a locked or broken database, INTERNAL_ERROR for an
# unreachable server, PERMISSION_DENIED, 5xx...) is a failure, not an answer.
_NO_SUCH_MODEL = ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)
_NO_SUCH_ALIAS = ErrorCode.Name(INVALID_PARAMETER_VALUE)


class RegistryError(MlflowException):
    """A registry call failed; the message says what, and what was (not) changed. Keeps MLflow's
    error code, so callers can still tell a transient failure from a permanent one."""

    def __init__(self, message: str, cause: MlflowException) -> None:
        super().__init__(message, error_code=ErrorCode.Value(cause.error_code))


def _describe(exc: MlflowException) -> str:
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return redact(f"{exc.error_code}: {first}")


class Registration(BaseModel):
    candidate: str
    model_name: str
    version: str
    model_uri: str
    run_id: str


class GateDecision(BaseModel):
    """Whether the alias moved, with both scores on today's test split."""

    promoted: bool
    metric: str
    candidate: str
    candidate_version: str
    candidate_score: float
    champion_version: str | None
    champion_score: float | None
    reason: str
    # Which rule decided: first, beats, tie, min_improvement, min_score, random_init,
    # class_change (replace), shared_classes.
    rule: str = ""


def pip_requirements() -> list[str]:
    reqs = []
    for name in _REQUIREMENTS:
        try:
            reqs.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def export_inference_files(checkpoint: Path, out_dir: Path) -> dict[str, str]:
    """The state dict without auxiliary heads and the model spec, as the pyfunc's artifacts."""
    state = load_checkpoint(checkpoint)
    weights = inference_weights(state["model"])
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(weights, out_dir / "state_dict.pt")
    (out_dir / "spec.json").write_text(state["spec"])
    return {"state_dict": str(out_dir / "state_dict.pt"), "spec": str(out_dir / "spec.json")}


def _test_rows(dataset: PreparedDataset) -> pd.DataFrame:
    manifest = pd.read_parquet(dataset.manifest_path)
    return manifest[manifest["split"] == "test"].sort_values("path")


def test_split_images(dataset: PreparedDataset, limit: int | None = None) -> tuple[list[bytes], list[int]]:
    """Encoded bytes and labels of the test split, read from the dataset's files."""
    test = _test_rows(dataset)
    if limit is not None:
        test = test.head(limit)
    root = Path(dataset.root)
    return ([confined_path(root, p).read_bytes() for p in test["path"]],
            test["label"].astype(int).tolist())


def first_test_image(dataset: PreparedDataset) -> str | None:
    """The path of the test split's first image: one a consumer can score after a run."""
    test = _test_rows(dataset)
    return str(confined_path(Path(dataset.root), test["path"].iloc[0])) if len(test) else None


def test_split_chunks(dataset: PreparedDataset, size: int) -> Iterator[tuple[list[bytes], list[int]]]:
    """The test split's encoded bytes and labels, ``size`` images at a time (read as needed)."""
    test, root = _test_rows(dataset), Path(dataset.root)
    for start in range(0, len(test), size):
        chunk = test.iloc[start:start + size]
        yield ([confined_path(root, p).read_bytes() for p in chunk["path"]],
               chunk["label"].astype(int).tolist())


def log_pyfunc_model(run_id: str, checkpoint: Path, work_dir: Path, dataset: PreparedDataset) -> str:
    """Log the candidate as an MLflow pyfunc in its run; return the logged model's URI."""
    configure_tracking()
    artifacts = export_inference_files(checkpoint, work_dir)
    example_images, _ = test_split_images(dataset, limit=2)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=ImageClassifier(), artifacts=artifacts,
            code_paths=[str(Path(visionpipe.__file__).parent)], signature=SIGNATURE,
            input_example=pd.DataFrame({"image": example_images}),
            pip_requirements=pip_requirements(),
        )
    return str(info.model_uri)


def version_tags(lineage: dict[str, str], export_dir: Path) -> dict[str, str]:
    """A model version's tags: its lineage and the digest of its own weights.

    ``weights_sha256`` is the sha256 of the version's ``state_dict.pt`` (in ``export_dir``, as
    :func:`log_pyfunc_model` wrote it): a later run that starts from this version
    (``weights.uri: models:/<name>@champion``) verifies its download against it. The lineage's
    ``weights_*`` entries, what the candidate's training started from, become ``init_weights_*``.
    """
    tags = {(f"init_{key}" if key.startswith("weights_") else key): value
            for key, value in lineage.items()}
    tags["weights_sha256"] = file_sha256(export_dir / "state_dict.pt")
    return tags


def register_version(candidate: str, model_name: str, model_uri: str, run_id: str,
                     tags: dict[str, str]) -> Registration:
    """A model version for ``run_id``: the existing one if a retry already created it."""
    mlflow_client = client()
    try:
        existing = mlflow_client.search_model_versions(f"name='{model_name}' and run_id='{run_id}'")
    except MlflowException as exc:
        if exc.error_code != _NO_SUCH_MODEL:
            raise RegistryError(
                f"could not check whether run {run_id} already has a version of {model_name} in "
                f"the MLflow registry at {redact(settings.tracking_uri())} ({_describe(exc)}); "
                "registered nothing, so that a retry cannot create a duplicate version", exc) from exc
        existing = []
    if existing:
        mv = existing[0]
        log.info("version %s of %s already holds run %s; reusing it", mv.version, model_name, run_id)
    else:
        mv = mlflow.register_model(model_uri, model_name, tags={k: redact(v) for k, v in tags.items()})
    return Registration(candidate=candidate, model_name=model_name, version=str(mv.version),
                        model_uri=f"models:/{model_name}/{mv.version}", run_id=run_id)


def model_class_names(model: mlflow.pyfunc.PyFuncModel) -> list[str] | None:
    """The classes a registered model predicts (its ``ModelSpec``); None for a foreign model."""
    try:
        spec = model.unwrap_python_model().spec
    except (AttributeError, MlflowException):
        return None
    return list(spec.class_names)


def score_model(model_uri: str, dataset: PreparedDataset, metric: str,
                classes: Collection[str] | None = None, batch_size: int = SCORE_BATCH) -> float:
    """Re-score a registered model through its pyfunc, as a consumer would call it."""
    configure_tracking()
    return score_loaded(mlflow.pyfunc.load_model(model_uri), dataset, metric, classes, batch_size)


def score_loaded(model: mlflow.pyfunc.PyFuncModel, dataset: PreparedDataset, metric: str,
                 classes: Collection[str] | None = None, batch_size: int = SCORE_BATCH) -> float:
    """``metric`` of ``model`` on today's test split, by class name, read ``batch_size`` images
    at a time (on the GPU when the serving host has one).

    Names, not label numbers: a dataset version that adds a class renumbers the ones sorted
    after it. With ``classes``, only the test images of those classes count.
    """
    truth: list[str] = []
    predicted: list[str] = []
    for images, labels in test_split_chunks(dataset, batch_size):
        names = [dataset.class_names[label] for label in labels]
        keep = [i for i, name in enumerate(names) if classes is None or name in classes]
        if not keep:
            continue
        frame = pd.DataFrame({"image": [images[i] for i in keep]})
        predicted += model.predict(frame, params={"batch_size": batch_size})["class_name"].tolist()
        truth += [names[i] for i in keep]
    if not truth:
        raise ValueError(f"no test image of the classes {sorted(classes or [])} to score on")
    if metric == "macro_f1":
        return float(f1_score(truth, predicted, labels=sorted(set(truth)), average="macro",
                              zero_division=0))
    return float(accuracy_score(truth, predicted))


def champion_version(model_name: str, alias: str) -> str | None:
    """The version ``alias`` points at; None only if MLflow says the model or the alias does not
    exist. Any other registry failure raises: "no answer" must never read as "no champion"."""
    mlflow_client = client()
    try:
        return str(mlflow_client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException as exc:
        if exc.error_code == _NO_SUCH_MODEL:
            return None
        if exc.error_code != _NO_SUCH_ALIAS:
            raise
        lookup_error = exc
    # INVALID_PARAMETER_VALUE also means a malformed request: confirm on the model that the alias
    # really is absent (a model deleted meanwhile has no alias either).
    try:
        aliases = mlflow_client.get_registered_model(model_name).aliases or {}
    except MlflowException as exc:
        if exc.error_code == _NO_SUCH_MODEL:
            return None
        raise
    if alias in aliases:
        raise lookup_error
    return None


def read_champion(model_name: str, alias: str, when: str) -> str | None:
    try:
        return champion_version(model_name, alias)
    except MlflowException as exc:
        raise RegistryError(
            f"champion gate: could not read alias {alias!r} of {model_name} {when} from the "
            f"MLflow registry at {redact(settings.tracking_uri())} ({_describe(exc)}); the gate "
            f"did not move {alias!r}. Re-run registration once the registry answers.", exc) from exc


def gate_champion(best: Registration, dataset: PreparedDataset, cfg: RegistryConfig,
                  random_init: bool = False) -> GateDecision:
    """Move ``cfg.alias`` to ``best`` only if it passes the rules and beats the current holder
    on today's test split.

    In order: a candidate trained from a random init for want of pretrained weights is refused
    (unless ``promote_random_init``); one below the quality floor is refused; with no champion
    yet, one that passed is promoted; a champion trained on other classes is replaced or
    compared on the shared classes (``on_class_change``); otherwise the candidate must beat the
    champion by more than ``min_improvement``.
    """
    metric, alias = cfg.champion_metric, cfg.alias
    current = read_champion(best.model_name, alias, "before comparing (nothing was tagged)")
    if current is not None and current == best.version:
        return decided_before(best, current, cfg.champion_metric, cfg.alias)
    configure_tracking()
    candidate = mlflow.pyfunc.load_model(best.model_uri)
    score = score_loaded(candidate, dataset, metric)

    def decide(promoted: bool, rule: str, reason: str, champion_score: float | None = None,
               candidate_score: float = score) -> GateDecision:
        return GateDecision(promoted=promoted, metric=metric, candidate=best.candidate,
                            candidate_version=best.version, candidate_score=candidate_score,
                            champion_version=current, champion_score=champion_score,
                            reason=reason, rule=rule)

    floor, passes = _floor(cfg, dataset, score)
    if random_init and not cfg.promote_random_init:
        decision = decide(False, "random_init", f"candidate trained from a random init (its "
                          "pretrained weights were unreachable); registry.promote_random_init "
                          f"is false, so {alias} stays where it is")
    elif not passes:
        decision = decide(False, "min_score", f"candidate {metric} {score:.4f} is below the "
                          f"quality floor ({floor}); {alias} stays where it is")
    elif current is None:
        decision = decide(True, "first", f"no {alias} yet; candidate {metric} {score:.4f} "
                          f"passes the quality floor ({floor})")
    else:
        decision = _against_champion(best, candidate, dataset, cfg, current, score, decide)
    apply_decision(decision, best.model_name, alias)
    return decision


def _floor(cfg: RegistryConfig, dataset: PreparedDataset, score: float) -> tuple[str, bool]:
    """The floor in words, and whether ``score`` passes it."""
    if cfg.min_score is None:
        chance = 1 / dataset.num_classes
        return f"above chance, {chance:.4f}", score > chance
    return f"registry.min_score {cfg.min_score:.4f}", score >= cfg.min_score


def _against_champion(best: Registration, candidate: mlflow.pyfunc.PyFuncModel,
                      dataset: PreparedDataset, cfg: RegistryConfig, current: str, score: float,
                      decide: Callable[..., GateDecision]) -> GateDecision:
    """The candidate against the current champion, re-scored on today's test split."""
    metric, alias = cfg.champion_metric, cfg.alias
    champion = mlflow.pyfunc.load_model(f"models:/{best.model_name}/{current}")
    theirs, today = model_class_names(champion), dataset.class_names
    shared: set[str] | None = None
    note = ""
    if theirs is not None and set(theirs) != set(today):
        change = (f"{alias} v{current} was trained on other classes (added today: "
                  f"{sorted(set(today) - set(theirs)) or '-'}, gone: {sorted(set(theirs) - set(today)) or '-'})")
        shared = set(theirs) & set(today)
        if cfg.on_class_change == "replace" or not shared:
            return decide(True, "class_change", f"{change}; registry.on_class_change="
                          f"{cfg.on_class_change} promotes the candidate, which passed the floor")
        log.warning("champion gate: %s; comparing both on the %d shared classes only",
                    change, len(shared))
        score = score_loaded(candidate, dataset, metric, shared)
        note = f" on the {len(shared)} shared classes ({change})"
    champion_score = score_loaded(champion, dataset, metric, shared)
    margin = cfg.min_improvement
    promoted = score > champion_score + margin
    if promoted:
        rule, verdict = ("shared_classes" if shared else "beats"), "beats"
    elif score > champion_score:
        rule, verdict = "min_improvement", f"beats by no more than registry.min_improvement {margin}:"
    else:
        rule, verdict = ("shared_classes" if shared else "tie"), "does not beat"
    reason = (f"candidate {metric} {score:.4f} {verdict} {alias} v{current} {champion_score:.4f}"
              f"{note} (a tie keeps the {alias})")
    return decide(promoted, rule, reason, champion_score=champion_score, candidate_score=score)


def decided_before(best: Registration, current: str, metric: str, alias: str) -> GateDecision:
    """A retry after this very promotion: the decision as it was made, from the version's tags."""
    tags = client().get_model_version(best.model_name, current).tags
    champion_score = float(tags["gate_champion_score"]) if tags.get("gate_champion_score") else None
    return GateDecision(
        promoted=tags.get("gate_decision") == "promoted", metric=metric,
        candidate=best.candidate, candidate_version=best.version,
        candidate_score=float(tags.get("gate_candidate_score") or "nan"),
        champion_version=tags.get("previous_champion") or None, champion_score=champion_score,
        reason=tags.get("gate_reason", f"version {current} already is {alias}"),
        rule=tags.get("gate_rule", ""))


def apply_decision(decision: GateDecision, model_name: str, alias: str) -> None:
    mlflow_client = client()
    tags = {"gate_decision": "promoted" if decision.promoted else "kept_champion",
            "gate_reason": decision.reason, "gate_metric": decision.metric,
            "gate_rule": decision.rule,
            "gate_candidate_score": f"{decision.candidate_score:.6f}",
            "gate_champion_score": "" if decision.champion_score is None
            else f"{decision.champion_score:.6f}"}
    if decision.promoted:
        tags["previous_champion"] = decision.champion_version or ""
    # Tags first: once the alias moves, a rollback can always find the previous champion.
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(model_name, decision.candidate_version, key, value)
    if decision.promoted:
        # Re-read the alias just before moving it: another run may have moved it meanwhile.
        now = read_champion(model_name, alias, f"again before moving it (version "
                             f"{decision.candidate_version} already carries the gate tags)")
        if now != decision.champion_version:
            raise RuntimeError(f"{alias} of {model_name} moved during the gate; re-run registration")
        mlflow_client.set_registered_model_alias(model_name, alias, decision.candidate_version)


def model_card(registration: Registration, metrics: dict[str, float], dataset: PreparedDataset,
               lineage: dict[str, str], decision: GateDecision) -> str:
    """A registered version's description: what it was trained on and from, how it scored on
    the test split, and what the champion gate decided (markdown, as MLflow's UI shows it)."""
    counts = ", ".join(f"{n} {split}" for split, n in dataset.split_counts.items())
    source = lineage.get("weights_source", "")
    if source == "scratch":
        start = "trained from scratch (by design)"
    elif source == RANDOM_INIT:
        start = ("**RANDOM INIT: no pretrained weights were reachable; this model did not "
                 "start from pretrained features**")
    else:
        start = f"fine-tuned from `{source}` (sha256 `{lineage.get('weights_sha256', '')[:16]}...`)"
    shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("top1", "top5", "macro_f1") if k in metrics)
    if registration.version == decision.candidate_version:
        champion = ("-" if decision.champion_score is None
                    else f"{decision.champion_score:.4f} (v{decision.champion_version})")
        gate = (f"{'promoted' if decision.promoted else 'not promoted'} (rule `{decision.rule}`): "
                f"{decision.reason}. {decision.metric}: this version {decision.candidate_score:.4f}, "
                f"champion before {champion}")
    else:
        gate = (f"not the gate's candidate: version {decision.candidate_version} "
                f"({decision.candidate}) was")
    return "\n".join([
        f"**{registration.candidate}** ({lineage.get('arch', '?')}) on `{dataset.name}` version "
        f"`{dataset.version}` ({dataset.num_classes} classes; {counts}), {dataset.recipe} recipe "
        f"at {dataset.image_size} px.", "",
        f"- start: {start}",
        f"- test split: {shown}",
        f"- champion gate: {gate}",
    ])


def describe_version(model_name: str, version: str, description: str) -> None:
    """Set a registered version's description (its model card in MLflow's UI)."""
    client().update_model_version(model_name, version, description=description)


def rollback_champion(model_name: str, alias: str = "champion") -> str:
    """Move ``alias`` back to the version it held before the current one; return that version."""
    mlflow_client = client()
    current = champion_version(model_name, alias)
    if current is None:
        raise ValueError(f"{model_name} has no {alias!r} alias to roll back")
    previous = mlflow_client.get_model_version(model_name, current).tags.get("previous_champion")
    if not previous:
        raise ValueError(f"version {current} of {model_name} records no previous {alias}; "
                         f"set one by hand: MlflowClient().set_registered_model_alias(...)")
    mlflow_client.set_registered_model_alias(model_name, alias, previous)
    mlflow_client.set_model_version_tag(model_name, current, "rolled_back_from", alias)
    log.warning("%s of %s moved back from version %s to %s", alias, model_name, current, previous)
    return previous


def main(argv: list[str]) -> int:
    """``python -m visionpipe.registry rollback <model> [alias]``: undo the last promotion."""
    if len(argv) not in (2, 3) or argv[0] != "rollback":
        print("usage: python -m visionpipe.registry rollback <model-name> [alias]")
        return 2
    version = rollback_champion(*argv[1:])
    print(f"{argv[2] if len(argv) == 3 else 'champion'} of {argv[1]} is now version {version}")
    return 0


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv[1:]))
