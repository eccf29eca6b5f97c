"""Pretrained backbone weights: fetched once, verified by sha256, cached under their digest.

Sources are ``torchvision:<arch>.<WEIGHTS>``, ``https://``/``http://``, ``s3://bucket/key``,
``file:///abs/path`` and ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` from our MLflow
registry. Bytes go to a temporary file in the cache while they are hashed, and only a verified file
is renamed to ``<sha256>.pth``, so a half-written or tampered file is never used. Network errors
are retried with exponential backoff; when a source stays unreachable the caller chooses between
failing and an explicitly logged random initialisation.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import torch
import torchvision
from pydantic import BaseModel, ConfigDict

from visionpipe.digests import file_sha256
from visionpipe.redaction import redact
from visionpipe.config import WeightsConfig
from visionpipe.settings import cache_dir, tracking_uri
from visionpipe.errors import WeightsError, WeightsUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

_CHUNK = 1 << 20
_INDEX = "index.json"
RANDOM_INIT = "random-init"
# torch.hub names files ``<name>-<first hex digits of the sha256>.<ext>`` (resnet50-11ad3fa6.pth);
# torchvision uses 8 or 10 digits, and fewer than 8 would match ordinary names by accident.
_HUB_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z][A-Za-z0-9.]*$")
_UNAVAILABLE_FIX = "set weights.on_unavailable=random-init or point weights.uri at a mirror"
# Status codes a server uses for "try again later"; any other 4xx is a wrong URL or credentials.
_HTTP_TRANSIENT = {408, 425, 429}
_S3_TRANSIENT = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeoutException",
    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests",
}
_MLFLOW_TRANSIENT = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}


class _Transient(Exception):
    """A network error worth another attempt (refused, timed out, 5xx, throttled, truncated)."""


class FetchedWeights(BaseModel):
    """Where the verified weights lie in the cache, and where they came from."""

    model_config = ConfigDict(frozen=True)

    path: str
    sha256: str
    source: str
    random_init: bool
    arch: str


@dataclass(frozen=True)
class _Source:
    """A resolved weights URI: how to read its bytes and what digest they must have."""

    key: str  # index key: the URI, with a registry alias pinned to the version it points at
    expected: str | None  # full sha256, when the config or the registry gives one
    prefix: str | None  # leading hex digits promised by a torch.hub-style file name
    chunks: Callable[[], Iterator[bytes]]
    pinned_by: str = "weights.sha256"  # who promised ``expected``, for the error message


def fetch_weights(cfg: WeightsConfig, arch: str, *, backoff_s: float = 0.5) -> FetchedWeights:
    """Fetch, verify and cache the weights ``cfg.uri`` names for ``arch``.

    A cached file with the expected digest is re-hashed and reused without a request. Network
    errors are retried ``cfg.attempts`` times, sleeping ``backoff_s * 2**n`` between attempts; a
    digest mismatch or a missing object is raised at once as :class:`WeightsError`. When the source
    stays unreachable, ``cfg.on_unavailable`` decides: raise :class:`WeightsUnavailable`, or build
    a seeded random initialisation of ``arch`` and say so in a warning.
    """
    _check_arch(cfg.uri, arch)
    cache = cache_dir("weights")
    try:
        path, digest = _with_retries(
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


def _check_arch(uri: str, arch: str) -> None:
    """Refuse torchvision weights made for another architecture before downloading them."""
    if uri.startswith("torchvision:"):
        weights_arch = uri.split(":", 1)[1].split(".", 1)[0]
        if weights_arch != arch:
            raise WeightsError(
                f"{uri!r} holds {weights_arch} weights but the model is {arch}. Fix: use "
                f"torchvision:{arch}.<WEIGHTS> or change finetune.arch."
            )


def _with_retries(action: Callable[[], T], uri: str, attempts: int, backoff_s: float) -> T:
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


def _fetch_once(cfg: WeightsConfig, cache: Path) -> tuple[Path, str]:
    """One attempt: resolve the URI, reuse the cache if it can, else download and verify."""
    source = _resolve(cfg)
    hit = _cache_lookup(cache, source)
    if hit is not None:
        return hit
    log.info("downloading weights from %s", redact(cfg.uri))
    tmp, digest = _stream_to_temp(source.chunks(), cache)
    try:
        _verify(cfg.uri, digest, source)
        path = cache / f"{digest}.pth"
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _index_put(cache, source.key, digest)
    log.info("weights from %s cached at %s (sha256 %s)", redact(cfg.uri), path, digest)
    return path, digest


# ---------------------------------------------------------------------------- resolving URIs


def _resolve(cfg: WeightsConfig) -> _Source:
    """Turn ``cfg.uri`` into a readable source; the registry is asked here for models:/ URIs."""
    uri = cfg.uri
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme in ("torchvision", "http", "https"):
        url = resolve_torchvision_uri(uri) if scheme == "torchvision" else uri
        return _Source(uri, cfg.sha256, digest_prefix(url),
                       lambda: _http_chunks(url, cfg.timeout_s))
    if scheme == "s3":
        return _Source(uri, cfg.sha256, digest_prefix(uri), lambda: _s3_chunks(uri))
    if scheme == "file":
        path = _file_path(uri)
        return _Source(uri, cfg.sha256, digest_prefix(path.name), lambda: _file_chunks(path))
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
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise WeightsError(f"{uri!r} names host {parsed.netloc!r}. Fix: use file:///abs/path.")
    return Path(urllib.request.url2pathname(parsed.path))


def _registry_source(uri: str, expected: str | None) -> _Source:
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
        return _Source(pinned, expected, None, lambda: _registry_chunks(pinned, location, store))
    return _Source(pinned, tagged.lower(), None, lambda: _registry_chunks(pinned, location, store),
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
        if exc.code >= 500 or exc.code in _HTTP_TRANSIENT:
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
    if code in _S3_TRANSIENT or status >= 500:
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
    if code in _MLFLOW_TRANSIENT:
        return _Transient(f"MLflow {code}: {exc}")
    return WeightsError(f"cannot resolve {uri} in the MLflow registry at {tracking_uri()} "
                        f"({code}): {str(exc).rstrip('.')}. Fix: check the model name, version "
                        "or alias, or MLFLOW_TRACKING_URI.")


# ---------------------------------------------------------------------------- cache and digests


def _stream_to_temp(chunks: Iterator[bytes], cache: Path) -> tuple[Path, str]:
    """Write ``chunks`` to a temporary file in the cache, hashing them on the way."""
    fd, name = tempfile.mkstemp(dir=cache, prefix=".partial-", suffix=".pth")
    tmp = Path(name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, digest.hexdigest()


def _verify(uri: str, actual: str, source: _Source) -> None:
    """Raise :class:`WeightsError` unless ``actual`` is the digest the source promised."""
    expected, prefix = source.expected, source.prefix
    if expected is not None and actual != expected:
        fix = (f"if the file was replaced on purpose and you trust it, set weights.sha256={actual}"
               if source.pinned_by == "weights.sha256"
               else f"register the intended weights again or correct {source.pinned_by}")
        raise WeightsError(
            f"sha256 mismatch for {uri}: expected {expected} ({source.pinned_by}), got {actual}. "
            f"Fix: {fix}; otherwise point weights.uri at the original file."
        )
    if expected is None and prefix is not None and not actual.startswith(prefix):
        raise WeightsError(
            f"sha256 mismatch for {uri}: its file name promises a digest starting with {prefix}, "
            f"got {actual}. Fix: the download is corrupt or the file was renamed; point "
            "weights.uri at the original file, or set weights.sha256 to the full digest you trust."
        )


def _cache_lookup(cache: Path, source: _Source) -> tuple[Path, str] | None:
    """The cached file for ``source`` if its digest is known and it still has that digest."""
    digest = source.expected
    if digest is None:
        digest = _read_index(cache).get(source.key)
        # An index entry that breaks the file name's promise is stale: download and verify.
        if digest is None or (source.prefix is not None and not digest.startswith(source.prefix)):
            return None
    path = cache / f"{digest}.pth"
    if not path.is_file():
        return None
    actual = file_sha256(path)
    if actual != digest:
        log.warning("cached weights %s are damaged (sha256 %s); downloading again", path, actual)
        path.unlink(missing_ok=True)
        return None
    log.info("weights for %s found in the cache: %s", redact(source.key), path)
    return path, digest


def _read_index(cache: Path) -> dict[str, str]:
    try:
        data = json.loads((cache / _INDEX).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.warning("ignoring unreadable weights cache index %s", cache / _INDEX)
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _index_put(cache: Path, key: str, digest: str) -> None:
    """Record ``key -> digest``, replacing the index atomically so readers never see half of it."""
    index = _read_index(cache)
    index[key] = digest
    fd, name = tempfile.mkstemp(dir=cache, prefix=".index-", suffix=".json")
    with os.fdopen(fd, "w") as out:
        json.dump(index, out, indent=1, sort_keys=True)
    os.replace(name, cache / _INDEX)


def random_init(arch: str, cache: Path, reason: str) -> FetchedWeights:
    """A seeded random initialisation of ``arch``, saved to the cache under its digest."""
    log.warning("RANDOM INIT: pretrained weights unavailable (%s); %s starts from a random "
                "initialisation (seed 0), so expect much lower accuracy", redact(reason), arch)
    try:
        # fork_rng leaves the caller's random stream as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = torchvision.models.get_model(arch, weights=None)
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


# ---------------------------------------------------------------------------- loading


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
