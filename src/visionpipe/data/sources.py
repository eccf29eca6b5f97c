"""Turn a ``DataConfig.source`` into image files on local disk, laid out as an ImageFolder.

Every source ends up as ``<root>/<class>/<...>/<file>``: bundled digits and CIFAR-10 are written
as PNGs under the cache, an S3 prefix is mirrored into the cache, and a local directory is used
where it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from visionpipe.errors import DatasetError
from visionpipe.data.paths import confined_path
from visionpipe.data.s3 import list_objects, parse_s3_uri, s3_client
from visionpipe.data.s3_sync import sync_objects
from visionpipe.settings import cache_dir

if TYPE_CHECKING:
    from torchvision.datasets import CIFAR10

log = logging.getLogger(__name__)

SourceKind = Literal["digits", "cifar10", "s3", "dir"]


@dataclass(frozen=True)
class SourceFile:
    """One candidate image: where it lies under the root, and where it came from."""

    relpath: str  # posix, relative to the root; the first segment is the class
    source: str  # absolute local path or s3://bucket/key

    @property
    def class_name(self) -> str:
        """The first-level folder the file sits in."""
        return self.relpath.split("/", 1)[0]


@dataclass(frozen=True)
class Materialized:
    """A source on local disk: the ImageFolder root and the files chosen from it."""

    root: Path
    files: list[SourceFile]


def source_kind(source: str) -> SourceKind:
    """Classify a ``DataConfig.source`` string."""
    if source in ("digits", "cifar10"):
        return source  # type: ignore[return-value]
    if source.startswith("s3://"):
        return "s3"
    if Path(source).expanduser().is_dir():
        return "dir"
    raise DatasetError(
        f"data.source {source!r} is not 'digits', 'cifar10', s3://bucket/prefix or an existing "
        "directory. Fix: point it at an ImageFolder (<dir>/<class>/<image>)."
    )


def sources_root() -> Path:
    """Where downloaded or generated source images are kept (inside the datasets cache)."""
    return cache_dir("datasets") / "_sources"


def materialize_source(
    source: str, max_per_class: int | None = None, seed: int = 0
) -> Materialized:
    """Make ``source`` available as local files and choose at most ``max_per_class`` per class."""
    kind = source_kind(source)
    if kind == "s3":
        return _materialize_s3(source, max_per_class, seed)
    if kind == "dir":
        root = Path(source).expanduser().resolve()
    else:
        root = sources_root() / kind
        (_write_digits if kind == "digits" else _write_cifar10)(root)
    return Materialized(root, select_per_class(list_image_folder(root), max_per_class, seed))


def select_per_class(
    files: Iterable[SourceFile], max_per_class: int | None, seed: int
) -> list[SourceFile]:
    """Keep at most ``max_per_class`` files per class, the same ones whatever the listing order.

    The files of a class are ranked by a hash of the seed, the class and the file's path, and
    the first ``max_per_class`` kept: a file added to or removed from the source changes at most
    one other file's place in the selection (a seeded sample of the whole list would change it
    entirely, and with it the dataset version and its splits).
    """
    by_class: dict[str, list[SourceFile]] = defaultdict(list)
    for file in sorted(files, key=lambda f: f.relpath):
        by_class[file.class_name].append(file)
    chosen: list[SourceFile] = []
    for name, group in sorted(by_class.items()):
        if max_per_class is not None and len(group) > max_per_class:
            group = sorted(group, key=lambda f: hashlib.sha256(
                f"{seed}/{name}/{f.relpath}".encode()).digest())[:max_per_class]
        chosen.extend(group)
    return sorted(chosen, key=lambda f: f.relpath)


def _walk_files(root: Path) -> Iterable[tuple[str, Path]]:
    """(posix relative path, path) of every non-hidden file below ``root``'s class folders."""
    for folder, dirs, names in os.walk(root):
        # Hidden entries are editor litter, .DS_Store or our own partial downloads.
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_folder = Path(folder).relative_to(root).as_posix()
        for name in sorted(n for n in names if not n.startswith(".")):
            if rel_folder == ".":
                log.warning("ignoring %s: files must sit in a class folder", Path(folder, name))
                continue
            yield f"{rel_folder}/{name}", Path(folder, name)


def list_image_folder(root: Path) -> list[SourceFile]:
    """Every candidate file of an ImageFolder; the class is the first-level subfolder."""
    return [SourceFile(rel, str(path)) for rel, path in _walk_files(root)]


def listing_fingerprint(source: str) -> str:
    """A cheap description of the source's content, without reading any file."""
    kind = source_kind(source)
    if kind == "digits":
        import sklearn

        return f"digits:sklearn={sklearn.__version__}"
    if kind == "cifar10":
        return "cifar10:v1"  # the archive torchvision downloads is checked by its own md5
    if kind == "dir":
        root = Path(source).expanduser().resolve()
        entries = [(rel, p.stat().st_size, p.stat().st_mtime_ns) for rel, p in _walk_files(root)]
    else:
        bucket, prefix = parse_s3_uri(source)
        objects = list_objects(s3_client(), bucket, prefix)
        entries = sorted((o["Key"], o["Size"], o.get("ETag", "")) for o in objects)
    return hashlib.sha256(json.dumps([kind, entries]).encode()).hexdigest()


def _materialize_s3(uri: str, max_per_class: int | None, seed: int) -> Materialized:
    """Mirror the chosen objects of an S3 ImageFolder into the cache."""
    bucket, prefix = parse_s3_uri(uri)
    client = s3_client()
    root = sources_root().joinpath("s3", bucket, *prefix.split("/") if prefix else ())
    by_rel = _objects_by_relpath(list_objects(client, bucket, prefix), prefix, root)
    files = [SourceFile(rel, f"s3://{bucket}/{obj['Key']}") for rel, obj in by_rel.items()]
    files = select_per_class(files, max_per_class, seed)
    stats = sync_objects(client, bucket, root, [(f.relpath, by_rel[f.relpath]) for f in files])
    log.info("s3://%s/%s: %d downloaded, %d reused from %s",
             bucket, prefix, stats.downloaded, stats.reused, root)
    return Materialized(root, files)


def _objects_by_relpath(
    objects: Sequence[dict[str, Any]], prefix: str, root: Path
) -> dict[str, dict[str, Any]]:
    """Key each object by its path below the prefix, refusing keys that would escape."""
    folder = f"{prefix}/" if prefix else ""
    by_rel: dict[str, dict[str, Any]] = {}
    for obj in objects:
        key: str = obj["Key"]
        if not key.startswith(folder):
            raise DatasetError(f"refusing S3 key {key!r}: it is outside the prefix {prefix!r}")
        rel = key[len(folder):]
        confined_path(root, rel)  # raises on '..' before anything is written
        if "/" not in rel or any(part.startswith(".") for part in rel.split("/")):
            log.warning("ignoring s3 key %s: not a visible file inside a class folder", key)
            continue
        by_rel[rel] = obj
    return by_rel


def _write_png(img: Image.Image, path: Path) -> None:
    """Write a PNG under a temporary name first, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def _write_digits(root: Path) -> None:
    """sklearn's bundled 8x8 digits as gray PNGs, ``<root>/<digit>/<index>.png``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # N x 8 x 8, 0..16 -> 0..255
    for index, (image, target) in enumerate(zip(pixels, digits.target, strict=True)):
        path = root / str(int(target)) / f"{index:04d}.png"
        if not path.exists():
            _write_png(Image.fromarray(image), path)


def official_test_split(source: str) -> Callable[[str], bool] | None:
    """Which files of ``source`` form its official test set (a manifest path in, yes or no);
    None for a source without one. CIFAR-10's test files are written as ``test_<index>.png``."""
    if source_kind(source) == "cifar10":
        return lambda relpath: relpath.rsplit("/", 1)[-1].startswith("test_")
    return None


def _write_cifar10(root: Path) -> None:
    """CIFAR-10's train and test sets as PNGs, ``<root>/<class>/<split>_<index>.png``."""
    done = root / ".complete"
    if done.exists():
        return
    for split in ("train", "test"):
        dataset = _download_cifar10(root.parent / "cifar10-download", train=split == "train")
        for index, (image, target) in enumerate(zip(dataset.data, dataset.targets, strict=True)):
            path = root / dataset.classes[target] / f"{split}_{index:05d}.png"
            if not path.exists():
                _write_png(Image.fromarray(image), path)
    done.touch()


def _download_cifar10(folder: Path, train: bool) -> CIFAR10:
    """torchvision's CIFAR10, downloaded on first use (checked md5) and extracted safely."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity, download_url

    from visionpipe.data.archives import safe_extract_tar

    try:
        archive = folder / CIFAR10.filename
        if not check_integrity(str(archive), CIFAR10.tgz_md5):
            download_url(CIFAR10.url, str(folder), CIFAR10.filename, CIFAR10.tgz_md5)
        # torchvision's own extraction has no path filter: extract with ours instead.
        if not (folder / CIFAR10.base_folder).is_dir():
            safe_extract_tar(archive, folder)
        return CIFAR10(str(folder), train=train, download=False)
    except (OSError, RuntimeError) as exc:
        raise DatasetError(
            f"could not download CIFAR-10 into {folder} ({exc}); is there no internet access? "
            "Fix: use data.source='digits' (bundled, offline), or a local or s3:// ImageFolder."
        ) from exc
