"""The photo recipe's loader against torchvision's reference loader, images/s to uint8 224 x 224.

    python bench/photo_loader.py           # the measurement (`make bench`), ~4 minutes on 2 cores
    python bench/photo_loader.py --smoke   # tiny sizes: checks that it works

A photo-like ImageFolder of 2,000 JPEGs (500 x 375 and 375 x 500, one in ten 1024 x 768,
quality 85-95) is made in a temporary folder: 400 drawn by ``make_photo_folder`` (one process
per core) and four variants of each (mirrored and/or re-encoded at another quality, so each
file is distinct), because drawing all 2,000 takes longer than the whole benchmark may. Each pass reads
``--images`` of them with 2 workers in batches of 64; its rate counts from the first batch, so
worker start-up is left out for both sides alike. Ours (the first epoch from the originals,
later epochs from the prepared copy, the evaluation transform) and the reference alternate in
ABAB rounds; each ratio is the median of the rounds' ratios. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Iterable
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import v2

from visionpipe.config import DataConfig, PhotoAugmentConfig
from visionpipe.data.photo import PhotoTrainLoader
from visionpipe.data.prepare import PreparedDataset, prepare_dataset
from visionpipe.data.streaming import StreamingLoader
from visionpipe.data.synthetic import make_photo_folder

WORKERS, BATCH, SIZE = 2, 64, 224
H200_IMAGES_PER_S = 4_700  # what one H200 trains ResNet-50 at (docs/benchmarks.md)


def _draw(root: Path, per_class: int, seed: int) -> None:
    make_photo_folder(root, classes=4, per_class=per_class, large_every=10, specials=False,
                      seed=seed)


def make_folder(root: Path, drawn: int, variants: int, processes: int = WORKERS) -> int:
    """``drawn`` photo-like images and ``variants`` distinct copies of each; the file count.

    Drawn by ``processes`` processes, one per core (each into its own folder, then merged by
    class)."""
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_draw, [root / f"part{k}" for k in range(processes)],
                      [drawn // (4 * processes)] * processes, range(processes)))
    for part in range(processes):
        for path in sorted((root / f"part{part}").rglob("*.jpg")):
            (root / path.parent.name).mkdir(exist_ok=True)
            path.rename(root / path.parent.name / f"p{part}_{path.name}")
        shutil.rmtree(root / f"part{part}")
    rng = random.Random(0)
    for path in sorted(root.rglob("*.jpg")):
        with Image.open(path) as img:
            img.load()
            qualities = rng.sample(range(85, 96), variants)  # distinct bytes for each variant
            for k, quality in enumerate(qualities):
                variant = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if k % 2 == 0 else img
                variant.save(path.with_name(f"{path.stem}_v{k}.jpg"), quality=quality)
    return sum(1 for _ in root.rglob("*.jpg"))


def reference_loader(root: Path, train: bool, indices: list[int]) -> DataLoader:
    """torchvision's references/classification loader: ImageFolder, PIL, its presets."""
    # presets.py's default backend, "pil": crop and resize the PIL image, then PILToTensor
    # (its ToDtype/Normalize are left out: the batches stay uint8, as ours).
    steps = ([v2.RandomResizedCrop(SIZE, antialias=True), v2.RandomHorizontalFlip()] if train
             else [v2.Resize(256, antialias=True), v2.CenterCrop(SIZE)])
    transform = v2.Compose([*steps, v2.PILToTensor()])
    dataset = torchvision.datasets.ImageFolder(str(root), transform=transform)
    return DataLoader(Subset(dataset, indices), batch_size=BATCH, shuffle=train,
                      num_workers=WORKERS, persistent_workers=True)


def ours_train(prepared: PreparedDataset, use_copy: bool, indices: list[int]) -> DataLoader:
    """The uint8 batches of our photo training loader (normalisation happens on the device)."""
    loader = PhotoTrainLoader(prepared, BATCH, augment=PhotoAugmentConfig(), seed=0,
                              device=torch.device("cpu"), sampler=indices, num_workers=WORKERS,
                              use_copy=use_copy)
    assert loader.from_copy == use_copy
    return loader.loader


def ours_eval(prepared: PreparedDataset, indices: list[int]) -> DataLoader:
    """The uint8 batches of our evaluation transform, streamed by workers."""
    return StreamingLoader(prepared, "train", BATCH, shuffle=False, augment=False, seed=0,
                           device=torch.device("cpu"), sampler=indices, num_workers=WORKERS).loader


def images_per_s(batches: Iterable[object]) -> float:
    """The rate of one pass, from its first batch on."""
    count, start = 0, 0.0
    for index, (images, _) in enumerate(batches):  # type: ignore[misc]
        assert images.dtype == torch.uint8 and tuple(images.shape[1:]) == (3, SIZE, SIZE)
        if index == 0:
            start = time.perf_counter()
        else:
            count += len(images)
    return count / (time.perf_counter() - start)


def alternate(pairs: dict[str, tuple[Iterable[object], Iterable[object]]], rounds: int
              ) -> dict[str, dict[str, float]]:
    """Each pair (ours, reference) in ABAB rounds: the median ratio and both median rates."""
    rates: dict[str, dict[str, list[float]]] = {k: {"ours": [], "ref": []} for k in pairs}
    for _ in range(rounds):
        for name, (ours, ref) in pairs.items():
            rates[name]["ours"].append(images_per_s(ours))
            rates[name]["ref"].append(images_per_s(ref))
    return {name: {"ratio": statistics.median(o / r for o, r in zip(v["ours"], v["ref"])),
                   "ours": statistics.median(v["ours"]), "ref": statistics.median(v["ref"])}
            for name, v in rates.items()}


def run(drawn: int = 400, variants: int = 4, images: int = 640, rounds: int = 5) -> dict[str, float]:
    """Make the folder, prepare it (the prepared copy included), time the loaders."""
    torch.set_num_threads(1)  # the workers are the cores; the main process only gathers
    tmp = Path(tempfile.mkdtemp(prefix="vp-photo-bench-"))
    os.environ["VISIONPIPE_HOME"] = str(tmp / "home")
    try:
        files = make_folder(tmp / "photos", drawn, variants)
        start = time.perf_counter()
        prepared = prepare_dataset(DataConfig(source=str(tmp / "photos"), image_size=SIZE,
                                              recipe="photo", val_fraction=0.05, test_fraction=0.05))
        prepare_s = time.perf_counter() - start
        count = prepared.split_counts["train"]
        indices = random.Random(1).sample(range(count), min(images, count))
        ref_train = reference_loader(tmp / "photos", True, indices)
        results = alternate({
            "train_copy": (ours_train(prepared, True, indices), ref_train),
            "train_first": (ours_train(prepared, False, indices), ref_train),
            "eval": (ours_eval(prepared, indices), reference_loader(tmp / "photos", False, indices)),
        }, rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _summary(results, files, len(indices), rounds, prepare_s)


def _summary(results: dict[str, dict[str, float]], files: int, images: int, rounds: int,
             prepare_s: float) -> dict[str, float]:
    per_core = results["train_copy"]["ours"] / WORKERS
    ref_per_core = results["train_copy"]["ref"] / WORKERS
    return {
        "photo_loader_ratio": round(results["train_copy"]["ratio"], 2),
        "photo_first_epoch_ratio": round(results["train_first"]["ratio"], 2),
        "photo_eval_loader_ratio": round(results["eval"]["ratio"], 2),
        "photo_images_per_s_per_core": round(per_core, 1),
        "photo_reference_images_per_s_per_core": round(ref_per_core, 1),
        "photo_first_epoch_images_per_s": round(results["train_first"]["ours"], 1),
        "photo_eval_images_per_s": round(results["eval"]["ours"], 1),
        "photo_reference_eval_images_per_s": round(results["eval"]["ref"], 1),
        "photo_cores_for_h200": round(H200_IMAGES_PER_S / per_core, 1),
        "photo_reference_cores_for_h200": round(H200_IMAGES_PER_S / ref_per_core, 1),
        "photo_prepare_seconds": round(prepare_s, 1),
        "photo_files": files, "photo_images_per_pass": images, "photo_rounds": rounds,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it works")
    args = parser.parse_args(argv)
    options: dict[str, int] = ({"drawn": 48, "variants": 3, "images": 192, "rounds": 1}
                               if args.smoke else {})
    print(json.dumps(run(**options)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
