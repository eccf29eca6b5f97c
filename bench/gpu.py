"""Our trainer with its GPU fast path against the plain autocast loop, in one command.

    bash bench/gpu.sh                     # one GPU: everything below that fits in 7 minutes
    bash bench/gpu.sh --smoke             # anywhere, CPU included: tiny sizes, no compiling
    bash bench/gpu.sh --out figures.json  # also writes every figure there as soon as measured

The plain loop is torchvision's reference ``train_one_epoch`` with ``--amp``: fp16 autocast and
a GradScaler, SGD with momentum, cuDNN autotuning on (the reference's default), ``loss.item()``
and top-1/top-5 accuracy read every step. Ours is ``visionpipe.training.loop.train_one_epoch``
with the resolved fast path: bf16 autocast, channels_last, cuDNN autotuning, fused SGD, sums
kept on the device until the epoch ends.

Sections (each figure is written as soon as it is measured; a section that
fails is recorded as ``<section>_error`` and the next one runs):

1. ``synthetic``: ResNet-50 (full fine-tune) and GoogLeNet (from scratch, auxiliary losses) at
   224 x 224, batch 256, on random batches resident on the GPU: the step alone.
2. ``small``: the digits/CIFAR path at CIFAR-10's shape (32 x 32, 10 classes): the plain loop
   reads a ``DataLoader`` with per-image crop, flip and normalisation in worker processes and
   pinned memory (the usual CIFAR script); ours keeps the uint8 images on the GPU and crops,
   flips and normalises batches there (``data_on_device``, what the pipeline does for digits).
3. ``pipeline``: the library's fine-tune on the bundled digits as ``make run`` trains it (random
   init, 4 epochs of ResNet-50): seconds and validation top-1, to show the fast path learns.
4. ``compile``: ``torch.compile`` of ours in the ``default`` mode (before ``stream``) and the
   ``reduce-overhead`` mode (CUDA graphs, after it) on section 1's data: images/s, compile
   seconds, and the number of images after which compiling has paid for itself.
5. ``photo``: the photo recipe from real JPEGs: ResNet-50 training (full fine-tune, batch 256,
   224 x 224) fed by ``PhotoTrainLoader`` (RandomResizedCrop and flips decoded by DataLoader
   workers, one per core but two) from a generated folder of 500 x 375 / 375 x 500 photo-like
   JPEGs, reading the dataset version's prepared copy as every epoch after the first does:
   images/s against section 1's synthetic figure (``photo_resnet50_vs_synthetic``), and the
   loader alone.
7. ``style``: the style-transfer network (Johnson et al., 32 channels, 5 residual blocks)
   trained against the VGG-16 perceptual loss (random VGG weights: speed only) at 256 x 256,
   batch 16: training images/s (``style_train_images_per_s``).
6. ``stream``: the large-dataset path, 4,096 synthetic 500 x 375 JPEGs streamed at 224 x 224
   by DataLoader workers decoding on the CPU, against decoding on the GPU (nvjpeg); loader only.

Sections 1, 2 and 5 hold the figures the issues ask for and run first, in that order. A compile
measurement, the photo or the stream section starts only if it can end (by its time on an H200,
estimated for the photo section, which has not run on one yet) within ``--budget-s`` seconds of
the start; one that cannot is recorded as ``<name>_skipped``. Peak memory is that of
the timed passes, after the warm-up (cuDNN's autotuning tries workspaces there).
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before torch's import: the device call's time counts from here

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from visionpipe.config import FastPathConfig, OptimConfig  # noqa: E402
from visionpipe.models import build_googlenet, build_backbone  # noqa: E402
from visionpipe.training.fastpath import resolve_fast_path  # noqa: E402
from visionpipe.training.loop import (  # noqa: E402
    apply_fast_path,
    build_optimizer,
    maybe_compile,
    train_one_epoch,
)

# Seconds a compile measurement takes on one H200 (compiling, warm-up and timed passes;
# bench/results): a mode starts only if it can end before the budget.
EXPECTED_COMPILE_S = {"resnet50": 60.0, "googlenet": 130.0}
EXPECTED_STREAM_S = 45.0
EXPECTED_PHOTO_S = 90.0  # an estimate (drawing and preparing the folder, 3 passes): not yet run
EXPECTED_STYLE_S = 30.0  # an estimate: not yet run on a GPU

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


class Figures:
    """Every figure by name, rewritten to ``path`` (if any) after each one."""

    def __init__(self, path: str | None) -> None:
        self.values: dict[str, Any] = {}
        self.path = Path(path) if path else None

    def add(self, **values: Any) -> None:
        self.values.update({k: round(v, 3) if isinstance(v, float) else v for k, v in values.items()})
        if self.path is not None:
            self.path.write_text(json.dumps(self.values, indent=1) + "\n")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _loss(output: Any, target: torch.Tensor, criterion: nn.Module, aux_weight: float) -> torch.Tensor:
    if isinstance(output, tuple):  # GoogLeNet in training: the same auxiliary losses as ours
        return criterion(output[0], target) + aux_weight * (
            criterion(output[1], target) + criterion(output[2], target))
    return criterion(output, target)


def plain_amp(model: nn.Module, batches: Callable[[], Batches], device: torch.device,
              aux_weight: float) -> Callable[[], int]:
    """torchvision's references/classification ``train_one_epoch`` with ``--amp``."""
    torch.backends.cudnn.benchmark = True  # the reference's default (not deterministic)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)
    criterion = nn.CrossEntropyLoss()

    def run() -> int:
        model.train()
        seen = 0
        for image, target in batches():
            image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
                output = model(image)
                loss = _loss(output, target, criterion, aux_weight)
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            logits = output[0] if isinstance(output, tuple) else output
            top5 = logits.topk(min(5, logits.shape[1]), 1).indices.eq(target[:, None])
            acc1, acc5 = top5[:, 0].float().mean() * 100, top5.any(1).float().mean() * 100
            loss.item(), acc1.item(), acc5.item()  # the reference's metric logger reads these
            seen += target.shape[0]
        return seen

    return run


def ours(model: nn.Module, batches: Callable[[], Batches], device: torch.device, aux_weight: float,
         fast_cfg: FastPathConfig | None = None) -> Callable[[], int]:
    """Our step loop with the fast path that the pipeline resolves for this device."""
    fast = resolve_fast_path(fast_cfg or FastPathConfig(), device.type)
    model = apply_fast_path(model, fast)
    optimizer = build_optimizer([{"params": list(model.parameters()), "lr": 0.01}],
                                OptimConfig(), device)
    train_model = maybe_compile(model, fast)
    criterion = nn.CrossEntropyLoss()

    def run() -> int:
        model.train()
        return train_one_epoch(train_model, batches(), optimizer, None, criterion, device,
                               aux_weight=aux_weight, fast_path=fast).count

    return run


def measure(run: Callable[[], int], device: torch.device, rounds: int) -> dict[str, float]:
    """Median images/s over ``rounds`` passes after a warm-up, peak memory, warm-up seconds."""
    start = time.perf_counter()
    run()  # warm-up: cuDNN autotuning, allocator, compilation
    _sync(device)
    first = time.perf_counter() - start
    if device.type == "cuda":  # the timed passes' peak, not autotuning's trial workspaces
        torch.cuda.reset_peak_memory_stats()
    rates, seconds = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        count = run()
        _sync(device)
        seconds.append(time.perf_counter() - start)
        rates.append(count / seconds[-1])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return {"rate": statistics.median(rates), "peak": peak, "first": first,
            "pass": statistics.median(seconds)}


def isolated(build: Callable[[], Callable[[], int]], device: torch.device, rounds: int) -> dict[str, float]:
    """``measure`` a loop built fresh, its peak memory counted from what was allocated before."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**30
    result = measure(build(), device, rounds)
    if device.type == "cuda":
        result["peak"] -= before  # the step's own memory: model, optimizer state, activations
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


MODELS: dict[str, tuple[Callable[[int, bool], nn.Module], float]] = {
    "resnet50": (lambda classes, small: build_backbone("resnet50", classes), 0.0),
    "googlenet": (lambda classes, small: build_googlenet(classes, small_input_stem=small), 0.3),
}


def compare(figures: Figures, prefix: str, name: str, device: torch.device, rounds: int,
            batches: Callable[[], Batches], plain_batches: Callable[[], Batches],
            classes: int, small: bool) -> None:
    build, aux = MODELS[name]
    plain = isolated(lambda: plain_amp(build(classes, small).to(device), plain_batches, device, aux),
                     device, rounds)
    mine = isolated(lambda: ours(build(classes, small).to(device), batches, device, aux), device, rounds)
    speedup = mine["rate"] / plain["rate"]
    print(f"{prefix + name:<18} plain amp {plain['rate']:8.1f} img/s ({plain['peak']:5.1f} GiB)   "
          f"ours {mine['rate']:8.1f} img/s ({mine['peak']:5.1f} GiB)   x{speedup:.2f}", flush=True)
    figures.add(**{f"{prefix}{name}_plain_images_per_s": plain["rate"],
                   f"{prefix}{name}_images_per_s": mine["rate"], f"{prefix}{name}_speedup": speedup,
                   f"{prefix}{name}_plain_peak_gib": plain["peak"], f"{prefix}{name}_peak_gib": mine["peak"]})


def synthetic_batches(device: torch.device, size: int, batch: int, steps: int
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator(device=device).manual_seed(0)
    return [(torch.randn(batch, 3, size, size, generator=gen, device=device),
             torch.randint(0, 1000, (batch,), generator=gen, device=device)) for _ in range(steps)]


def section_synthetic(figures: Figures, device: torch.device, data: list[Any], rounds: int) -> None:
    for name in MODELS:
        compare(figures, "", name, device, rounds, lambda: data, lambda: data, 1000, small=False)


def section_small(figures: Figures, device: torch.device, count: int, batch: int, rounds: int,
                  workers: int, compile_modes: list[str], deadline: float) -> None:
    """The digits/CIFAR path: GPU-resident uint8 images against a DataLoader with CPU transforms."""
    from torch.utils.data import DataLoader, Dataset
    from torchvision.transforms import v2

    from visionpipe.data import build_loader
    from visionpipe.data.images import MEAN, STD

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (count,), generator=gen)

    class Cifar(Dataset[tuple[torch.Tensor, int]]):
        transform = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                                v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])

        def __len__(self) -> int:
            return count

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return self.transform(images[i]), int(labels[i])

    loader = DataLoader(Cifar(), batch_size=batch, shuffle=True, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    on_device = (images.to(device), labels.to(device))

    def resident() -> Batches:
        return build_loader(*on_device, batch, shuffle=True, augment=True, seed=0)

    for name in MODELS:
        compare(figures, "small_", name, device, rounds, resident, lambda: loader, 10, small=True)
    del loader
    for mode in compile_modes:  # small steps leave the host as the limit: CUDA graphs lift it
        for name in MODELS:
            compiled(figures, f"small_{name}", name, mode, device, rounds, resident, 10, True,
                     deadline)


def section_compile(figures: Figures, device: torch.device, data: list[Any], rounds: int,
                    modes: list[str], models: list[str], deadline: float) -> None:
    for name in models:
        for mode in modes:
            compiled(figures, name, name, mode, device, rounds, lambda: data, 1000, False, deadline)


def compiled(figures: Figures, prefix: str, name: str, mode: str, device: torch.device,
             rounds: int, batches: Callable[[], Batches], classes: int, small: bool,
             deadline: float) -> None:
    """Ours compiled in ``mode``: images/s, compile seconds, and, against the eager figure
    ``<prefix>_images_per_s`` measured before, the speed-up and the images it takes to pay."""
    key = f"{prefix}_compile_{mode.replace('-', '_')}"
    if time.perf_counter() + EXPECTED_COMPILE_S.get(name, 0.0) > deadline:
        print(f"{key}: skipped, it would end after the time budget", flush=True)
        figures.add(**{f"{key}_skipped": "time budget"})
        return
    build, aux = MODELS[name]
    cfg = FastPathConfig(compile=True, compile_mode=mode)  # type: ignore[arg-type]
    torch._dynamo.reset()
    try:
        r = isolated(lambda: ours(build(classes, small).to(device), batches, device, aux, cfg),
                     device, rounds)
    except Exception as exc:  # one mode or model failing must not lose the other figures
        figures.add(**{f"{key}_error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        print(f"{key}: {type(exc).__name__}: {exc}"[:500], flush=True)
        return
    compile_s = max(r["first"] - r["pass"], 0.0)  # the warm-up pass less a steady one
    values = {f"{key}_images_per_s": r["rate"], f"{key}_seconds": compile_s,
              f"{key}_peak_gib": r["peak"]}
    line = f"{key:<40} {r['rate']:8.1f} img/s ({r['peak']:.1f} GiB), compiling {compile_s:.0f} s"
    plain = figures.values.get(f"{prefix}_plain_images_per_s")
    if plain:
        values[f"{key}_speedup"] = r["rate"] / plain
        line += f", x{r['rate'] / plain:.2f} over plain amp"
    eager = figures.values.get(f"{prefix}_images_per_s")
    if eager:
        values[f"{key}_speedup_over_eager"] = r["rate"] / eager
        saved = 1 / eager - 1 / r["rate"]  # seconds saved per image
        line += f", x{r['rate'] / eager:.2f} over eager"
        if saved > 0:
            values[f"{key}_break_even_images"] = compile_s / saved
            line += f", pays after {compile_s / saved / 1e6:.2f} M images"
        else:
            line += ": never pays"
    figures.add(**values)
    print(line, flush=True)


def section_pipeline(figures: Figures, device: torch.device, smoke: bool) -> None:
    """The library's own fine-tune on the bundled digits, as ``make run`` trains it (random init)."""
    import tempfile

    from visionpipe.config import DataConfig, FinetuneConfig
    from visionpipe.data import prepare_dataset
    from visionpipe.training.finetune import finetune
    from visionpipe.weights import random_init

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["VISIONPIPE_HOME"] = tmp
        dataset = prepare_dataset(DataConfig(max_per_class=8 if smoke else None))
        cfg = FinetuneConfig(batch_size=16 if smoke else 64)
        (Path(tmp) / "weights").mkdir()
        weights = random_init(cfg.arch, Path(tmp) / "weights", reason="offline benchmark")
        start = time.perf_counter()
        result = finetune(cfg, dataset, Path(weights.path), Path(tmp) / "out", random_init=True,
                          weights_sha256=weights.sha256)
        seconds = time.perf_counter() - start
    print(f"pipeline: digits fine-tune (random init, {result.epochs_run} epochs) in {seconds:.1f} s, "
          f"best val top-1 {result.best_val_top1:.3f}", flush=True)
    figures.add(digits_finetune_seconds=seconds, digits_finetune_val_top1=result.best_val_top1)


def section_photo(figures: Figures, device: torch.device, smoke: bool, workers: int,
                  rounds: int) -> None:
    """ResNet-50 training images/s from a photo folder through the photo recipe's loader."""
    import tempfile

    from photo_loader import make_folder  # bench/, beside this file

    from visionpipe.config import DataConfig, PhotoAugmentConfig
    from visionpipe.data import prepare_dataset
    from visionpipe.data.photo import PhotoTrainLoader

    size, batch = (32, 8) if smoke else (224, 256)
    drawn, variants = (16, 2) if smoke else (1024, 3)  # 4,096 files, 16 steps an epoch
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["VISIONPIPE_HOME"] = str(Path(tmp) / "home")
        start = time.perf_counter()
        files = make_folder(Path(tmp) / "photos", drawn, variants, processes=max(workers, 1))
        dataset = prepare_dataset(DataConfig(source=str(Path(tmp) / "photos"), image_size=size,
                                             recipe="photo", min_per_class=3,
                                             val_fraction=0.05, test_fraction=0.05))
        print(f"photo: {files} JPEGs written and prepared in {time.perf_counter() - start:.0f} s "
              f"(prepared copy at short side {dataset.prepared_short_side})", flush=True)
        loader = PhotoTrainLoader(dataset, batch, augment=PhotoAugmentConfig(), seed=0,
                                  device=device, num_workers=workers, drop_last=True)

        def loader_pass() -> int:
            return sum(len(y) for _, y in loader)

        alone = measure(loader_pass, device, rounds)["rate"]
        build, aux = MODELS["resnet50"]
        trained = isolated(lambda: ours(build(dataset.num_classes, False).to(device),
                                        lambda: loader, device, aux), device, rounds)
        del loader
    values = {"photo_loader_images_per_s": alone, "photo_resnet50_images_per_s": trained["rate"],
              "photo_loader_workers": workers, "photo_files": files,
              "photo_from_prepared_copy": dataset.prepared_short_side is not None}
    line = (f"photo: loader {alone:8.1f} img/s, ResNet-50 training {trained['rate']:8.1f} img/s "
            f"({workers} workers)")
    synthetic = figures.values.get("resnet50_images_per_s")
    if synthetic:
        values["photo_resnet50_vs_synthetic"] = trained["rate"] / synthetic
        line += f", {trained['rate'] / synthetic:.2f} of the synthetic-data rate"
    figures.add(**values)
    print(line, flush=True)


def section_style(figures: Figures, device: torch.device, smoke: bool, rounds: int) -> None:
    """Style network training images/s against the perceptual loss (``visionpipe.style``)."""
    from visionpipe.style.images import make_waves
    from visionpipe.style.loss import LossNetwork, PerceptualLoss
    from visionpipe.style.network import TransformerNet
    import torchvision.transforms.v2.functional as tvf

    size, batch, steps = (32, 2, 2) if smoke else (256, 16, 20)
    layers = ["relu1_2", "relu2_2", "relu3_3", "relu4_3"]
    network = LossNetwork("vgg16", layers).to(device)
    style = (tvf.pil_to_tensor(make_waves(size)).float() / 255).unsqueeze(0).to(device)
    criterion = PerceptualLoss(network, "relu2_2", layers, style, 1e5, 1e10, 1e3)
    net = TransformerNet(4 if smoke else 32, 1 if smoke else 5).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    content = torch.rand(batch, 3, size, size, device=device)

    def run() -> int:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            criterion(net(content), content).total.backward()
            optimizer.step()
        return steps * batch

    result = measure(run, device, rounds)
    figures.add(style_train_images_per_s=result["rate"], style_image_size=size, style_batch=batch)
    print(f"style: training {result['rate']:8.1f} img/s at {size}x{size}, batch {batch}", flush=True)


def section_stream(figures: Figures, device: torch.device, count: int, size: int, batch: int,
                   workers: int) -> None:
    """Images/s of the streaming loader over ``count`` synthetic JPEGs, CPU vs device decoding."""
    import tempfile

    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["VISIONPIPE_HOME"] = str(Path(tmp) / "home")
        from visionpipe.config import DataConfig
        from visionpipe.data import prepare_dataset
        from visionpipe.data.streaming import StreamingLoader

        start = time.perf_counter()
        rng = np.random.default_rng(0)
        base = rng.integers(0, 256, (375 // 8, 500 // 8, 3), dtype=np.uint8)
        for i in range(count):  # smooth, photo-like content compresses as photos do
            small = np.roll(base, i, axis=1)
            small[0, 0] = (i % 256, i // 256 % 256, 0)  # every image unique: no duplicates
            image = Image.fromarray(small).resize((500, 375))
            folder = Path(tmp) / "images" / f"class{i % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i}.jpg", quality=90)
        dataset = prepare_dataset(DataConfig(source=str(Path(tmp) / "images"), image_size=size,
                                             min_per_class=3, val_fraction=0.05, test_fraction=0.05))
        print(f"stream: {count} JPEGs written and prepared in {time.perf_counter() - start:.0f} s",
              flush=True)
        for name, on_device in (("cpu_decode", False), ("device_decode", True)):
            stream = StreamingLoader(dataset, "train", batch, shuffle=True, augment=False, seed=0,
                                     device=device, num_workers=workers, decode_on_device=on_device)

            def one_pass(stream: StreamingLoader = stream) -> int:
                return sum(len(y) for _, y in stream)

            rate = measure(one_pass, device, 2)["rate"]
            print(f"stream {name:<14} {rate:8.1f} img/s ({workers} workers)", flush=True)
            figures.add(**{f"jpeg_stream_{name}_images_per_s": rate})
            del stream


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, no compiling")
    parser.add_argument("--out", help="also write the figures to this JSON file as they come")
    parser.add_argument("--budget-s", type=float, default=420,
                        help="skip the compile modes and the stream section that would end after "
                        "this many seconds from the start (leaves a device call of 8 minutes room)")
    parser.add_argument("--sections", default="synthetic,pipeline,small,compile,photo,style,stream")
    parser.add_argument("--compile-modes", default="default,reduce-overhead",
                        help="the first before the stream section, the rest after it")
    parser.add_argument("--compile-models", default="resnet50,googlenet")
    parser.add_argument("--small-compile-modes", default="reduce-overhead",
                        help="compile modes also measured on the small (digits/CIFAR) path")
    args = parser.parse_args()
    started = STARTED
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke
    if device.type != "cuda" and not smoke:
        print("error: no CUDA device is visible, and the full sizes are meant for a GPU. Fix: run "
              "on a GPU machine, or pass --smoke for the tiny sizes on the CPU", file=sys.stderr)
        return 2
    size, batch, steps, rounds = (32, 8, 2, 2) if smoke else (224, 256, 20, 3)
    workers = 1 if smoke else min(12, max((os.cpu_count() or 2) - 2, 1))
    figures = Figures(args.out)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    import torchvision

    figures.add(device=card, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, torchvision=torchvision.__version__,
                cuda=torch.version.cuda or "", batch=batch, image_size=size)
    print(f"device {card}, torch {torch.__version__}, {size}x{size}, batch {batch}, "
          f"{steps} steps x {rounds} rounds, {workers} loader workers", flush=True)
    sections = args.sections.split(",")
    modes = [m for m in args.compile_modes.split(",") if m]
    models = [m for m in args.compile_models.split(",") if m]
    small_modes = [] if smoke else [m for m in args.small_compile_modes.split(",") if m]
    data = synthetic_batches(device, size, batch, steps)
    deadline = started + args.budget_s

    def stream() -> None:
        if not smoke and time.perf_counter() + EXPECTED_STREAM_S > deadline:
            print("stream: skipped, it would end after the time budget", flush=True)
            figures.add(stream_skipped="time budget")
            return
        section_stream(figures, device, 48 if smoke else 4096, size, 8 if smoke else 256, workers)

    def photo() -> None:
        if not smoke and time.perf_counter() + EXPECTED_PHOTO_S > deadline:
            print("photo: skipped, it would end after the time budget", flush=True)
            figures.add(photo_skipped="time budget")
            return
        # Every core but two (the training process and its pinning thread) decodes.
        photo_workers = 1 if smoke else max((os.cpu_count() or 2) - 2, 1)
        section_photo(figures, device, smoke, photo_workers, rounds)

    def style() -> None:
        if not smoke and time.perf_counter() + EXPECTED_STYLE_S > deadline:
            print("style: skipped, it would end after the time budget", flush=True)
            figures.add(style_skipped="time budget")
            return
        section_style(figures, device, smoke, rounds)

    # The figures the issues ask for first (synthetic, small, photo, style), then the extras.
    plan: list[tuple[str, Callable[[], None]]] = [
        ("synthetic", lambda: section_synthetic(figures, device, data, rounds)),
        ("small", lambda: section_small(figures, device, 64 if smoke else 16_384, 16 if smoke else 256,
                                        rounds, workers, small_modes, deadline)),
        ("photo", photo),
        ("style", style),
        ("pipeline", lambda: section_pipeline(figures, device, smoke)),
        ("compile", lambda: section_compile(figures, device, data, rounds, modes[:1], models,
                                            deadline)),
        ("stream", stream),
        ("compile", lambda: section_compile(figures, device, data, rounds, modes[1:], models,
                                            deadline)),
    ]
    for name, run in plan:
        if name not in sections or (name == "compile" and smoke):
            continue
        try:
            run()
        except Exception as exc:  # record it and go on: the other sections' figures still count
            print(f"section {name} failed: {type(exc).__name__}: {exc}", flush=True)
            figures.add(**{f"{name}_error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    figures.add(seconds=time.perf_counter() - started)
    print(json.dumps(figures.values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
