"""The stylisation network in the MLflow registry: logged as a pyfunc, registered, and gated:
the alias (one registered model per style) moves only when the candidate's total loss on the
held-out images is lower than the champion's, both scored through their served pyfunc."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema

import visionpipe
from visionpipe.registry import (
    GateDecision,
    Registration,
    apply_decision,
    decided_before,
    pip_requirements,
    read_champion,
)
from visionpipe.style.images import load_image, png_bytes, unit_range
from visionpipe.style.loss import PerceptualLoss
from visionpipe.style.network import StyleSpec
from visionpipe.style.serving import Stylizer
from visionpipe.training.checkpoint import load_checkpoint
from visionpipe.tracking import configure_tracking

log = logging.getLogger(__name__)
METRIC = "heldout_total_loss"
SIGNATURE = ModelSignature(inputs=Schema([ColSpec(DataType.binary, "image")]),
                           outputs=Schema([ColSpec(DataType.binary, "image")]))


def log_style_model(run_id: str, checkpoint: Path, work_dir: Path, example: list[bytes]) -> str:
    """Log the trained network as a ``Stylizer`` pyfunc in ``run_id``; return its URI."""
    configure_tracking()
    state = load_checkpoint(checkpoint)
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.save(state["model"], work_dir / "state_dict.pt")
    (work_dir / "spec.json").write_text(state["spec"])
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=Stylizer(),
            artifacts={"state_dict": str(work_dir / "state_dict.pt"), "spec": str(work_dir / "spec.json")},
            code_paths=[str(Path(visionpipe.__file__).parent)], signature=SIGNATURE,
            input_example=pd.DataFrame({"image": example[:1]}), pip_requirements=pip_requirements())
    return str(info.model_uri)


def served_loss(model_uri: str, images: torch.Tensor, criterion: PerceptualLoss) -> tuple[float, StyleSpec | None]:
    """The total loss of what the registered model serves for ``images`` (uint8 ``N x 3 x S x
    S``, sent as PNG bytes), and its spec (None for a model that is not a ``Stylizer``)."""
    configure_tracking()
    model = mlflow.pyfunc.load_model(model_uri)
    device = next(criterion.network.parameters()).device
    frames = model.predict(pd.DataFrame({"image": [png_bytes(unit_range(i)) for i in images]}))
    served = torch.cat([load_image(bytes(b)) for b in frames["image"]]).to(device)
    with torch.no_grad():
        total = float(criterion(served, unit_range(images.to(device))).total)
    python_model = model.unwrap_python_model()
    return total, getattr(python_model, "spec", None)


def gate_style(best: Registration, spec: StyleSpec, images: torch.Tensor, criterion: PerceptualLoss,
               alias: str, random_init: bool = False, promote_random_init: bool = False) -> GateDecision:
    """Move ``alias`` to ``best`` when no version holds it, when the holder learned another
    style image, or when ``best``'s held-out total loss is lower than the holder's.

    A network trained against a randomly initialised loss network (its VGG weights were
    unreachable) is refused unless ``promote_random_init``: the loss it is scored with means
    little. A retry after this very promotion returns the decision as it was made.
    """
    current = read_champion(best.model_name, alias, "before comparing (nothing was tagged)")
    if current is not None and current == best.version:
        return decided_before(best, current, METRIC, alias)
    score, _ = served_loss(best.model_uri, images, criterion)

    def decide(promoted: bool, rule: str, reason: str, champion: float | None = None) -> GateDecision:
        return GateDecision(promoted=promoted, metric=METRIC, candidate=best.candidate,
                            candidate_version=best.version, candidate_score=score,
                            champion_version=current, champion_score=champion, reason=reason,
                            rule=rule)

    if random_init and not promote_random_init:
        decision = decide(False, "random_init", "the loss network was a random initialisation "
                          "(its pretrained weights were unreachable); "
                          f"registry.promote_random_init is false, so {alias} stays where it is")
    elif current is None:
        decision = decide(True, "first", f"no {alias} yet; candidate {METRIC} {score:.6g}")
    else:
        held, held_spec = served_loss(f"models:/{best.model_name}/{current}", images, criterion)
        if held_spec is None or held_spec.style_sha256 != spec.style_sha256:
            decision = decide(True, "style_change", f"{alias} (version {current}) learned another "
                              "style image: the candidate replaces it", held)
        elif score < held:
            decision = decide(True, "beats", f"candidate {METRIC} {score:.6g} is lower than "
                              f"{alias}'s {held:.6g} on the same {len(images)} held-out images", held)
        else:
            decision = decide(False, "kept", f"candidate {METRIC} {score:.6g} is not lower than "
                              f"{alias}'s {held:.6g}; {alias} stays on version {current}", held)
    apply_decision(decision, best.model_name, alias)
    return decision
