"""The photo-like folder generator: the files a real folder holds, and classes that differ."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from visionpipe.data.synthetic import CLASS_NAMES, main, make_photo_folder


def test_folder_holds_each_kind_of_file(tmp_path: Path) -> None:
    paths = make_photo_folder(tmp_path, classes=3, per_class=6, large_every=5, seed=1)
    assert len(paths) == 18
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(CLASS_NAMES[:3])
    first = sorted((tmp_path / CLASS_NAMES[0]).iterdir())
    modes = {p.name: Image.open(p).mode for p in first}
    assert modes[f"{CLASS_NAMES[0]}_0000.png"] == "RGBA"
    assert modes[f"{CLASS_NAMES[0]}_0001.jpg"] == "L"
    assert modes[f"{CLASS_NAMES[0]}_0002.jpg"] == "CMYK"
    rotated = Image.open(first[3])
    assert rotated.getexif()[0x0112] == 6
    assert ImageOps.exif_transpose(rotated).size == (375, 500)  # upright: portrait, as drawn
    sizes = {Image.open(p).size for p in paths}
    assert (1024, 768) in sizes and (500, 375) in sizes


def test_same_seed_same_pixels_and_classes_differ(tmp_path: Path) -> None:
    a = make_photo_folder(tmp_path / "a", classes=2, per_class=2, specials=False, seed=3)
    b = make_photo_folder(tmp_path / "b", classes=2, per_class=2, specials=False, seed=3)
    pixels = [np.asarray(Image.open(p), dtype=np.int16) for p in a]
    assert all(np.array_equal(x, np.asarray(Image.open(q), dtype=np.int16)) for x, q in zip(pixels, b))
    assert not np.array_equal(pixels[0], pixels[2])  # a disc is not a box


def test_classes_by_name_draw_those_shapes(tmp_path: Path) -> None:
    """Names give the folders and shapes of those names; the first n names are the same as n."""
    import pytest

    counted = make_photo_folder(tmp_path / "counted", classes=2, per_class=2, specials=False, seed=4)
    named = make_photo_folder(tmp_path / "named", classes=["disc", "box"], per_class=2,
                              specials=False, seed=4)
    assert [p.relative_to(tmp_path / "named") for p in named] == \
        [p.relative_to(tmp_path / "counted") for p in counted]
    assert all(np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(q)))
               for p, q in zip(counted, named, strict=True))
    # The same draws (place, size, colours) as the first disc, but a box where the disc was.
    (box,) = make_photo_folder(tmp_path / "box", classes=["box"], per_class=1, specials=False,
                               seed=4)
    assert box.parent.name == "box"
    assert not np.array_equal(np.asarray(Image.open(box)), np.asarray(Image.open(counted[0])))
    with pytest.raises(ValueError, match="distinct names among disc, box"):
        make_photo_folder(tmp_path / "bad", classes=["disc", "hexagon"], per_class=1)
    # The command line takes either.
    assert main([str(tmp_path / "cli"), "--classes", "ring,box", "--per-class", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["box", "ring"]
    assert main([str(tmp_path / "cli3"), "--classes", "3", "--per-class", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "cli3").iterdir()) == sorted(CLASS_NAMES[:3])
