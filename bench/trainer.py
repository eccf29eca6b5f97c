"""Trainer overhead against a plain PyTorch loop, the frozen-feature cache, and the whole run.

    python bench/trainer.py            # everything (`make bench`), a few minutes on 2 cores
    python bench/trainer.py --smoke    # tiny sizes, no whole run: checks that it works

Ours and the plain loop run alternately in this one process on the same model, data, batch
size, precision and threads, in ABBA rounds; each ratio is the median of the rounds' ratios.
The whole run is ``make run``'s command, twice on one new state folder. The last line is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from visionpipe.config import DataConfig, FastPathConfig
from visionpipe.data import build_loader, load_split, normalize, prepare_dataset
from visionpipe.models import build_googlenet, build_backbone, set_trainable, train_mode
from visionpipe.training.fastpath import resolve_fast_path
from visionpipe.training.loop import apply_fast_path, train_one_epoch, warmup_cosine

REPO = Path(__file__).resolve().parents[1]


def plain_train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                          data_loader: DataLoader, device: torch.device, aux_weight: float) -> int:
    """The loop a user writes, after torchvision's references/classification train_one_epoch."""
    seen = 0
    for image, target in data_loader:
        image, target = normalize(image).to(device), target.to(device)
        output = model(image)
        if isinstance(output, tuple):  # GoogLeNet in training: main and auxiliary logits
            logits, aux2, aux1 = output
            loss = criterion(logits, target) + aux_weight * (criterion(aux1, target) + criterion(aux2, target))
        else:
            logits, loss = output, criterion(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        acc1 = (logits.argmax(1) == target).float().mean().item()  # the reference logs these
        loss.item(), acc1
        seen += target.shape[0]
    return seen


def compare(name: str, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int,
            rounds: int, aux_weight: float, frozen_backbone: bool) -> float:
    """Ours over the plain loop in images/s: the median of the ratios of ABBA rounds."""
    device = torch.device("cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    plain_loader = DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=True)

    def ours() -> int:
        train_mode(model)
        batches = build_loader(images, labels, batch, shuffle=True, augment=False, seed=0)
        scheduler = warmup_cosine(optimizer, 1000, 0)
        return train_one_epoch(model, batches, optimizer, scheduler, criterion, device, aux_weight).count

    def plain() -> int:
        model.train()
        if frozen_backbone:  # what a careful user does for a frozen backbone
            model.eval()
            model.fc.train()
        return plain_train_one_epoch(model, criterion, optimizer, plain_loader, device, aux_weight)

    ours(), plain()  # warm-up: oneDNN primitives, allocator
    medians, ratio, ratios, faults = abba_rounds(ours, plain, rounds)
    print(f"{name:<10} ours {medians[0]:7.1f} img/s  plain {medians[1]:7.1f} img/s  "
          f"ratio ours/plain {ratio:.3f} (median of {rounds} rounds: "
          + " ".join(f"{r:.3f}" for r in ratios) + f"); page faults per epoch ours "
          f"{faults[0]:.0f}, plain {faults[1]:.0f}", flush=True)
    return ratio


def abba_rounds(a: Callable[[], int], b: Callable[[], int], rounds: int
                ) -> tuple[tuple[float, float], float, list[float], tuple[float, float]]:
    """Images/s of ``a`` and ``b`` (each returns the images it trained on) in ABBA rounds.

    This shared VM's speed drifts by several percent within a minute. Each round is an ABBA
    block (a, b, b, a; the next round BAAB), which cancels a steady drift within the round.
    Returns the median rates, the median of the rounds' ratios a/b, those ratios, and the
    minor page faults per epoch of each (memory the allocator gave back and touched again).
    """
    rates: tuple[list[float], list[float]] = ([], [])
    faults = [0, 0]
    ratios = []
    for round_ in range(rounds):
        order = ((0, a), (1, b))[:: 1 if round_ % 2 == 0 else -1]
        seconds, count = [0.0, 0.0], [0, 0]
        for key, run in (order[0], order[1], order[1], order[0]):
            start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            count[key] += run()
            seconds[key] += time.perf_counter() - start
            faults[key] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        for key in (0, 1):
            rates[key].append(count[key] / seconds[key])
        ratios.append(rates[0][-1] / rates[1][-1])
    return ((statistics.median(rates[0]), statistics.median(rates[1])), statistics.median(ratios),
            ratios, (faults[0] / (2 * rounds), faults[1] / (2 * rounds)))


def channels_last_speedup(name: str, build: Callable[[], nn.Module], images: torch.Tensor,
                          labels: torch.Tensor, batch: int, rounds: int, aux_weight: float) -> float:
    """Our loop on an NHWC model (the CPU default since 2026-12-01) over the same on NCHW."""
    device = torch.device("cpu")
    criterion = nn.CrossEntropyLoss()

    def trainer(channels_last: bool) -> Callable[[], int]:
        torch.manual_seed(0)
        fast = resolve_fast_path(FastPathConfig(channels_last=channels_last), "cpu")
        model = apply_fast_path(build(), fast)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def epoch() -> int:
            train_mode(model)
            batches = build_loader(images, labels, batch, shuffle=True, augment=False, seed=0)
            return train_one_epoch(model, batches, optimizer, None, criterion, device, aux_weight,
                                   fast_path=fast).count
        return epoch

    nhwc, nchw = trainer(True), trainer(False)
    nhwc(), nchw()  # warm-up
    medians, ratio, ratios, _ = abba_rounds(nhwc, nchw, rounds)
    print(f"{name:<10} channels_last {medians[0]:7.1f} img/s  contiguous {medians[1]:7.1f} img/s  "
          f"speedup {ratio:.3f} (median of {rounds} rounds: "
          + " ".join(f"{r:.3f}" for r in ratios) + ")", flush=True)
    return ratio


def head_cache_speedup(images: torch.Tensor, labels: torch.Tensor, batch: int, rounds: int) -> float:
    """A cached-feature head epoch against one that forwards the frozen backbone."""
    from visionpipe.config import FinetuneConfig
    from visionpipe.training.core import TrainingData
    from visionpipe.training.distributed import DistContext
    from visionpipe.training.finetune import phase_batches

    model = build_backbone("resnet50", 10)
    set_trainable(model, ["fc"])
    device = torch.device("cpu")
    timings = {}
    for cached in (False, True):
        cfg = FinetuneConfig(arch="resnet50", batch_size=batch, cache_frozen_features=cached)
        data = TrainingData(None, cfg.fast, device, splits={"train": (images, labels),
                                                            "val": (images[:batch], labels[:batch])})
        alone = DistContext(0, 0, 1, device, True)
        batches = phase_batches(model, cfg, data, alone)  # the cache is built here, once
        optimizer = torch.optim.SGD(batches.train_model.parameters(), lr=1e-3)
        epochs = []
        for epoch in range(rounds):
            train_mode(model)
            start = time.perf_counter()
            train_one_epoch(batches.train_model, batches.train(epoch), optimizer, None,
                            nn.CrossEntropyLoss(), device)
            epochs.append(time.perf_counter() - start)
        timings[cached] = statistics.median(epochs)
    speedup = timings[False] / timings[True]
    print(f"head epoch: forwarding the backbone {timings[False]:.2f} s, cached features "
          f"{timings[True]:.4f} s, speedup {speedup:.0f}x", flush=True)
    return speedup


def whole_run() -> dict[str, float]:
    """``make run``'s command twice on one new state folder: wall time and the share outside loops.

    The first run is a new machine's (Prefect migrates a new database, the dataset is prepared);
    the second is a nightly run's on a machine that has run before (``second_`` figures).
    """
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "VISIONPIPE_HOME": home, "PREFECT_HOME": f"{home}/prefect"}
        Path(home, "prefect").mkdir()
        for prefix in ("", "second_"):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "flows"], cwd=REPO, env=env, check=True,
                           stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            timings = json.loads(Path(home, "last-run.json").read_text())["timings"]
            loops = timings["loop_seconds"]
            share = 1 - loops / seconds
            print(f"whole run{' (again)' if prefix else ''}: {seconds:.0f} s, of which {loops:.0f} s "
                  f"in training and evaluation loops; outside them (orchestration, tracking, "
                  f"launching): {share:.0%}", flush=True)
            for stage, stage_seconds in sorted(timings["stages"].items(), key=lambda kv: -kv[1]):
                print(f"  {stage:<28} {stage_seconds:6.1f} s")
            figures.update({f"{prefix}run_seconds": seconds, f"{prefix}overhead_share": share})
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, skip the whole run")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as home:
        os.environ["VISIONPIPE_HOME"] = home
        dataset = prepare_dataset(DataConfig(max_per_class=8 if args.smoke else None))
        images, labels = load_split(dataset, "train")
    batch, rounds = (16, 2) if args.smoke else (64, 5)
    n = batch * (2 if args.smoke else 8)  # the same images every round
    images, labels = images[:n], labels[:n]
    print(f"{torch.get_num_threads()} threads, batch {batch}, {n} images per round, "
          f"{rounds} rounds each", flush=True)
    figures = {
        "googlenet_ratio": compare("googlenet", build_googlenet(10, True), images, labels, batch,
                                   rounds, 0.3, frozen_backbone=False),
    }
    head = build_backbone("resnet50", 10)
    set_trainable(head, ["fc"])
    figures["head_ratio"] = compare("head", head, images, labels, batch, rounds, 0.0, True)
    figures["full_ratio"] = compare("full", build_backbone("resnet50", 10), images, labels, batch,
                                    rounds, 0.0, False)
    figures["head_cache_speedup"] = head_cache_speedup(images, labels, batch, max(rounds, 3))
    figures["googlenet_channels_last_speedup"] = channels_last_speedup(
        "googlenet", lambda: build_googlenet(10, True), images, labels, batch, rounds, 0.3)
    figures["full_channels_last_speedup"] = channels_last_speedup(
        "full", lambda: build_backbone("resnet50", 10), images, labels, batch, rounds, 0.0)
    if not args.smoke:
        figures.update(whole_run())
    print(json.dumps({k: round(v, 4) for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
