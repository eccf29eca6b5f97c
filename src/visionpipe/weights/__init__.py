"""Pretrained backbone weights: fetched once, verified by sha256, cached under their digest.

Sources are ``torchvision:<arch>.<WEIGHTS>``, ``https://``/``http://``, ``s3://bucket/key``,
``file:///abs/path`` and ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` from our MLflow
registry. Bytes go to a temporary file in the cache while they are hashed, and only a verified file
is renamed to ``<sha256>.pth``, so a half-written or tampered file is never used. Network errors
are retried with exponential backoff; when a source stays unreachable the caller chooses between
failing and an explicitly logged random initialisation.

One module per job: ``sources`` (URIs, transports, retries), ``cache`` (the verified digest
cache and its index), ``state_dict`` (loading, key checks, random init), ``fetch`` (the three
together), ``errors``.
"""

from visionpipe.digests import file_sha256
from visionpipe.weights.cache import FetchedWeights
from visionpipe.errors import WeightsError, WeightsUnavailable
from visionpipe.weights.fetch import fetch_file, fetch_weights
from visionpipe.weights.sources import digest_prefix, resolve_torchvision_uri
from visionpipe.weights.state_dict import (
    RANDOM_INIT,
    check_state_dict_keys,
    load_state_dict_file,
    random_init,
)

__all__ = [
    "RANDOM_INIT",
    "FetchedWeights",
    "WeightsError",
    "WeightsUnavailable",
    "check_state_dict_keys",
    "digest_prefix",
    "fetch_file",
    "fetch_weights",
    "file_sha256",
    "load_state_dict_file",
    "random_init",
    "resolve_torchvision_uri",
]
