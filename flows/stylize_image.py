"""One picture in one style by optimisation (Gatys et al. 2016), for a single image, not a model."""

from __future__ import annotations

import sys

from prefect import flow

from tasks.style import fetch_image, optimise_image
from tasks.weights import fetch_pretrained_weights_cached
from visionpipe.config import GatysConfig


@flow(name="stylize-image")
def stylize_image(content: str, style: str, output: str,
                  config: GatysConfig = GatysConfig()) -> str:  # noqa: B008
    """Stylise ``content`` like ``style``; write the PNG to ``output``; return its path.

    1. fetch-image: the content and the style image (file, https, s3, bundled), verified
    2. fetch-pretrained-weights: the loss network, VGG-19 by default
    3. optimise-image: L-BFGS (or Adam) on the pixels against the same perceptual loss
    """
    content_image = fetch_image.submit(content)
    style_image = fetch_image.submit(style)
    weights = fetch_pretrained_weights_cached(config.weights, config.loss.network)
    return optimise_image(content_image.result(), style_image.result(), weights.path,
                          weights.sha256, config, output)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python -m flows.stylize_image <content-uri> <style-uri> <output.png>")
    print(stylize_image(*sys.argv[1:4]))
