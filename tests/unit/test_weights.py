"""fetch_weights against real local servers (HTTP, moto S3) and files, with real digests."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import socket
from pathlib import Path

import pytest
import torch
import torchvision
from pydantic import ValidationError

from tests.servers import WeightsServer
from visionpipe.config import PipelineConfig, WeightsConfig
from visionpipe.weights import (
    FetchedWeights,
    WeightsError,
    WeightsUnavailable,
    check_state_dict_keys,
    digest_prefix,
    fetch_weights,
    file_sha256,
    load_state_dict_file,
    resolve_torchvision_uri,
)

FAST = 0.01  # backoff base: retries stay real but the suite stays quick


def _tiny_bytes(seed: int = 0) -> bytes:
    """A real, small state dict (a 4 -> 3 linear layer) as torch.save writes it."""
    torch.manual_seed(seed)
    buffer = io.BytesIO()
    torch.save(torch.nn.Linear(4, 3).state_dict(), buffer)
    return buffer.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture()
def closed_port_url() -> str:
    """A URL on a port nobody listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/weights.pth"


def _cache_files(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "weights").iterdir())


# ---------------------------------------------------------------------------- torchvision URIs


def test_torchvision_uri_resolves_to_the_official_url_without_downloading() -> None:
    url = resolve_torchvision_uri("torchvision:resnet50.IMAGENET1K_V2")
    assert url == torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url
    assert url.startswith("https://download.pytorch.org/")
    assert digest_prefix(url) == "11ad3fa6"


def test_unknown_torchvision_weights_list_the_choices() -> None:
    with pytest.raises(WeightsError, match="IMAGENET1K_V1"):
        resolve_torchvision_uri("torchvision:resnet50.IMAGENET2K")
    with pytest.raises(WeightsError, match="no model"):
        resolve_torchvision_uri("torchvision:resnot.IMAGENET1K_V1")


def test_torchvision_weights_for_another_arch_are_refused(vp_home: Path) -> None:
    cfg = WeightsConfig(uri="torchvision:resnet50.IMAGENET1K_V2")
    with pytest.raises(WeightsError, match="resnet18"):
        fetch_weights(cfg, "resnet18")


def test_the_form_and_fetch_weights_refuse_another_archs_weights_alike(vp_home: Path) -> None:
    uri = "torchvision:resnet50.IMAGENET1K_V2"
    with pytest.raises(ValidationError) as form:
        PipelineConfig.model_validate({"weights": {"uri": uri}, "finetune": {"arch": "resnet18"}})
    with pytest.raises(WeightsError, match="Fix: use torchvision:resnet18.<WEIGHTS>") as fetch:
        fetch_weights(WeightsConfig(uri=uri), "resnet18")
    assert str(fetch.value) in str(form.value)  # one check, one message
    assert not (vp_home / "weights" / "index.json").exists()  # refused before any download


@pytest.mark.parametrize(
    ("name", "prefix"),
    [
        ("resnet50-11ad3fa6.pth", "11ad3fa6"),
        ("https://h/x/shufflenetv2_x1-5666bf0f80.pth", "5666bf0f80"),
        ("resnet18_fbgemm_16fa66dd.pth", None),  # no dash: torch.hub makes no promise
        ("model-final.pth", None),
        ("weights-abc.pth", None),  # too short to be a digest prefix rather than a word
        ("state_dict.pt", None),
    ],
)
def test_digest_prefix_follows_torch_hub_names(name: str, prefix: str | None) -> None:
    assert digest_prefix(name) == prefix


# ---------------------------------------------------------------------------- HTTP


def test_http_download_with_full_sha256(vp_home: Path, http_server: WeightsServer) -> None:
    body = _tiny_bytes()
    url = http_server.serve("/w/tiny.pth", body)
    fetched = fetch_weights(WeightsConfig(uri=url, sha256=_sha(body)), "resnet18", backoff_s=FAST)

    assert fetched.sha256 == _sha(body)
    assert fetched.source == url and not fetched.random_init and fetched.arch == "resnet18"
    assert Path(fetched.path) == vp_home / "weights" / f"{_sha(body)}.pth"
    assert FetchedWeights.model_validate_json(fetched.model_dump_json()) == fetched
    state = load_state_dict_file(fetched.path, expected_sha256=fetched.sha256)
    assert set(state) == {"weight", "bias"}
    # Nothing half-written is left beside the verified file.
    assert not [n for n in _cache_files(vp_home) if n.startswith(".partial")]


def test_file_name_prefix_is_checked(vp_home: Path, http_server: WeightsServer) -> None:
    body = _tiny_bytes()
    good = http_server.serve(f"/models/tiny-{_sha(body)[:8]}.pth", body)
    assert fetch_weights(WeightsConfig(uri=good), "resnet18").sha256 == _sha(body)

    wrong = "0" * 8 if not _sha(body).startswith("0" * 8) else "f" * 8
    bad = http_server.serve(f"/models/tiny-{wrong}.pth", body)
    with pytest.raises(WeightsError) as info:
        fetch_weights(WeightsConfig(uri=bad, attempts=3), "resnet18", backoff_s=FAST)
    assert wrong in str(info.value) and _sha(body) in str(info.value)
    assert http_server.hits[f"/models/tiny-{wrong}.pth"] == 1


def test_sha_mismatch_names_both_digests_and_is_not_retried(
    vp_home: Path, http_server: WeightsServer
) -> None:
    body = _tiny_bytes()
    url = http_server.serve("/w/tiny.pth", body)
    pinned = "ab" * 32
    cfg = WeightsConfig(uri=url, sha256=pinned, attempts=4, on_unavailable="random-init")
    with pytest.raises(WeightsError) as info:
        fetch_weights(cfg, "resnet18", backoff_s=FAST)

    message = str(info.value)
    assert not isinstance(info.value, WeightsUnavailable)
    assert pinned in message and _sha(body) in message and "Fix" in message
    assert http_server.hits["/w/tiny.pth"] == 1
    assert _cache_files(vp_home) == []  # the rejected bytes are gone


def test_http_500_then_success_is_retried(vp_home: Path, http_server: WeightsServer) -> None:
    body = _tiny_bytes()
    url = http_server.serve("/w/flaky.pth", body, fail_first=(500, 503))
    fetched = fetch_weights(WeightsConfig(uri=url, attempts=3), "resnet18", backoff_s=FAST)
    assert fetched.sha256 == _sha(body)
    assert http_server.hits["/w/flaky.pth"] == 3


def test_http_404_is_not_retried_nor_replaced_by_random_init(
    vp_home: Path, http_server: WeightsServer
) -> None:
    cfg = WeightsConfig(uri=http_server.url + "/w/missing.pth", attempts=4,
                        on_unavailable="random-init")
    with pytest.raises(WeightsError, match="HTTP 404") as info:
        fetch_weights(cfg, "resnet18", backoff_s=FAST)
    assert not isinstance(info.value, WeightsUnavailable)
    assert http_server.hits["/w/missing.pth"] == 1


def test_server_errors_on_every_attempt_make_weights_unavailable(
    vp_home: Path, http_server: WeightsServer
) -> None:
    url = http_server.serve("/w/down.pth", b"", fail_first=(503,) * 10)
    with pytest.raises(WeightsUnavailable) as info:
        fetch_weights(WeightsConfig(uri=url, attempts=3), "resnet18", backoff_s=FAST)
    assert http_server.hits["/w/down.pth"] == 3
    assert url in str(info.value) and "on_unavailable=random-init" in str(info.value)


def test_unreachable_source_is_retried_then_fails(
    vp_home: Path, closed_port_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="visionpipe.weights")
    with pytest.raises(WeightsUnavailable) as info:
        fetch_weights(WeightsConfig(uri=closed_port_url, attempts=3), "resnet18", backoff_s=FAST)
    message = str(info.value)
    assert closed_port_url in message and "mirror" in message and "random-init" in message
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2  # three attempts, two waits


def test_unreachable_source_with_random_init_warns_and_is_seeded(
    vp_home: Path, closed_port_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="visionpipe.weights")
    cfg = WeightsConfig(uri=closed_port_url, attempts=2, on_unavailable="random-init")
    before = torch.random.get_rng_state()
    fetched = fetch_weights(cfg, "resnet18", backoff_s=FAST)

    assert fetched.random_init and fetched.source == "random-init" and fetched.arch == "resnet18"
    assert file_sha256(fetched.path) == fetched.sha256
    warning = next(r.getMessage() for r in caplog.records if "RANDOM INIT" in r.getMessage())
    assert "after 2 attempt(s)" in warning
    assert "on_unavailable=random-init" not in warning, "no fix to do what the run already does"
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's stream is untouched
    state = load_state_dict_file(fetched.path, fetched.sha256)
    check_state_dict_keys(torchvision.models.resnet18(), state)
    with pytest.raises(WeightsError, match="missing keys"):
        check_state_dict_keys(torchvision.models.resnet34(), state)
    # Seeded: the same bytes, hence the same content address, every time.
    assert fetch_weights(cfg, "resnet18", backoff_s=FAST).sha256 == fetched.sha256


# ---------------------------------------------------------------------------- cache


def test_cache_hit_makes_no_request(vp_home: Path, http_server: WeightsServer) -> None:
    body = _tiny_bytes()
    url = http_server.serve("/w/tiny.pth", body)
    pinned = WeightsConfig(uri=url, sha256=_sha(body))
    first = fetch_weights(pinned, "resnet18")
    assert fetch_weights(pinned, "resnet18") == first
    # Without a pinned digest the index remembers what this URI verified to.
    assert fetch_weights(WeightsConfig(uri=url), "resnet18") == first
    assert http_server.hits["/w/tiny.pth"] == 1
    index = json.loads((vp_home / "weights" / "index.json").read_text())
    assert index == {url: _sha(body)}


def test_damaged_cache_file_is_downloaded_again(vp_home: Path, http_server: WeightsServer) -> None:
    body = _tiny_bytes()
    cfg = WeightsConfig(uri=http_server.serve("/w/tiny.pth", body), sha256=_sha(body))
    path = Path(fetch_weights(cfg, "resnet18").path)
    path.write_bytes(b"bit rot")
    assert fetch_weights(cfg, "resnet18").sha256 == _sha(body)
    assert file_sha256(path) == _sha(body)
    assert http_server.hits["/w/tiny.pth"] == 2


# ---------------------------------------------------------------------------- S3 and files


def test_s3_download_and_missing_key(vp_home: Path, s3_env: str) -> None:
    from visionpipe.data.s3 import s3_client

    body = _tiny_bytes(1)
    client = s3_client()
    client.create_bucket(Bucket="weights")
    client.put_object(Bucket="weights", Key="backbones/tiny.pth", Body=body)

    cfg = WeightsConfig(uri="s3://weights/backbones/tiny.pth", sha256=_sha(body))
    assert fetch_weights(cfg, "resnet18", backoff_s=FAST).sha256 == _sha(body)

    missing = WeightsConfig(uri="s3://weights/backbones/nope.pth", on_unavailable="random-init")
    with pytest.raises(WeightsError, match="NoSuchKey") as info:
        fetch_weights(missing, "resnet18", backoff_s=FAST)
    assert not isinstance(info.value, WeightsUnavailable)


def test_file_uri(vp_home: Path, tmp_path: Path) -> None:
    body = _tiny_bytes(2)
    source = tmp_path / "tiny.pth"
    source.write_bytes(body)
    fetched = fetch_weights(WeightsConfig(uri=source.as_uri()), "resnet18")
    assert fetched.sha256 == _sha(body) and Path(fetched.path).read_bytes() == body

    with pytest.raises(WeightsError, match="cannot read"):
        fetch_weights(WeightsConfig(uri=(tmp_path / "nope.pth").as_uri()), "resnet18")


def test_unsupported_uri_says_what_is_supported(vp_home: Path) -> None:
    with pytest.raises(WeightsError, match="s3://bucket/key"):
        fetch_weights(WeightsConfig(uri="ftp://host/w.pth"), "resnet18")
    with pytest.raises(WeightsError, match="models:/<name>@<alias>"):
        fetch_weights(WeightsConfig(uri="models:/only-a-name"), "resnet18")


# ---------------------------------------------------------------------------- loading


def test_load_rejects_what_is_not_a_state_dict(tmp_path: Path) -> None:
    as_list = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], as_list)
    with pytest.raises(WeightsError, match="holds a list"):
        load_state_dict_file(as_list)

    module = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), module)
    with pytest.raises(WeightsError, match="not a loadable state dict"):
        load_state_dict_file(module)

    checkpoint = tmp_path / "checkpoint.pth"
    torch.save({"model": torch.nn.Linear(2, 2).state_dict(), "epoch": 3}, checkpoint)
    with pytest.raises(WeightsError, match=r"checkpoint\['model'\]"):
        load_state_dict_file(checkpoint)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="not a loadable state dict"):
        load_state_dict_file(garbage)


def test_load_of_a_deleted_file_says_to_fetch_it_again(tmp_path: Path) -> None:
    """A cached path whose file was deleted: a WeightsError (not retried), not FileNotFoundError."""
    gone = tmp_path / "weights" / f"{'ab' * 32}.pth"
    for expected in ("ab" * 32, None):
        with pytest.raises(WeightsError) as info:
            load_state_dict_file(gone, expected)
        assert str(gone) in str(info.value) and "fetch it again" in str(info.value)


def test_fetched_source_carries_no_credentials(vp_home: Path, http_server: WeightsServer) -> None:
    body = _tiny_bytes()
    url = http_server.serve("/w/tiny.pth?X-Amz-Credential=AKIASECRET&X-Amz-Signature=5ECRET", body)
    fetched = fetch_weights(WeightsConfig(uri=url, sha256=_sha(body)), "resnet18")
    assert fetched.source == f"{http_server.url}/w/tiny.pth?X-Amz-Credential=***&X-Amz-Signature=***"
    assert "SECRET" not in fetched.model_dump_json()


def test_load_checks_the_digest(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pth"
    path.write_bytes(_tiny_bytes())
    with pytest.raises(WeightsError) as info:
        load_state_dict_file(path, expected_sha256="00" * 32)
    assert "00" * 32 in str(info.value) and _sha(path.read_bytes()) in str(info.value)


def test_check_state_dict_keys_lists_missing_and_unexpected() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    state = {"0.weight": torch.zeros(2, 2), "0.bias": torch.zeros(2), "9.weight": torch.zeros(1)}
    with pytest.raises(WeightsError) as info:
        check_state_dict_keys(model, state, ignore_prefixes=())
    message = str(info.value)
    assert "2 missing keys ['1.bias', '1.weight']" in message
    assert "1 unexpected keys ['9.weight']" in message and "Fix" in message

    # The head is replaced in fine-tuning, so its keys and shapes do not matter.
    check_state_dict_keys(model, {k: v for k, v in state.items() if k != "9.weight"},
                          ignore_prefixes=("1.",))
    ddp = {f"module.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError, match="strip the 'module.' prefix"):
        check_state_dict_keys(model, ddp, ignore_prefixes=())
    wide = dict(model.state_dict(), **{"0.weight": torch.zeros(3, 2)})
    with pytest.raises(WeightsError, match="shape mismatches"):
        check_state_dict_keys(model, wide, ignore_prefixes=())
