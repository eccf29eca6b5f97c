"""Archive extraction that refuses members leaving the target directory."""

from __future__ import annotations

import tarfile
from pathlib import Path

from visionpipe.errors import DatasetError


def safe_extract_tar(archive: Path, target: Path) -> None:
    """Extract ``archive`` into ``target``; a member that would land outside it is refused.

    Every member is checked before anything is written, so a hostile archive leaves nothing
    behind; tarfile's ``data`` filter then also drops device files and unsafe links and modes.
    """
    target = target.resolve()
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in members:
            destination = (target / member.name).resolve()
            escapes = not destination.is_relative_to(target)
            if member.issym() or member.islnk():
                link = (destination.parent / member.linkname).resolve()
                escapes = escapes or not link.is_relative_to(target) or Path(member.linkname).is_absolute()
            if escapes:
                raise DatasetError(f"archive {archive} has a member that leaves the target "
                                   f"directory ({member.name!r}); refusing to extract it")
        target.mkdir(parents=True, exist_ok=True)
        tar.extractall(target, members=members, filter="data")
