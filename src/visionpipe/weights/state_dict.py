"""State dicts: loaded safely, checked against a model, or made by a seeded random init."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from visionpipe.digests import file_sha256
from visionpipe.models import build_backbone
from visionpipe.redaction import redact
from visionpipe.weights.cache import FetchedWeights
from visionpipe.errors import WeightsError

log = logging.getLogger(__name__)

RANDOM_INIT = "random-init"


def random_init(arch: str, cache: Path, reason: str) -> FetchedWeights:
    """A seeded random initialisation of ``arch``, saved to the cache under its digest."""
    log.warning("RANDOM INIT: pretrained weights unavailable (%s); %s starts from a random "
                "initialisation (seed 0), so expect much lower accuracy", redact(reason), arch)
    try:
        # fork_rng leaves the caller's random stream as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            # Residual branches start at zero (Goyal et al. 2017): from scratch a deep ResNet
            # then trains as a shallow one first (docs/photo-accuracy.md).
            model = build_backbone(arch, 1000, zero_init_residual=True)
    except ValueError as exc:
        raise WeightsError(f"cannot build {arch!r} for random init: {exc}") from exc
    fd, name = tempfile.mkstemp(dir=cache, prefix=".partial-", suffix=".pth")
    try:
        with os.fdopen(fd, "wb") as out:
            torch.save(model.state_dict(), out)
        digest = file_sha256(name)
        path = cache / f"{digest}.pth"
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)
    return FetchedWeights(path=str(path), sha256=digest, source=RANDOM_INIT, random_init=True,
                          arch=arch)


def load_state_dict_file(
    path: str | os.PathLike[str], expected_sha256: str | None = None
) -> dict[str, torch.Tensor]:
    """Load a state dict safely (``weights_only``) after checking its digest when one is given."""
    if not Path(path).is_file():
        # Checked before hashing: file_sha256 would raise a bare FileNotFoundError, which a
        # retry condition takes for a transient error.
        raise WeightsError(f"weights file {path} does not exist (was the weights cache deleted?). "
                           "Fix: fetch it again (fetch_weights, or rerun the flow: "
                           "fetch-pretrained-weights fetches a missing file again).")
    if expected_sha256 is not None:
        actual = file_sha256(path)
        if actual != expected_sha256.lower():
            raise WeightsError(f"sha256 mismatch for {path}: expected {expected_sha256.lower()}, "
                               f"got {actual}. Fix: fetch the weights again (fetch_weights).")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:  # deleted between the check and the load
        raise WeightsError(f"weights file {path} does not exist. Fix: fetch it again.") from exc
    except Exception as exc:  # any unpickling failure means the file is not a plain state dict
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise WeightsError(f"{path} is not a loadable state dict ({type(exc).__name__}: {first}). "
                           "Fix: save weights with torch.save(model.state_dict(), path), "
                           "not the model object.") from exc
    return _as_state_dict(obj, path)


def _as_state_dict(obj: object, path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """``obj`` if it is a ``str -> Tensor`` mapping, else a WeightsError that names the fix."""
    fix = "Fix: save weights with torch.save(model.state_dict(), path)."
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict. {fix}")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        nested = [k for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)]
        hint = f" It looks like a checkpoint: extract checkpoint[{nested[0]!r}]." if nested else ""
        raise WeightsError(f"{path} is a mapping but not of str -> Tensor (e.g. key {bad[0]!r})."
                           f"{hint} {fix}")
    # Keep an OrderedDict as is: its _metadata carries module versions load_state_dict uses.
    return obj if isinstance(obj, dict) else dict(obj)


def check_state_dict_keys(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    ignore_prefixes: Sequence[str] = ("fc.",),
) -> None:
    """Raise :class:`WeightsError` unless ``state_dict`` fits ``model``.

    Keys under ``ignore_prefixes`` (the head that fine-tuning replaces) are left out of the check.
    """
    skip = tuple(ignore_prefixes)
    wanted = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    given = {k: v for k, v in state_dict.items() if not k.startswith(skip)}
    missing = sorted(set(wanted) - set(given))
    unexpected = sorted(set(given) - set(wanted))
    reshaped = [f"{k} {tuple(given[k].shape)} vs {tuple(wanted[k].shape)}"
                for k in sorted(set(wanted) & set(given)) if given[k].shape != wanted[k].shape]
    if not (missing or unexpected or reshaped):
        return
    fix = f"Fix: use weights made for {type(model).__name__} (weights.uri must match finetune.arch)"
    if unexpected and all(k.startswith("module.") for k in unexpected):
        fix = "Fix: strip the 'module.' prefix DistributedDataParallel adds before saving"
    raise WeightsError(
        f"state dict does not fit {type(model).__name__}: {len(missing)} missing keys "
        f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}, {len(reshaped)} "
        f"shape mismatches {reshaped[:5]}. {fix}."
    )
