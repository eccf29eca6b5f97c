"""Keep relative paths from manifests and object keys inside the folder they belong to."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from visionpipe.errors import DatasetError


def confined_path(root: Path, relpath: str) -> Path:
    """Join ``relpath`` (posix) to ``root``, refusing absolute paths and ``..`` escapes.

    The check is lexical on purpose: an ImageFolder may hold symlinked images, which a
    ``resolve()`` based check would refuse although the manifest itself is well formed.
    """
    pure = PurePosixPath(relpath)
    if pure.is_absolute() or not pure.parts or "\x00" in relpath:
        raise DatasetError(f"refusing path {relpath!r}: it must be a file path relative to {root}")
    if ".." in pure.parts:
        raise DatasetError(f"refusing path {relpath!r}: '..' would leave {root}")
    return root.joinpath(*pure.parts)
