"""Where weights come from: URIs resolved to byte streams, four transports, retries with backoff.

``torchvision:<arch>.<WEIGHTS>`` and ``http(s)://`` are read over HTTP, ``s3://bucket/key`` through
the project's S3 client, ``file:///abs/path`` from disk, and ``models:/<name>@<alias>`` or
``models:/<name>/<version>`` from our MLflow registry. Each transport turns the answers worth
another attempt (refused, timed out, 5xx, throttled, truncated) into :class:`_Transient`, which
:func:`with_retries` retries, and every other failure into :class:`WeightsError` at once.
"""

from __future__ import annotations

import http.client
import logging
import re
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import torchvision

from visionpipe.config import WeightsConfig
from visionpipe.redaction import redact
from visionpipe.settings import cache_dir, tracking_uri
from visionpipe.errors import (
    TRANSIENT_MLFLOW_CODES,
    TRANSIENT_S3_CODES,
    WeightsError,
    WeightsUnavailable,
    http_status_is_transient,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_CHUNK = 1 << 20
# torch.hub names files ``<name>-<first hex digits of the sha256>.<ext>`` (resnet50-11ad3fa6.pth);
# torchvision uses 8 or 10 digits, and fewer than 8 would match ordinary names by accident.
_HUB_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z][A-Za-z0-9.]*$")
_UNAVAILABLE_FIX = "set weights.on_unavailable=random-init or point weights.uri at a mirror"


class _Transient(Exception):
    """A network error worth another attempt (refused, timed out, 5xx, throttled, truncated)."""


@dataclass(frozen=True)
class Source:
    """A resolved weights URI: how to read its bytes and what digest they must have."""

    key: str  # index key: the URI, with a registry alias pinned to the version it points at
    expected: str | None  # full sha256, when the config or the registry gives one
    prefix: str | None  # leading hex digits promised by a torch.hub-style file name
    chunks: Callable[[], Iterator[bytes]]
    pinned_by: str = "weights.sha256"  # who promised ``expected``, for the error message


def with_retries(action: Callable[[], T], uri: str, attempts: int, backoff_s: float) -> T:
    """Run ``action`` until it succeeds, retrying only :class:`_Transient` errors."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except _Transient as exc:
            if attempt == attempts:
                raise WeightsUnavailable(
                    f"cannot fetch weights from {uri} after {attempts} attempt(s); last error: "
                    f"{exc}. Fix: {_UNAVAILABLE_FIX}."
                ) from exc
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning("attempt %d/%d to fetch %s failed (%s); retrying in %.2f s",
                        attempt, attempts, redact(uri), redact(str(exc)), delay)
            time.sleep(delay)
    raise AssertionError("unreachable: attempts >= 1")  # keeps type checkers sure of the return


# ---------------------------------------------------------------------------- resolving URIs


def resolve_source(cfg: WeightsConfig) -> Source:
    """Turn ``cfg.uri`` into a readable source; the registry is asked here for models:/ URIs."""
    uri = cfg.uri
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme in ("torchvision", "http", "https"):
        url = resolve_torchvision_uri(uri) if scheme == "torchvision" else uri
        return Source(uri, cfg.sha256, digest_prefix(url),
                       lambda: _http_chunks(url, cfg.timeout_s))
    if scheme == "s3":
        return Source(uri, cfg.sha256, digest_prefix(uri), lambda: _s3_chunks(uri))
    if scheme == "file":
        path = _file_path(uri)
        return Source(uri, cfg.sha256, digest_prefix(path.name), lambda: _file_chunks(path))
    if scheme == "models":
        return _registry_source(uri, cfg.sha256)
    raise WeightsError(
        f"unsupported weights.uri {uri!r}. Fix: use torchvision:<arch>.<WEIGHTS>, https://..., "
        "s3://bucket/key, file:///abs/path, models:/<name>@<alias> or models:/<name>/<version>."
    )


def resolve_torchvision_uri(uri: str) -> str:
    """The download URL torchvision itself uses for ``torchvision:<arch>.<WEIGHTS>``."""
    arch, _, name = uri.removeprefix("torchvision:").partition(".")
    try:
        enum = torchvision.models.get_model_weights(arch)
    except ValueError as exc:
        raise WeightsError(f"{uri!r}: torchvision has no model {arch!r}. Fix: use one of "
                           "torchvision.models.list_models(), e.g. resnet50.") from exc
    try:
        weights = enum[name]
    except KeyError as exc:
        choices = ", ".join(enum.__members__)
        raise WeightsError(f"{uri!r}: torchvision has no {name!r} weights for {arch}. Fix: use "
                           f"torchvision:{arch}.<WEIGHTS> with one of {choices}.") from exc
    return str(weights.url)


def digest_prefix(name: str) -> str | None:
    """The sha256 prefix a torch.hub-style file name promises, if any.

    ``resnet50-11ad3fa6.pth`` promises a digest starting with ``11ad3fa6``.
    """
    match = _HUB_NAME.search(name.rstrip("/").rsplit("/", 1)[-1])
    return match.group(1) if match else None


def _file_path(uri: str) -> Path:
    """The local path of a ``file:`` URI; another host is refused."""
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise WeightsError(f"{uri!r} names host {parsed.netloc!r}. Fix: use file:///abs/path.")
    return Path(urllib.request.url2pathname(parsed.path))


def _registry_source(uri: str, expected: str | None) -> Source:
    """Pin a models:/ URI to one model version and read its expected digest from a tag."""
    name, ref = _parse_models_uri(uri)
    from mlflow import MlflowClient  # imported on use: it is slow and only models:/ needs it
    from mlflow.exceptions import MlflowException

    store = tracking_uri()
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    try:
        version = (client.get_model_version_by_alias(name, ref[1:]) if ref.startswith("@")
                   else client.get_model_version(name, ref))
        location = _artifact_location(client, name, str(version.version))
    except MlflowException as exc:
        raise _mlflow_error(uri, exc) from exc
    pinned = f"models:/{name}/{version.version}"
    tagged = (version.tags or {}).get("weights_sha256")
    if expected and tagged and tagged.lower() != expected:
        raise WeightsError(f"{pinned} is tagged weights_sha256={tagged} but weights.sha256 is "
                           f"{expected}. Fix: correct weights.sha256 or the tag.")
    if expected or not tagged:
        return Source(pinned, expected, None, lambda: _registry_chunks(pinned, location, store))
    return Source(pinned, tagged.lower(), None, lambda: _registry_chunks(pinned, location, store),
                   pinned_by=f"the weights_sha256 tag of {pinned}")


def _artifact_location(client: Any, name: str, version: str) -> str:
    """Where a model version's files live, asked of our client.

    ``download_artifacts("models:/...")`` would resolve the name through MLflow's global registry
    URI, which this library never sets; so the location is resolved here instead.
    """
    location = str(client.get_model_version_download_uri(name, version))
    if location.startswith("models:/"):
        # An MLflow 3 logged model (models:/m-<id>): its artifacts sit at its own location.
        location = str(client.get_logged_model(location.removeprefix("models:/")).artifact_location)
    return location


def _parse_models_uri(uri: str) -> tuple[str, str]:
    """``models:/name@alias`` -> (name, '@alias'); ``models:/name/3`` -> (name, '3')."""
    rest = uri.removeprefix("models:").lstrip("/")
    if "@" in rest:
        name, _, alias = rest.rpartition("@")
        if name and alias:
            return name, f"@{alias}"
    name, _, version = rest.rpartition("/")
    if name and version.isdigit():
        return name, version
    raise WeightsError(f"{uri!r} is not a registry URI. Fix: use models:/<name>@<alias> or "
                       "models:/<name>/<version>.")


# ---------------------------------------------------------------------------- transports


def _http_chunks(url: str, timeout_s: float) -> Iterator[bytes]:
    """Stream ``url``; transient failures become :class:`_Transient`, the rest WeightsError."""
    request = urllib.request.Request(url, headers={"User-Agent": "visionpipe"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            announced = response.headers.get("Content-Length")
            received = 0
            while chunk := response.read(_CHUNK):
                received += len(chunk)
                yield chunk
    except urllib.error.HTTPError as exc:
        if http_status_is_transient(exc.code):
            raise _Transient(f"HTTP {exc.code} from {url}") from exc
        raise WeightsError(
            f"HTTP {exc.code} {exc.reason} from {url}. Fix: correct weights.uri (a 4xx is not "
            "retried: the URL or its access rights are wrong)."
        ) from exc
    except (OSError, http.client.HTTPException) as exc:
        # URLError (refused, DNS), timeouts and resets are all OSError.
        raise _Transient(f"{type(exc).__name__}: {exc}") from exc
    # http.client returns a short body quietly when the connection drops early.
    if announced is not None and received != int(announced):
        raise _Transient(f"{url} ended after {received} of {announced} bytes")


def _s3_chunks(uri: str) -> Iterator[bytes]:
    """Stream an S3 object through the project's path-style client."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    from visionpipe.errors import DatasetError
    from visionpipe.data.s3 import parse_s3_uri, s3_client

    try:
        bucket, key = parse_s3_uri(uri)
    except DatasetError as exc:
        raise WeightsError(f"{exc}. Fix: use s3://bucket/key.") from exc
    client = s3_client()
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        yield from body.iter_chunks(_CHUNK)
    except ClientError as exc:
        raise _s3_client_error(uri, client.meta.endpoint_url, exc) from exc
    except NoCredentialsError as exc:
        raise WeightsError(f"no AWS credentials to read {uri}. Fix: set AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE.") from exc
    except BotoCoreError as exc:
        # Endpoint unreachable, timeouts, a body cut short: worth another attempt.
        raise _Transient(f"{type(exc).__name__}: {exc}") from exc


def _s3_client_error(uri: str, endpoint: str | None, exc: Any) -> Exception:
    """Throttling and 5xx are transient; NoSuchKey, NoSuchBucket and denials are not."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if code in TRANSIENT_S3_CODES or status >= 500:
        return _Transient(f"S3 {code or status} for {uri}")
    return WeightsError(f"S3 {code or status} for {uri} at endpoint {endpoint}: "
                        f"{error.get('Message', exc)}. Fix: correct weights.uri, upload the "
                        "object, or check AWS_ENDPOINT_URL_S3 and the credentials.")


def _file_chunks(path: Path) -> Iterator[bytes]:
    """Read a local file; only an I/O error (a flaky network mount) is worth retrying."""
    try:
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                yield chunk
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise WeightsError(f"cannot read weights file {path}: {exc.strerror}. Fix: correct "
                           "weights.uri (file:///abs/path).") from exc
    except OSError as exc:
        raise _Transient(f"{type(exc).__name__}: {exc}") from exc


def _registry_chunks(pinned: str, location: str, store: str) -> Iterator[bytes]:
    """Download a registered model's artifacts and stream its ``state_dict.pt``."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(dir=cache_dir("weights"), prefix=".registry-") as tmp:
        try:
            root = mlflow.artifacts.download_artifacts(
                artifact_uri=location, dst_path=tmp, tracking_uri=store, registry_uri=store
            )
        except MlflowException as exc:
            raise _mlflow_error(pinned, exc) from exc
        except OSError as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from exc
        yield from _file_chunks(_find_state_dict(Path(root), pinned))


def _find_state_dict(root: Path, pinned: str) -> Path:
    """The model's own ``state_dict.pt`` among a registered version's downloaded artifacts."""
    if root.is_file() and root.name == "state_dict.pt":
        return root
    # The shallowest match is the model's own; deeper ones would belong to nested artifacts.
    found = sorted(root.rglob("state_dict.pt"), key=lambda p: (len(p.parts), str(p)))
    if not found:
        raise WeightsError(f"{pinned} has no state_dict.pt among its artifacts. Fix: register "
                           "a model logged by visionpipe (artifacts/state_dict.pt) or use "
                           "another URI.")
    return found[0]


def _mlflow_error(uri: str, exc: Any) -> Exception:
    """Server trouble is transient; an unknown name, version or alias is not."""
    code = str(getattr(exc, "error_code", ""))
    if code in TRANSIENT_MLFLOW_CODES:
        return _Transient(f"MLflow {code}: {exc}")
    return WeightsError(f"cannot resolve {uri} in the MLflow registry at {tracking_uri()} "
                        f"({code}): {str(exc).rstrip('.')}. Fix: check the model name, version "
                        "or alias, or MLFLOW_TRACKING_URI.")
