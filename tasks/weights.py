"""fetch-pretrained-weights: download, verify and cache the backbone's starting weights."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture

from tasks.common import retry_transient, run_logger
from visionpipe.config import WeightsConfig
from visionpipe.redaction import redact
from visionpipe.weights import FetchedWeights, fetch_weights


def _weights_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Fixed sources are cached; an alias (``models:/x@champion``) is resolved every run.

    The key holds the URI's sha256, never the URI: Prefect stores the key on the task run and
    names the result file after it, and a URI may carry credentials (``https://user:token@...``).
    """
    cfg: WeightsConfig = parameters["cfg"]
    if cfg.uri.startswith("models:/") and "@" in cfg.uri:
        return None
    uri_digest = hashlib.sha256(cfg.uri.encode()).hexdigest()
    return f"fetch-weights-{parameters['arch']}-{uri_digest}-{cfg.sha256}-{cfg.on_unavailable}"


# Expiring after 12 hours, so that a cached result does not outlive its file for long; a real
# download stays in the library's own verified file cache regardless. Use
# fetch_pretrained_weights_cached, which fetches again when the cached file is gone or the cached
# result is a random init.
@task(name="fetch-pretrained-weights", cache_key_fn=_weights_cache_key, persist_result=True,
      cache_expiration=timedelta(hours=12), retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=retry_transient)
def fetch_pretrained_weights(cfg: WeightsConfig, arch: str) -> FetchedWeights:
    """Fetch ``cfg.uri`` with full sha256 verification; random init only if the config allows it."""
    weights = fetch_weights(cfg, arch)
    logger = run_logger()
    if weights.random_init:
        message = (f"No weights source answered for {redact(cfg.uri)}: {arch} starts from RANDOM "
                   f"initialisation (weights.on_unavailable=random-init).")
        logger.warning(message)
        create_markdown_artifact(key="weights-random-init", markdown=f"# Random init\n\n{message}",
                                 description="pretrained weights were unavailable")
    else:
        logger.info("weights %s verified, sha256 %s", redact(weights.source), weights.sha256)
    return weights


def fetch_pretrained_weights_cached(
    cfg: WeightsConfig, arch: str, fetching: PrefectFuture[FetchedWeights] | None = None
) -> FetchedWeights:
    """fetch-pretrained-weights, cached; fetched anew when the cached result is no longer good.

    ``fetching`` is a run already submitted (``fetch_pretrained_weights.submit(cfg, arch)``), so a
    flow can fetch alongside other stages; without it the task is called here. Fetched again with
    ``refresh_cache``:

    * when the result's file is gone (``rm -rf .visionpipe/weights``): finetune would fail on it;
    * when a result taken from the cache is a random init. A random init is not worth reusing: it
      is seeded, so rebuilding it gives the same bytes, and it stands for "the source was down",
      which a cache cannot know to be still true; a user whose mirror is back expects pretrained
      weights in the next run, not for 12 hours after. Asking the source again costs at most
      ``weights.attempts`` tries. A random init made by this very run is kept: its source was
      just asked.
    """
    if fetching is None:
        state = fetch_pretrained_weights(cfg, arch, return_state=True)
    else:
        fetching.wait()
        state = fetching.state
    weights: FetchedWeights = state.result()
    from_cache = state.name == "Cached"
    if not Path(weights.path).is_file():
        reason = f"its file {weights.path} is gone"
    elif weights.random_init and from_cache:
        reason = "it is a random init, and the source may answer now"
    else:
        return weights
    run_logger().warning("not using the cached weights for %s (%s); fetching them again",
                         redact(cfg.uri), reason)
    return fetch_pretrained_weights.with_options(refresh_cache=True)(cfg, arch)
