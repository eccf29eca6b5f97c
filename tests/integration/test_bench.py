"""The benchmarks run end to end at tiny sizes (the figures themselves live in bench/, not here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _last_json(cmd: list[str]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'src'}"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_trainer_benchmark_smoke_reports_every_ratio() -> None:
    figures = _last_json([sys.executable, "bench/trainer.py", "--smoke"])
    assert {"googlenet_ratio", "head_ratio", "full_ratio", "head_cache_speedup",
            "googlenet_channels_last_speedup", "full_channels_last_speedup"} <= figures.keys()
    assert all(v > 0 for v in figures.values())


def test_photo_loader_benchmark_smoke_reports_every_ratio() -> None:
    figures = _last_json([sys.executable, "bench/photo_loader.py", "--smoke"])
    for key in ("photo_loader_ratio", "photo_first_epoch_ratio", "photo_eval_loader_ratio",
                "photo_images_per_s_per_core"):
        assert figures[key] > 0, (key, figures)


def test_photo_accuracy_benchmark_smoke_reports_every_figure() -> None:
    figures = _last_json([sys.executable, "bench/photo_accuracy.py", "--smoke",
                          "--classes", "disc,stripes", "--epochs", "2"])
    assert figures["photo_classes"] == 2 and figures["photo_epochs"] == 2, figures
    for name in ("plain", "finetune", "googlenet"):
        assert 0 <= figures[f"photo_top1_{name}"] <= 1 and figures[f"photo_{name}_seconds"] > 0
    ours = min(figures["photo_top1_finetune"], figures["photo_top1_googlenet"])
    assert figures["photo_accuracy_vs_plain"] == ours / max(figures["photo_top1_plain"], 1e-9)


def test_style_serving_benchmark_smoke_reports_the_ratio() -> None:
    figures = _last_json([sys.executable, "bench/style_serving.py", "--smoke"])
    assert figures["style_pyfunc_images_per_s"] > 0 and figures["style_plain_images_per_s"] > 0
    assert 0 < figures["style_pyfunc_vs_plain"] < 10


def test_gpu_benchmark_smoke_runs_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    figures = _last_json(["bash", "bench/gpu.sh", "--smoke", "--out", str(out)])
    assert not [k for k in figures if k.endswith("_error")], figures
    assert json.loads(out.read_text()) == figures  # the file a timed-out device call leaves
    assert figures["digits_finetune_seconds"] > 0
    for model in ("resnet50", "googlenet", "small_resnet50", "small_googlenet"):
        assert figures[f"{model}_images_per_s"] > 0 and figures[f"{model}_plain_images_per_s"] > 0
    assert figures["jpeg_stream_cpu_decode_images_per_s"] > 0
    assert figures["jpeg_stream_device_decode_images_per_s"] > 0
    assert figures["photo_loader_images_per_s"] > 0 and figures["photo_resnet50_images_per_s"] > 0
    assert figures["photo_from_prepared_copy"], "later epochs read the prepared copy"
    assert figures["photo_resnet50_vs_synthetic"] == pytest.approx(
        figures["photo_resnet50_images_per_s"] / figures["resnet50_images_per_s"], rel=1e-2)
    assert figures["date"].endswith("+00:00") and figures["torchvision"]


def test_gpu_benchmark_full_sizes_without_a_gpu_say_so() -> None:
    out = subprocess.run(["bash", "bench/gpu.sh"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 2 and "no CUDA device is visible" in out.stderr and "--smoke" in out.stderr


def test_gpu_benchmark_compiled_figures_on_a_tiny_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import torch
    from torch import nn

    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "bench" / "gpu.py")
    assert spec is not None and spec.loader is not None
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    tiny = (lambda classes, small: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                                 nn.Flatten(), nn.Linear(4, classes)), 0.0)
    monkeypatch.setattr(gpu, "MODELS", {"tiny": tiny})
    cpu, figures = torch.device("cpu"), gpu.Figures(None)
    data = gpu.synthetic_batches(cpu, 16, 8, 2)
    gpu.section_synthetic(figures, cpu, data, 2)
    gpu.section_compile(figures, cpu, data, 2, ["default"], ["tiny"], deadline=float("inf"))
    values = figures.values
    assert values["tiny_compile_default_images_per_s"] > 0
    # The warm-up pass holds the compile, so it is well above a steady pass: 18 s cold on a
    # 2-core CPU, 0.7 s with every compile cache warm. A figure clamped to 0 missed it.
    assert values["tiny_compile_default_seconds"] > 0.1
    assert values["tiny_compile_default_speedup_over_eager"] == pytest.approx(
        values["tiny_compile_default_images_per_s"] / values["tiny_images_per_s"], rel=1e-2)
    gpu.section_compile(figures, cpu, data, 2, ["reduce-overhead"], ["tiny"], deadline=0.0)
    # Out of time: recorded as skipped, with no figure.
    assert [k for k in values if k.startswith("tiny_compile_reduce_overhead")] == [
        "tiny_compile_reduce_overhead_skipped"]
