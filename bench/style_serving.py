"""The registered Stylizer pyfunc against the same network in a plain PyTorch loop, images/s.

    python bench/style_serving.py            # the measurement (`make bench`)
    python bench/style_serving.py --smoke    # tiny sizes: checks that it works

Both sides do the same work per image: decode the JPEG bytes (EXIF applied, RGB), run Johnson
et al.'s network (32 channels, 5 residual blocks, untrained weights: speed only) on the CPU at
the image's own size, clamp, and encode a PNG. The pyfunc is logged to a temporary MLflow store,
loaded with ``mlflow.pyfunc.load_model`` and called with a DataFrame of the bytes, as consumers
call it; the baseline is a for loop. They alternate in ABAB rounds; the ratio is the median of
the rounds' ratios (pyfunc / plain; at least 0.97 is the target). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _jpegs(count: int, side: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        pixels = rng.integers(0, 255, (side, side * 4 // 3, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def run(images: int, side: int, rounds: int, channels: int, blocks: int) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="vp-style-bench-"))
    os.environ["VISIONPIPE_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    import mlflow
    import pandas as pd

    from visionpipe import tracking
    from visionpipe.style.images import load_image, png_bytes
    from visionpipe.style.network import StyleSpec, build_style_network
    from visionpipe.style.registry import log_style_model
    from visionpipe.training.checkpoint import save_checkpoint

    torch.manual_seed(0)
    spec = StyleSpec(style="bench", style_sha256="0" * 64, channels=channels,
                     residual_blocks=blocks, image_size=side)
    net = build_style_network(spec).eval()
    checkpoint = home / "style.pt"
    save_checkpoint({"model": net.state_dict(), "spec": spec.model_dump_json()}, checkpoint)
    data = _jpegs(images, side)
    run_id = tracking.start_run(tracking.ensure_experiment("bench"), "style")
    model = mlflow.pyfunc.load_model(log_style_model(run_id, checkpoint, home / "export", data[:1]))
    frame = pd.DataFrame({"image": data})

    def pyfunc() -> None:
        model.predict(frame)

    @torch.inference_mode()
    def plain() -> None:
        for image in data:
            png_bytes(net(load_image(image)))

    pyfunc(), plain()  # warm-up: first calls allocate
    ratios, rates = [], {"pyfunc": [], "plain": []}
    for _ in range(rounds):
        seconds = {}
        for name, fn in (("pyfunc", pyfunc), ("plain", plain)):
            start = time.perf_counter()
            fn()
            seconds[name] = time.perf_counter() - start
            rates[name].append(images / seconds[name])
        ratios.append(seconds["plain"] / seconds["pyfunc"])
    return {"style_pyfunc_images_per_s": round(statistics.median(rates["pyfunc"]), 2),
            "style_plain_images_per_s": round(statistics.median(rates["plain"]), 2),
            "style_pyfunc_vs_plain": round(statistics.median(ratios), 3),
            "images": images, "side": side, "rounds": rounds, "threads": torch.get_num_threads()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check it works")
    args = parser.parse_args(argv)
    options = (dict(images=2, side=32, rounds=1, channels=4, blocks=1) if args.smoke
               else dict(images=16, side=256, rounds=6, channels=32, blocks=5))
    print(json.dumps(run(**options)))  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
