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
    assert {"googlenet_ratio", "head_ratio", "full_ratio", "head_cache_speedup"} <= figures.keys()
    assert all(v > 0 for v in figures.values())


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
