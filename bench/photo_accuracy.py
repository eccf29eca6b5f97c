"""Accuracy on a photo-like folder from scratch: our two candidates against a plain torchvision loop.

    python bench/photo_accuracy.py            # the benchmark (`make bench`), minutes on 2 cores
    python bench/photo_accuracy.py --smoke    # tiny sizes: checks that it works, figures mean nothing
    python bench/photo_accuracy.py --classes disc,stripes --per-class 300 --epochs 10 \
        --arch resnet18 --batch-size 16              # another folder and budget (docs/photo-accuracy.md)

One folder from ``visionpipe.data.synthetic.make_photo_folder`` (one seed), prepared at 64 px.
The plain baseline is what a user writes with torchvision alone: ResNet-18 from scratch, AdamW
2e-3, random horizontal flips, a fixed number of epochs, the last epoch's weights. Ours are the
library's two candidates, from random initialisation (no weights are reachable offline), with
the photo recipe the folder gets (``auto``: RandomResizedCrop and flips for training, resize and
center crop for evaluation) and their default optimisers and schedules, for as many epochs as
the plain loop. Everyone is scored on the same test split; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.transforms import v2

from visionpipe.config import DataConfig, FinetuneConfig, GoogLeNetConfig
from visionpipe.data import PreparedDataset, load_split, prepare_dataset
from visionpipe.data.synthetic import classes_arg, make_photo_folder
from visionpipe.evaluation import evaluate_checkpoint
from visionpipe.training.distributed import distributed
from visionpipe.training.finetune import finetune
from visionpipe.training.worker import WorkerJob, train_googlenet
from visionpipe.weights import random_init

# The folder: 6 classes of 100 images. The same budget for all three: 20 passes over the
# training split (the fine-tune from random init has no head phase: it trains everything for 20
# epochs), about 7 minutes on 2 idle cores.
FULL = {"per_class": 100, "plain_epochs": 20,
        "finetune": {"arch": "resnet50", "phases": [
            {"name": "full", "trainable": ["*"], "epochs": 20, "lr": 2e-3, "warmup_epochs": 0.5}]},
        "googlenet": {"epochs": 20}}
SMOKE = {"per_class": 12, "plain_epochs": 1,
         "finetune": {"arch": "resnet18", "batch_size": 16, "scratch_min_steps": 0},
         "googlenet": {"epochs": 1, "batch_size": 16}}


def photo_dataset(root: Path, per_class: int, seed: int = 0, image_size: int = 64,
                  classes: int | list[str] = 6) -> PreparedDataset:
    """The benchmark's folder: ``classes`` (6) of 320 x 240 / 240 x 320 JPEGs, every 8th 1024 x 768."""
    make_photo_folder(root, classes=classes, per_class=per_class, sizes=((320, 240), (240, 320)),
                      large_every=8, seed=seed)
    return prepare_dataset(DataConfig(source=str(root), image_size=image_size))


def plain_top1(dataset: PreparedDataset, epochs: int, batch_size: int = 64, seed: int = 0) -> float:
    """Test top-1 of the loop a user writes with torchvision only (the same split tensors)."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=dataset.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    criterion = nn.CrossEntropyLoss()
    to_float = v2.Compose([v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    flip = v2.RandomHorizontalFlip()
    images, labels = load_split(dataset, "train")  # N x 3 x 64 x 64, uint8
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(labels)).split(batch_size):
            if len(index) < 2:  # BatchNorm cannot train on one image
                continue
            batch = torch.stack([flip(image) for image in images[index]])
            loss = criterion(model(to_float(batch)), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    test_x, test_y = load_split(dataset, "test")
    with torch.no_grad():
        predicted = torch.cat([model(to_float(x)).argmax(1) for x in test_x.split(256)])
    return float((predicted == test_y).float().mean())


def finetune_top1(dataset: PreparedDataset, work: Path, cfg: FinetuneConfig) -> dict[str, Any]:
    """Test top-1 of the fine-tune candidate trained from a random-init backbone."""
    weights = random_init(cfg.arch, _mkdir(work / "weights"), reason="offline benchmark")
    result = finetune(cfg, dataset, Path(weights.path), work / "finetune", random_init=True,
                      weights_sha256=weights.sha256)
    scores = evaluate_checkpoint("finetune", Path(result.best_checkpoint), dataset, 256,
                                 work / "eval", device="cpu")
    return {"top1": scores.metrics["top1"], "epochs": result.epochs_run,
            "best_val_top1": result.best_val_top1, "history": result.history}


def googlenet_top1(dataset: PreparedDataset, work: Path, cfg: GoogLeNetConfig) -> dict[str, Any]:
    """Test top-1 of the GoogLeNet candidate, its worker run as one plain process."""
    out = _mkdir(work / "googlenet")
    job = WorkerJob(config=cfg, dataset=dataset, out_dir=str(out), result_path=str(out / "r.json"))
    with distributed(device="cpu") as ctx:
        result = train_googlenet(job, ctx)
    scores = evaluate_checkpoint("googlenet", Path(result.best_checkpoint), dataset, 256,
                                 work / "eval", device="cpu")
    return {"top1": scores.metrics["top1"], "epochs": result.epochs_run,
            "best_val_top1": result.best_val_top1, "history": result.history}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def sized(smoke: bool, args: argparse.Namespace | None = None) -> dict[str, Any]:
    """The sizes of a run: FULL or SMOKE, with the command line's changes to the folder and budget."""
    sizes: dict[str, Any] = copy.deepcopy(SMOKE if smoke else FULL)
    if args is None:
        return sizes
    if args.per_class:
        sizes["per_class"] = args.per_class
    if args.epochs:
        sizes["plain_epochs"] = sizes["googlenet"]["epochs"] = args.epochs
        for phase in sizes["finetune"].get("phases", []):
            phase["epochs"] = args.epochs
    if args.arch:
        sizes["finetune"]["arch"] = args.arch
    if args.batch_size:
        sizes["plain_batch_size"] = args.batch_size
        sizes["finetune"]["batch_size"] = sizes["googlenet"]["batch_size"] = args.batch_size
    return sizes


def run(smoke: bool = False, seed: int = 0, sizes: dict[str, Any] | None = None,
        classes: int | list[str] = 6, image_size: int = 64) -> dict[str, Any]:
    """Train all three on one generated folder; test top-1 each and ours over the plain one."""
    sizes = sizes or sized(smoke)
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="photo-bench-") as tmp:
        work = Path(tmp)
        dataset = photo_dataset(work / "photos", sizes["per_class"], seed, image_size, classes)
        figures["photo_classes"] = dataset.num_classes
        figures["photo_epochs"] = sizes["plain_epochs"]
        start = time.perf_counter()
        figures["photo_top1_plain"] = plain_top1(dataset, sizes["plain_epochs"],
                                                 sizes.get("plain_batch_size", 64), seed)
        figures["photo_plain_seconds"] = time.perf_counter() - start
        ft = FinetuneConfig.model_validate({**sizes["finetune"], "device": "cpu"})
        start = time.perf_counter()
        figures["photo_top1_finetune"] = finetune_top1(dataset, work, ft)["top1"]
        figures["photo_finetune_seconds"] = time.perf_counter() - start
        gn = GoogLeNetConfig.model_validate(sizes["googlenet"])
        start = time.perf_counter()
        figures["photo_top1_googlenet"] = googlenet_top1(dataset, work, gn)["top1"]
        figures["photo_googlenet_seconds"] = time.perf_counter() - start
    ours = min(figures["photo_top1_finetune"], figures["photo_top1_googlenet"])
    figures["photo_accuracy_vs_plain"] = ours / max(figures["photo_top1_plain"], 1e-9)
    return figures


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check that it runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", type=classes_arg, default=6,
                        help="a number, or names: disc,stripes")
    parser.add_argument("--per-class", type=int, help="images a class (100)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, help="epochs of all three (20; with --smoke, not "
                        "the fine-tune's: it keeps its default phases)")
    parser.add_argument("--arch", help="the fine-tune's backbone (resnet50)")
    parser.add_argument("--batch-size", type=int, help="of all three (64, 64, 32)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.smoke, args.seed, sized(args.smoke, args), args.classes,
                         args.image_size)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
