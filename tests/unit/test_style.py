"""Style transfer's parts on tiny sizes on the CPU: the loss terms against direct computations,
the network's shapes, a training whose loss falls and resumes, and Gatys' optimisation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.style_fixtures import TINY_LOSS, TINY_TRAIN, style_inputs, vgg16_features
from visionpipe.config import GatysConfig, StyleConfig, StyleLossConfig
from visionpipe.style.gatys import stylize_by_optimisation
from visionpipe.style.images import bundled_style_path, load_image
from visionpipe.style.loss import LossNetwork, PerceptualLoss, gram, load_loss_network, total_variation
from visionpipe.style.network import TransformerNet
from visionpipe.data import load_split
from visionpipe.style.evaluate import heldout_losses
from visionpipe.style.train import load_style_network, perceptual_loss, style_image_tensor, train_style
from visionpipe.training.checkpoint import load_checkpoint


def test_training_batches_go_back_to_the_pixels_they_were_normalised_from() -> None:
    from visionpipe.data.images import normalize
    from visionpipe.style.images import unit_range

    pixels = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    torch.testing.assert_close(unit_range(normalize(pixels)), pixels.float() / 255, atol=1e-6, rtol=0)
    torch.testing.assert_close(unit_range(pixels), pixels.float() / 255)


def test_the_gram_matrix_is_the_normalised_inner_product_of_each_pair_of_channels() -> None:
    torch.manual_seed(0)
    features = torch.randn(2, 3, 4, 5)
    expected = torch.empty(2, 3, 3)
    for n in range(2):
        for i in range(3):
            for j in range(3):
                expected[n, i, j] = (features[n, i] * features[n, j]).sum() / (3 * 4 * 5)
    torch.testing.assert_close(gram(features), expected)


def _tiny_loss(tmp_path: Path, style_image: torch.Tensor, content: float, style: float,
               tv: float) -> PerceptualLoss:
    network = load_loss_network("vgg16", ["relu1_2", "relu2_2"], vgg16_features(tmp_path / "w.pth"), None)
    return PerceptualLoss(network, "relu2_2", ["relu1_2", "relu2_2"], style_image, content, style, tv)


def test_each_loss_term_matches_a_direct_computation(tmp_path: Path) -> None:
    torch.manual_seed(1)
    style, content, output = torch.rand(1, 3, 24, 20), torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    criterion = _tiny_loss(tmp_path, style, content=2.0, style=3.0, tv=5.0)
    terms = criterion(output, content)
    vgg = criterion.network.features
    mean, std = criterion.network.mean, criterion.network.std

    def at(images: torch.Tensor, index: int) -> torch.Tensor:  # relu1_2 = 3, relu2_2 = 8
        return vgg[: index + 1]((images - mean) / std)

    content_loss = ((at(output, 8) - at(content, 8)) ** 2).mean()
    style_loss = sum(F.mse_loss(gram(at(output, i)), gram(at(style, i)).expand(2, -1, -1)) for i in (3, 8))
    tv = ((output[:, :, 1:] - output[:, :, :-1]) ** 2).mean() + ((output[..., 1:] - output[..., :-1]) ** 2).mean()
    torch.testing.assert_close(terms.content, content_loss)
    torch.testing.assert_close(terms.style, style_loss)
    torch.testing.assert_close(terms.tv, tv)
    torch.testing.assert_close(terms.total, 2 * content_loss + 3 * style_loss + 5 * tv)
    assert float(criterion(content, content).content) == 0.0
    assert float(total_variation(torch.ones(1, 3, 8, 8))) == 0.0


def test_the_loss_network_is_frozen_cut_after_the_deepest_layer_and_refuses_unknown_ones(
        tmp_path: Path) -> None:
    network = LossNetwork("vgg16", ["relu1_2", "relu2_2"])
    assert len(network.features) == 9  # conv1_1 ... relu2_2: nothing past the loss is computed
    assert not any(p.requires_grad for p in network.parameters())
    assert not network.train().training
    # A conv layer's features are its own, not the ReLU's that follows it (in place in torchvision).
    images = torch.rand(1, 3, 16, 16)
    conv = LossNetwork("vgg16", ["conv1_1", "relu1_2"])(images)["conv1_1"]
    assert float(conv.min()) < 0
    with pytest.raises(ValueError, match="have no features.0.weight, features.0.bias"):
        LossNetwork("vgg16", ["relu1_1"], {"0.weight": torch.zeros(64, 3, 3, 3)})
    with pytest.raises(ValueError, match="vgg16 has no layer 'relu5_4'; its ReLU layers are relu1_1"):
        StyleLossConfig(style_layers=["relu5_4"])
    assert StyleLossConfig(network="vgg19", style_layers=["relu5_4"]).style_layers == ["relu5_4"]


def test_the_network_returns_its_input_size_and_ends_in_a_plain_convolution() -> None:
    net = TransformerNet(channels=4, residual_blocks=1)
    for shape in ((1, 3, 32, 32), (2, 3, 17, 23), (1, 3, 9, 40)):
        assert net(torch.rand(shape)).shape == shape
    last = list(net.modules())[-1]
    assert isinstance(last, torch.nn.Conv2d), "no activation after the last layer"


def test_training_lowers_the_loss_and_a_resumed_run_ends_with_the_same_weights(
        vp_home: Path, tmp_path: Path) -> None:
    inputs = style_inputs(tmp_path)
    seen: list[dict[str, object]] = []
    straight = train_style(TINY_TRAIN.model_copy(update={"epochs": 3}), TINY_LOSS, inputs,
                           tmp_path / "straight", seen.append)
    losses = [r["total_loss"] for r in straight.history]
    assert losses[-1] < 0.8 * losses[0], losses
    # Training saw the images as evaluation and serving do (RGB in [0, 1] from the uint8
    # pixels): its last validation loss is the saved network's loss on the val split's pixels.
    criterion = perceptual_loss(TINY_LOSS, style_image_tensor(inputs, TINY_LOSS),
                                Path(inputs.loss_weights_path), inputs.loss_weights_sha256,
                                torch.device("cpu"))
    val_pixels, _ = load_split(inputs.dataset, "val")
    saved, _ = load_style_network(Path(straight.checkpoint))
    assert heldout_losses(saved, criterion, val_pixels)["heldout_total_loss"] == pytest.approx(
        straight.history[-1]["val_loss"], rel=1e-3)
    assert [r["epoch"] for r in seen] == [1, 2, 3] and all("val_loss" in r for r in seen)
    # Two epochs, then a new attempt asked for three: it resumes after the second.
    train_style(TINY_TRAIN, TINY_LOSS, inputs, tmp_path / "retried")
    resumed = train_style(TINY_TRAIN.model_copy(update={"epochs": 3}), TINY_LOSS, inputs,
                          tmp_path / "retried")
    assert resumed.resumed_from_epoch == 2 and resumed.epochs_run == 3
    a = load_checkpoint(Path(straight.checkpoint))["model"]
    b = load_checkpoint(Path(resumed.checkpoint))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed run ends elsewhere"
    net, spec = load_style_network(Path(resumed.checkpoint))
    assert spec.style == "waves" and spec.channels == 4 and not net.training
    with pytest.raises(Exception, match="another style config"):
        train_style(TINY_TRAIN.model_copy(update={"lr": 1e-2}), TINY_LOSS, inputs, tmp_path / "retried")


def _gatys(criterion: PerceptualLoss, content: torch.Tensor, **changes: object) -> tuple[torch.Tensor, list[float]]:
    cfg = GatysConfig(loss=TINY_LOSS, weights={"uri": "torchvision:vgg16.IMAGENET1K_V1"}).model_copy(update=changes)
    styles: list[float] = []
    image = stylize_by_optimisation(content, criterion, cfg,
                                    on_step=lambda step, terms: styles.append(float(terms.style)))
    return image, styles


def test_the_fast_path_trains_in_bf16_with_float32_gram_matrices(vp_home: Path, tmp_path: Path) -> None:
    """The GPU fast path (bf16 autocast, channels-last), run here on the CPU: it still learns."""
    inputs = style_inputs(tmp_path)
    result = train_style(TINY_TRAIN.model_copy(update={"autocast_bf16": True, "epochs": 2}),
                         TINY_LOSS, inputs, tmp_path / "fast")
    losses = [r["total_loss"] for r in result.history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gram(torch.rand(1, 4, 3, 3).bfloat16()).dtype == torch.float32


def test_gatys_with_the_style_image_as_content_keeps_the_style_loss_near_zero(tmp_path: Path) -> None:
    style = load_image(bundled_style_path(), 32)
    criterion = _tiny_loss(tmp_path, style, content=1.0, style=1e9, tv=0.0)
    grey = float(criterion(torch.full_like(style, 0.5), style).style)  # a picture without the style
    image, styles = _gatys(criterion, style, steps=5, optimizer="adam", lr=0.01)
    assert len(styles) == 5 and max(styles) < 1e-3 * grey, (styles, grey)
    assert image.shape == style.shape and 0 <= float(image.min()) and float(image.max()) <= 1


def test_gatys_moves_a_content_image_towards_the_style(tmp_path: Path) -> None:
    style = load_image(bundled_style_path(), 32)
    criterion = _tiny_loss(tmp_path, style, content=1.0, style=1e9, tv=0.0)
    _, styles = _gatys(criterion, torch.full((1, 3, 32, 32), 0.5), steps=20)
    assert styles[-1] < 0.5 * styles[0], styles


def test_the_style_config_names_the_model_after_the_style_and_checks_the_weights() -> None:
    assert StyleConfig().model_name == "waves-stylizer"
    assert StyleConfig(style_image="s3://art/starry-night.jpg").model_name == "starry-night-stylizer"
    with pytest.raises(ValueError, match="are for resnet50 but loss.network is 'vgg16'"):
        StyleConfig(weights={"uri": "torchvision:resnet50.IMAGENET1K_V2"})


def test_the_style_image_is_fetched_verified_and_cached_like_weights(
        vp_home: Path, http_server: Any) -> None:
    from visionpipe.digests import file_sha256
    from visionpipe.errors import WeightsError
    from visionpipe.weights import fetch_file

    data = bundled_style_path().read_bytes()
    digest = file_sha256(bundled_style_path())
    url = http_server.serve("/styles/waves.png", data)
    path, got = fetch_file(url, digest, "images")
    assert got == digest and path.read_bytes() == data and path.parent.name == "images"
    again, _ = fetch_file(url, digest, "images")  # from the cache, not the server
    assert again == path and http_server.hits["/styles/waves.png"] == 1
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        fetch_file(http_server.serve("/styles/other.png", data[:-1]), "0" * 64, "images")
    assert not list(path.parent.glob(".partial-*")), "a refused download leaves nothing behind"


def test_a_local_image_edited_in_place_is_read_again(vp_home: Path, tmp_path: Path) -> None:
    from visionpipe.digests import file_sha256
    from visionpipe.weights import fetch_file

    photo = tmp_path / "photo.png"
    photo.write_bytes(bundled_style_path().read_bytes())
    first, digest = fetch_file(photo.as_uri(), None, "images")
    photo.write_bytes(bundled_style_path().read_bytes()[:-3] + b"new")
    second, again = fetch_file(photo.as_uri(), None, "images")
    assert again == file_sha256(photo) != digest and second.read_bytes() == photo.read_bytes()
