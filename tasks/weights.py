"""fetch-pretrained-weights: download, verify and cache the backbone's starting weights."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext

from tasks.common import retry_transient, run_logger
from visionpipe.config import WeightsConfig
from visionpipe.weights import FetchedWeights, fetch_weights


def _weights_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Fixed sources are cached; an alias (``models:/x@champion``) is resolved every run."""
    cfg: WeightsConfig = parameters["cfg"]
    if cfg.uri.startswith("models:/") and "@" in cfg.uri:
        return None
    return f"fetch-weights-{parameters['arch']}-{cfg.uri}-{cfg.sha256}-{cfg.on_unavailable}"


# Expiring after 12 hours: a random init cached while the source was down is not what tomorrow's
# run gets; a real download stays in the library's own verified file cache regardless.
@task(name="fetch-pretrained-weights", cache_key_fn=_weights_cache_key, persist_result=True,
      cache_expiration=timedelta(hours=12), retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=retry_transient)
def fetch_pretrained_weights(cfg: WeightsConfig, arch: str) -> FetchedWeights:
    """Fetch ``cfg.uri`` with full sha256 verification; random init only if the config allows it."""
    weights = fetch_weights(cfg, arch)
    logger = run_logger()
    if weights.random_init:
        message = (f"No weights source answered for {cfg.uri}: {arch} starts from RANDOM "
                   f"initialisation (weights.on_unavailable=random-init).")
        logger.warning(message)
        create_markdown_artifact(key="weights-random-init", markdown=f"# Random init\n\n{message}",
                                 description="pretrained weights were unavailable")
    else:
        logger.info("weights %s verified, sha256 %s", weights.source, weights.sha256)
    return weights
