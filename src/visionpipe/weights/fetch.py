"""fetch_weights: resolve, reuse the cache or download and verify, fall back to a random init."""

from __future__ import annotations

import logging
from pathlib import Path

from visionpipe.config import WeightsConfig, weights_arch_mismatch
from visionpipe.redaction import redact
from visionpipe.settings import cache_dir
from visionpipe.weights.cache import FetchedWeights, cache_lookup, store_verified
from visionpipe.errors import WeightsError, WeightsUnavailable
from visionpipe.weights.sources import resolve_source, with_retries
from visionpipe.weights.state_dict import RANDOM_INIT, random_init

log = logging.getLogger(__name__)


def fetch_weights(cfg: WeightsConfig, arch: str, *, backoff_s: float = 0.5) -> FetchedWeights:
    """Fetch, verify and cache the weights ``cfg.uri`` names for ``arch``.

    A cached file with the expected digest is re-hashed and reused without a request. Network
    errors are retried ``cfg.attempts`` times, sleeping ``backoff_s * 2**n`` between attempts; a
    digest mismatch or a missing object is raised at once as :class:`WeightsError`. When the source
    stays unreachable, ``cfg.on_unavailable`` decides: raise :class:`WeightsUnavailable`, or build
    a seeded random initialisation of ``arch`` and say so in a warning.
    """
    mismatch = weights_arch_mismatch(cfg.uri, arch)
    if mismatch is not None:
        raise WeightsError(mismatch)  # before any download
    cache = cache_dir("weights")
    try:
        path, digest = with_retries(
            lambda: _fetch_once(cfg, cache), cfg.uri, cfg.attempts, backoff_s
        )
    except WeightsUnavailable as exc:
        if cfg.on_unavailable != RANDOM_INIT:
            raise
        # The error's "Fix: set on_unavailable=random-init" is what this run already does.
        return random_init(arch, cache, reason=str(exc).split(" Fix: ")[0])
    # ``source`` is for people (tags, logs, the persisted Prefect result): no credentials in it.
    return FetchedWeights(path=str(path), sha256=digest, source=redact(cfg.uri), random_init=False,
                          arch=arch)


def _fetch_once(cfg: WeightsConfig, cache: Path, reuse: bool = True) -> tuple[Path, str]:
    """One attempt: resolve the URI, reuse the cache if it can (and may), else download and
    verify."""
    source = resolve_source(cfg)
    hit = cache_lookup(cache, source) if reuse else None
    if hit is not None:
        return hit
    log.info("downloading weights from %s", redact(cfg.uri))
    path, digest = store_verified(cache, source, cfg.uri)
    log.info("weights from %s cached at %s (sha256 %s)", redact(cfg.uri), path, digest)
    return path, digest


def fetch_file(uri: str, sha256: str | None, kind: str, *, attempts: int = 4,
               timeout_s: float = 30.0, backoff_s: float = 0.5) -> tuple[Path, str]:
    """Any file (a style image, say) fetched like weights: ``file://``, ``https://``, ``s3://``,
    retried on network errors, hashed while it is written, checked against ``sha256`` when
    given, and cached under ``cache_dir(kind)`` by its digest. A ``file://`` URI is read every
    time (a photo may be edited in place; reading it is cheap), never taken from the cache's
    index. No random-init fallback: a file that cannot be fetched raises
    ``WeightsUnavailable`` (or ``WeightsError``) naming the fix."""
    cfg = WeightsConfig(uri=uri, sha256=sha256, attempts=attempts, timeout_s=timeout_s)
    cache = cache_dir(kind)
    reuse = not uri.lower().startswith("file:")
    return with_retries(lambda: _fetch_once(cfg, cache, reuse), uri, attempts, backoff_s)
