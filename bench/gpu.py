"""Our trainer with its GPU fast path against the plain autocast loop, on synthetic data.

    bash bench/gpu.sh           # on one GPU: 224 x 224, batch 256, ResNet-50 (full) and GoogLeNet
    bash bench/gpu.sh --smoke   # anywhere, CPU included: tiny sizes, checks that it all runs

The plain loop is torchvision's reference ``train_one_epoch`` with ``--amp`` (fp16 autocast and
a GradScaler). Ours is ``visionpipe.training.loop.train_one_epoch`` with the resolved fast path
(bf16 autocast, channels_last, cuDNN autotuning, fused optimizer; ``--compile`` adds
torch.compile). Data is synthetic and resident on the device, so both measure the step alone.
Prints images/s and peak memory per model and loop, then one JSON line.

The large-dataset path is measured too: a folder of synthetic JPEGs (500 x 375, as ImageNet's
typical photo) streamed at 224 x 224 by DataLoader workers decoding on the CPU, against the
same stream decoded on the GPU (``decode_on_device``, nvjpeg); loader alone, no model.
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


def jpeg_stream_rates(count: int, size: int, batch: int, device: torch.device,
                      workers: int) -> dict[str, float]:
    """Images/s of the streaming loader over ``count`` synthetic JPEGs, CPU vs device decoding."""
    import os
    import tempfile
    from pathlib import Path

    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["VISIONPIPE_HOME"] = str(Path(tmp) / "home")
        from visionpipe.config import DataConfig
        from visionpipe.data import prepare_dataset
        from visionpipe.data.streaming import StreamingLoader

        rng = np.random.default_rng(0)
        base = rng.integers(0, 256, (375 // 8, 500 // 8, 3), dtype=np.uint8)
        for i in range(count):  # smooth photos-like content compresses like photos do
            image = Image.fromarray(np.roll(base, i, axis=1)).resize((500, 375))
            folder = Path(tmp) / "images" / f"class{i % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i}.jpg", quality=90)
        dataset = prepare_dataset(DataConfig(source=str(Path(tmp) / "images"), image_size=size,
                                             min_per_class=3, val_fraction=0.05, test_fraction=0.05))
        rates = {}
        for name, on_device in (("cpu_decode", False), ("device_decode", True)):
            stream = StreamingLoader(dataset, "train", batch, shuffle=True, augment=False, seed=0,
                                     device=device, num_workers=workers, decode_on_device=on_device)

            def one_pass(stream: StreamingLoader = stream) -> int:
                return sum(len(y) for _, y in stream)

            rates[f"jpeg_stream_{name}_images_per_s"] = images_per_s(one_pass, device, 2)[0]
        return rates


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
    count, jpeg_batch = (48, 8) if args.smoke else (4096, 256)
    stream_rates = jpeg_stream_rates(count, size, jpeg_batch, device,
                                     workers=1 if args.smoke else 12)
    for name, rate in stream_rates.items():
        print(f"{name:<40} {rate:8.1f} img/s", flush=True)
    figures.update(stream_rates)
    print(json.dumps({k: round(v, 3) for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
