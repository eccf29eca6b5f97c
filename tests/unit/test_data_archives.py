"""Archives cannot write outside their target directory."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from visionpipe.data import DatasetError
from visionpipe.data.archives import safe_extract_tar


def _tar(path: Path, members: list[tuple[str, bytes | None, str | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                info.size = len(data or b"")
                tar.addfile(info, io.BytesIO(data or b""))
    return path


def test_a_normal_archive_is_extracted(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "ok.tgz", [("data/a.txt", b"hello", None)])
    safe_extract_tar(archive, tmp_path / "out")
    assert (tmp_path / "out" / "data" / "a.txt").read_bytes() == b"hello"


@pytest.mark.parametrize("member", [
    ("../evil.txt", b"x", None),
    ("data/../../evil.txt", b"x", None),
    ("/tmp/evil-absolute.txt", b"x", None),
    ("data/link", None, "/etc/passwd"),
    ("data/link", None, "../../outside"),
])
def test_members_leaving_the_target_are_refused_and_nothing_is_written(
    tmp_path: Path, member: tuple[str, bytes | None, str | None]
) -> None:
    archive = _tar(tmp_path / "bad.tgz", [("data/first.txt", b"ok", None), member])
    with pytest.raises(DatasetError, match="leaves the target directory"):
        safe_extract_tar(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()
