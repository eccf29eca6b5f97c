"""Our trainer with its GPU fast path against the plain autocast loop, on synthetic data.

    bash bench/gpu.sh           # on one GPU: 224 x 224, batch 256, ResNet-50 (full) and GoogLeNet
    bash bench/gpu.sh --smoke   # anywhere, CPU included: tiny sizes, checks that it all runs

The plain loop is torchvision's reference ``train_one_epoch`` with ``--amp`` (fp16 autocast and
a GradScaler). Ours is ``visionpipe.training.loop.train_one_epoch`` with the resolved fast path
(bf16 autocast, channels_last, cuDNN autotuning, fused optimizer; ``--compile`` adds
torch.compile). Data is synthetic and resident on the device, so both measure the step alone.
Prints images/s and peak memory per model and loop, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from visionpipe.config import FastPathConfig, OptimConfig
from visionpipe.models import build_googlenet, build_resnet
from visionpipe.training.loop import apply_fast_path, build_optimizer, train_one_epoch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_amp(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
              device: torch.device, aux_weight: float) -> Callable[[], int]:
    """The reference loop with --amp: fp16 autocast and a GradScaler."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    criterion = nn.CrossEntropyLoss()

    def run() -> int:
        model.train()
        for image, target in batches:
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                output = model(image)
                if isinstance(output, tuple):  # GoogLeNet: the same auxiliary losses as ours
                    loss = criterion(output[0], target) + aux_weight * (
                        criterion(output[1], target) + criterion(output[2], target))
                else:
                    loss = criterion(output, target)
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return sum(t.shape[0] for _, t in batches)

    return run


def ours(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
         compile_model: bool, aux_weight: float) -> Callable[[], int]:
    fast = FastPathConfig(compile=compile_model).resolve(device.type)
    model = apply_fast_path(model, fast)
    optimizer = build_optimizer([{"params": list(model.parameters()), "lr": 0.01}],
                                OptimConfig(), device)
    train_model = torch.compile(model) if fast.compile else model
    criterion = nn.CrossEntropyLoss()

    def run() -> int:
        model.train()
        return train_one_epoch(train_model, batches, optimizer, None, criterion, device,
                               aux_weight=aux_weight, fast=fast).count

    return run


def images_per_s(run: Callable[[], int], device: torch.device, rounds: int) -> tuple[float, float]:
    run()  # warm-up (and compilation)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        count = run()
        _sync(device)
        rates.append(count / (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return statistics.median(rates), peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size, batch, steps, rounds = (32, 8, 2, 2) if args.smoke else (224, 256, 20, 3)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"{size}x{size}, batch {batch}, {steps} steps x {rounds} rounds", flush=True)
    gen = torch.Generator(device="cpu").manual_seed(0)
    batches = [(torch.randn(batch, 3, size, size, generator=gen).to(device),
                torch.randint(0, 1000, (batch,), generator=gen).to(device)) for _ in range(steps)]
    figures: dict[str, float] = {}
    builders = {"resnet50": lambda: build_resnet("resnet50", 1000),
                "googlenet": lambda: build_googlenet(1000, small_input_stem=False)}
    for name, build in builders.items():
        aux = 0.3 if name == "googlenet" else 0.0
        plain_rate, plain_peak = images_per_s(plain_amp(build().to(device), batches, device, aux), device, rounds)
        our_rate, our_peak = images_per_s(ours(build().to(device), batches, device, args.compile, aux),
                                          device, rounds)
        print(f"{name:<10} plain amp {plain_rate:8.1f} img/s ({plain_peak:.1f} GiB)   ours "
              f"{our_rate:8.1f} img/s ({our_peak:.1f} GiB)   x{our_rate / plain_rate:.2f}", flush=True)
        figures.update({f"{name}_plain_images_per_s": plain_rate, f"{name}_images_per_s": our_rate,
                        f"{name}_speedup": our_rate / plain_rate, f"{name}_peak_gib": our_peak})
    print(json.dumps({k: round(v, 3) for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
