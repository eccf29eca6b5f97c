"""Training loop pieces: schedule, checkpoints, phases and the frozen-feature cache."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from visionpipe.config import DataConfig, FinetuneConfig, Phase
from visionpipe.data import PreparedDataset, prepare_dataset
from visionpipe.models import build_backbone
from visionpipe.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from visionpipe.training.core import check_batch_size
from visionpipe.training.fastpath import resolve_fast_path
from visionpipe.training.finetune import finetune
from visionpipe.training.loop import warmup_cosine, warmup_steps


def test_warmup_then_cosine_to_zero() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, total_steps=20, warmup_steps=5)
    rates = []
    for _ in range(20):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[0] == pytest.approx(0.01)
    assert rates[:6] == sorted(rates[:6]) and rates[5] == pytest.approx(1.0)
    assert rates[5:] == sorted(rates[5:], reverse=True) and rates[-1] < 0.02


def test_warmup_lasts_at_least_its_minimum_of_steps_but_at_most_a_tenth_of_the_run() -> None:
    # A small dataset: 12 steps per epoch, 20 epochs. One epoch of warm-up alone would be 12.
    assert warmup_steps(1.0, steps_per_epoch=12, total_steps=240, min_steps=50) == 24
    assert warmup_steps(1.0, steps_per_epoch=12, total_steps=1200, min_steps=50) == 50
    assert warmup_steps(5.0, steps_per_epoch=100, total_steps=9000, min_steps=50) == 500
    assert warmup_steps(0.0, steps_per_epoch=12, total_steps=240, min_steps=50) == 0


def test_the_googlenet_rate_follows_the_global_batch_unless_set() -> None:
    from visionpipe.config import GoogLeNetConfig
    from visionpipe.training.distributed import DistContext
    from visionpipe.training.worker import peak_lr

    alone = DistContext(0, 0, 1, torch.device("cpu"), True)
    pair = DistContext(0, 0, 2, torch.device("cpu"), True)
    assert peak_lr(GoogLeNetConfig(batch_size=32), alone) == pytest.approx(0.0125)
    assert peak_lr(GoogLeNetConfig(batch_size=32), pair) == pytest.approx(0.025)
    assert peak_lr(GoogLeNetConfig(batch_size=32, grad_accumulation=4), pair) == pytest.approx(0.1)
    assert peak_lr(GoogLeNetConfig(batch_size=32, lr=0.05), pair) == 0.05


def test_checkpoint_round_trip_and_damage_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "ck" / "last.pt"
    digest = save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 2}, path)
    assert len(digest) == 64 and not list(path.parent.glob(".*.tmp"))
    assert load_checkpoint(path)["epoch"] == 2
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path)


def test_batch_larger_than_the_training_split_is_refused() -> None:
    with pytest.raises(ValueError, match="batch_size 500 is larger than the training split"):
        check_batch_size(500, 120)


@pytest.fixture()
def tiny_digits(vp_home: Path) -> PreparedDataset:
    return prepare_dataset(DataConfig(max_per_class=12))


def _random_weights(tmp_path: Path) -> Path:
    torch.manual_seed(1)
    path = tmp_path / "w.pth"
    torch.save(build_backbone("resnet18", 1000).state_dict(), path)
    return path


def test_finetune_runs_phases_checkpoints_and_keeps_the_best(tiny_digits: PreparedDataset,
                                                              tmp_path: Path) -> None:
    cfg = FinetuneConfig(arch="resnet18", batch_size=16, phases=[
        Phase(name="head", trainable=["fc"], epochs=1, lr=0.05),
        Phase(name="full", trainable=["*"], epochs=2, lr=0.02, warmup_epochs=0.5)])
    seen: list[dict[str, object]] = []
    result = finetune(cfg, tiny_digits, _random_weights(tmp_path), tmp_path / "out", seen.append)
    assert [r["phase"] for r in seen] == ["head", "full", "full"]
    assert result.epochs_run == 3 and Path(result.best_checkpoint).exists()
    best = load_checkpoint(Path(result.best_checkpoint))
    assert best["epoch"] == result.best_epoch and best["val_top1"] == result.best_val_top1
    assert FinetuneConfig.model_validate_json(best["config"]) == cfg
    # What a resume reads back, and no more (no scaler: bf16 needs none; no RNG state: every
    # epoch and step is seeded by its index).
    assert best.keys() == {"model", "optimizer", "scheduler", "config", "spec", "epoch", "step",
                           "phase", "val_top1", "progress", "phase_index", "phase_epoch",
                           "phase_done"}


def test_cached_features_train_the_same_head_as_forwarding_the_frozen_backbone(
    tiny_digits: PreparedDataset, tmp_path: Path
) -> None:
    weights = _random_weights(tmp_path)
    heads = []
    for cached in (True, False):
        cfg = FinetuneConfig(arch="resnet18", batch_size=16, cache_frozen_features=cached,
                             phases=[Phase(name="head", trainable=["fc"], epochs=2, lr=0.05)])
        result = finetune(cfg, tiny_digits, weights, tmp_path / f"out-{cached}")
        heads.append(load_checkpoint(Path(result.last_checkpoint))["model"])
    for key in ("fc.weight", "fc.bias"):
        torch.testing.assert_close(heads[0][key], heads[1][key], rtol=1e-4, atol=1e-5)
    assert torch.equal(heads[0]["layer1.0.bn1.running_mean"], heads[1]["layer1.0.bn1.running_mean"])


def test_an_efficientnet_fine_tunes_with_cached_features_under_its_own_classifier(
    tiny_digits: PreparedDataset, tmp_path: Path
) -> None:
    import torchvision

    from visionpipe.models import HEAD

    torch.manual_seed(1)
    weights = tmp_path / "efficientnet.pth"
    torch.save(torchvision.models.get_model("efficientnet_b0").state_dict(), weights)
    heads = []
    for cached in (True, False):
        cfg = FinetuneConfig(arch="efficientnet_b0", batch_size=16, cache_frozen_features=cached,
                             phases=[Phase(name="head", trainable=[HEAD], epochs=2, lr=0.05)])
        result = finetune(cfg, tiny_digits, weights, tmp_path / f"out-{cached}")
        assert result.epochs_run == 2
        heads.append(load_checkpoint(Path(result.last_checkpoint))["model"])
    # The head is classifier.1; the cached features are the input of that Linear.
    for key in ("classifier.1.weight", "classifier.1.bias"):
        torch.testing.assert_close(heads[0][key], heads[1][key], rtol=1e-4, atol=1e-5)
    key = "features.1.0.block.0.0.weight"
    torch.testing.assert_close(heads[0][key], torch.load(weights, weights_only=True)[key])


def test_auxiliary_losses_count_with_their_weight_in_training() -> None:
    from torch import nn

    from visionpipe.training.loop import classification_loss

    labels = torch.tensor([0, 1])
    main, aux2, aux1 = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    ce = nn.CrossEntropyLoss()
    loss, logits = classification_loss((main, aux2, aux1), labels, ce, aux_weight=0.3)
    expected = ce(main, labels) + 0.3 * (ce(aux1, labels) + ce(aux2, labels))
    torch.testing.assert_close(loss, expected)
    assert logits is main
    plain, _ = classification_loss(main, labels, ce, aux_weight=0.3)
    torch.testing.assert_close(plain, ce(main, labels))


def test_the_worker_runs_as_one_plain_process_without_torchrun_and_learns(
    vp_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visionpipe.config import GoogLeNetConfig
    from visionpipe.training.jobs import WorkerJob
    from visionpipe.training.result import TrainResult
    from visionpipe.training.worker import main

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    # 16 x 16 digits: a quarter of the default's pixels, so that six epochs from scratch stay short.
    digits = prepare_dataset(DataConfig(max_per_class=12, image_size=16))
    cfg = GoogLeNetConfig(epochs=6, batch_size=16, lr=0.02, warmup_epochs=0,
                          early_stopping_patience=6)  # six epochs, whatever val says
    job = WorkerJob(config=cfg, dataset=digits, out_dir=str(tmp_path),
                    result_path=str(tmp_path / "result.json"))
    (tmp_path / "job.json").write_text(job.model_dump_json())
    assert main([str(tmp_path / "job.json")]) == 0
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["world_size"] == 1 and (tmp_path / "result.json").exists()
    history = TrainResult.model_validate_json((tmp_path / "result.json").read_text()).history
    # Measured on 2 CPU cores: train loss 3.86 -> 2.64, train top-1 0.075 -> 0.59 (chance: 0.1).
    # Validation top-1 is still near chance this early (BatchNorm's running statistics lag
    # behind 30 steps of a network from scratch), so learning is checked on the training split.
    assert len(history) == 6 and history[-1]["train_loss"] < 0.85 * history[0]["train_loss"]
    assert history[-1]["train_top1"] >= 0.3


def test_googlenet_stops_early_in_its_second_half_and_a_resume_ends_there_too(
    vp_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from visionpipe.config import GoogLeNetConfig
    from visionpipe.training import worker
    from visionpipe.training.core import parse_epoch_line
    from visionpipe.training.jobs import WorkerJob
    from visionpipe.training.loop import EpochStats
    from visionpipe.training.result import TrainResult

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    # A validation score that never improves after the first epoch.
    monkeypatch.setattr(worker, "validate", lambda *a, **k: EpochStats(50.0, 50, 100, 0.1))
    digits = prepare_dataset(DataConfig(max_per_class=6, image_size=16))
    cfg = GoogLeNetConfig(epochs=10, batch_size=16, early_stopping_patience=2)
    job = WorkerJob(config=cfg, dataset=digits, out_dir=str(tmp_path),
                    result_path=str(tmp_path / "result.json"))
    (tmp_path / "job.json").write_text(job.model_dump_json())
    assert worker.main([str(tmp_path / "job.json")]) == 0
    result = TrainResult.model_validate_json((tmp_path / "result.json").read_text())
    # The first half's epochs may be neither the best nor stop the run: epoch 6 is the first
    # that can be the best, and epochs 7 and 8 without a better score stop it.
    assert result.epochs_run == 8 and len(result.history) == 8 and result.best_epoch == 6
    records = [parse_epoch_line(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["epoch"] for r in records if r is not None] == list(range(1, 9))
    assert worker.main([str(tmp_path / "job.json")]) == 0  # a retried task resumes: no epoch more
    again = TrainResult.model_validate_json((tmp_path / "result.json").read_text())
    assert again.epochs_run == 8 and again.history == result.history
    assert not [line for line in capsys.readouterr().out.splitlines() if parse_epoch_line(line)]


class _Interrupt(Exception):
    pass


def test_an_interrupted_finetune_resumes_mid_phase_to_the_same_weights(
    tiny_digits: PreparedDataset, tmp_path: Path
) -> None:
    cfg = FinetuneConfig(arch="resnet18", batch_size=16, phases=[
        Phase(name="head", trainable=["fc"], epochs=1, lr=0.05),
        Phase(name="full", trainable=["*"], epochs=3, lr=0.01, warmup_epochs=0.5)])
    weights = _random_weights(tmp_path)
    straight = finetune(cfg, tiny_digits, weights, tmp_path / "straight")

    def stop_after_two(record: dict[str, object]) -> None:
        if record["epoch"] == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        finetune(cfg, tiny_digits, weights, tmp_path / "retried", stop_after_two)
    resumed = finetune(cfg, tiny_digits, weights, tmp_path / "retried")
    assert resumed.resumed_from_epoch == 2 and resumed.epochs_run == straight.epochs_run == 4
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    a = load_checkpoint(Path(straight.last_checkpoint))["model"]
    b = load_checkpoint(Path(resumed.last_checkpoint))["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    from visionpipe.training.checkpoint import latest_checkpoint, rotate_and_save

    rotate_and_save({"model": {}, "epoch": 1}, tmp_path)
    rotate_and_save({"model": {}, "epoch": 2}, tmp_path)
    assert latest_checkpoint(tmp_path)["epoch"] == 2  # type: ignore[index]
    (tmp_path / "last.pt").write_bytes(b"half a file")
    state = latest_checkpoint(tmp_path)
    assert state is not None and state["epoch"] == 1 and state["path"].endswith("prev.pt")
    assert "skipping checkpoint" in caplog.text


def test_an_improved_epoch_is_serialised_once_as_best_and_last(tmp_path: Path) -> None:
    from visionpipe.training.checkpoint import latest_checkpoint, rotate_and_save

    rotate_and_save({"model": {"w": torch.zeros(4)}, "epoch": 1}, tmp_path, best=True)
    digest = rotate_and_save({"model": {"w": torch.ones(4)}, "epoch": 2}, tmp_path, best=True)
    best, last, prev = (tmp_path / f"{n}.pt" for n in ("best", "last", "prev"))
    assert best.read_bytes() == last.read_bytes() and not best.samefile(last)
    assert digest == hashlib.sha256(best.read_bytes()).hexdigest()
    assert load_checkpoint(best)["epoch"] == load_checkpoint(last)["epoch"] == 2
    assert load_checkpoint(prev)["epoch"] == 1
    assert not list(tmp_path.glob(".*.tmp"))
    # Two files, not two names for one: damage to the newest leaves the best whole.
    last.write_bytes(b"half a file")
    assert latest_checkpoint(tmp_path)["epoch"] == 1  # type: ignore[index]
    assert torch.equal(load_checkpoint(best)["model"]["w"], torch.ones(4))


class _Killed(Exception):
    pass


def test_a_rotation_killed_at_any_point_leaves_a_checkpoint_to_resume_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process dies before the n-th rename or link of a rotation, for every n."""
    import os
    import shutil

    from visionpipe.training.checkpoint import latest_checkpoint, rotate_and_save

    start = tmp_path / "start"
    for epoch in (1, 2):
        rotate_and_save({"model": {"w": torch.full((4,), epoch)}, "epoch": epoch}, start)
    real_replace, real_link = os.replace, os.link
    for best in (False, True):
        for n in range(8):
            folder = tmp_path / f"{best}-{n}"
            shutil.copytree(start, folder)
            calls = 0

            def dying(real):  # type: ignore[no-untyped-def]
                def call(*args):  # type: ignore[no-untyped-def]
                    nonlocal calls
                    calls += 1
                    if calls > n:
                        raise _Killed
                    return real(*args)
                return call

            monkeypatch.setattr(os, "replace", dying(real_replace))
            monkeypatch.setattr(os, "link", dying(real_link))
            try:
                rotate_and_save({"model": {"w": torch.full((4,), 3)}, "epoch": 3}, folder, best=best)
            except _Killed:
                pass
            monkeypatch.setattr(os, "replace", real_replace)
            monkeypatch.setattr(os, "link", real_link)
            saved = latest_checkpoint(folder)
            assert saved is not None and saved["epoch"] in (2, 3), (best, n)


def test_resuming_with_another_config_is_refused(tiny_digits: PreparedDataset, tmp_path: Path) -> None:
    cfg = FinetuneConfig(arch="resnet18", batch_size=16,
                         phases=[Phase(name="head", trainable=["fc"], epochs=1, lr=0.05)])
    weights = _random_weights(tmp_path)
    finetune(cfg, tiny_digits, weights, tmp_path / "out")
    other = cfg.model_copy(update={"batch_size": 8})
    with pytest.raises(ValueError, match="another finetune config"):
        finetune(other, tiny_digits, weights, tmp_path / "out")


def test_the_fast_path_resolves_per_device_and_trains_on_the_cpu_when_forced(
    tiny_digits: PreparedDataset, tmp_path: Path
) -> None:
    from visionpipe.config import FastPathConfig

    cpu = resolve_fast_path(FastPathConfig(), "cpu")
    assert not (cpu.autocast_bf16 or cpu.data_on_device or cpu.compile)
    assert cpu.channels_last  # oneDNN's convolutions are faster on NHWC too
    assert not resolve_fast_path(FastPathConfig(channels_last=False), "cpu").channels_last
    gpu = resolve_fast_path(FastPathConfig(), "cuda")
    assert gpu.autocast_bf16 and gpu.channels_last and gpu.cudnn_benchmark and gpu.data_on_device
    assert not resolve_fast_path(FastPathConfig(channels_last=False), "cuda").channels_last
    cfg = FinetuneConfig(arch="resnet18", batch_size=16,
                         fast=FastPathConfig(autocast_bf16=True, channels_last=True),
                         phases=[Phase(name="full", trainable=["*"], epochs=1, lr=0.01)])
    result = finetune(cfg, tiny_digits, _random_weights(tmp_path), tmp_path / "out")
    assert result.epochs_run == 1 and math.isfinite(result.history[0]["train_loss"])


def test_channels_last_leaves_cached_feature_batches_as_they_are() -> None:
    """A frozen phase's cached features (N x C) train under the NHWC fast path, as on a GPU."""
    from visionpipe.config import FastPathConfig
    from visionpipe.training.loop import predict_logits, train_one_epoch

    fast = resolve_fast_path(FastPathConfig(channels_last=True), "cpu")
    head = nn.Linear(8, 3)
    features, labels = torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    stats = train_one_epoch(head, [(features, labels)], optimizer, None, nn.CrossEntropyLoss(),
                            torch.device("cpu"), fast_path=fast)
    assert stats.count == 6 and math.isfinite(stats.loss_sum)
    logits, _ = predict_logits(head, [(features, labels)], torch.device("cpu"), fast)
    assert logits.shape == (6, 3)


def test_random_weights_with_only_frozen_phases_are_refused(tiny_digits: PreparedDataset,
                                                            tmp_path: Path) -> None:
    cfg = FinetuneConfig(arch="resnet18", batch_size=16,
                         phases=[Phase(name="head", trainable=["fc"], epochs=1, lr=0.05)])
    with pytest.raises(ValueError, match="no phase trained"):
        finetune(cfg, tiny_digits, _random_weights(tmp_path), tmp_path / "out", random_init=True)


def test_an_empty_compile_switch_compiles_only_long_gpu_fine_tunes() -> None:
    from visionpipe.config import FastPathConfig

    auto = FastPathConfig()
    assert resolve_fast_path(auto, "cuda", planned_images=auto.compile_min_images).compile
    assert not resolve_fast_path(auto, "cuda", planned_images=auto.compile_min_images - 1).compile
    assert not resolve_fast_path(auto, "cuda").compile  # GoogLeNet's worker passes no run length
    assert not resolve_fast_path(auto, "cpu", planned_images=10**9).compile
    assert not resolve_fast_path(FastPathConfig(compile=False), "cuda",
                                 planned_images=10**9).compile
    assert resolve_fast_path(FastPathConfig(compile=True), "cpu").compile
    # CUDA graphs: measured fastest
    assert resolve_fast_path(auto, "cuda").compile_mode == "reduce-overhead"
    assert resolve_fast_path(auto, "cuda", distributed=True).compile_mode == "default"
    assert resolve_fast_path(auto, "cpu").compile_mode == "default"  # no CUDA graphs without CUDA
    # CUDA graph replays would overwrite the gradients that accumulation adds to.
    assert resolve_fast_path(auto, "cuda", grad_accumulation=2).compile_mode == "default"
    explicit = FastPathConfig(compile=True, compile_mode="reduce-overhead")
    assert resolve_fast_path(explicit, "cuda", grad_accumulation=2).compile_mode == "default"
    assert resolve_fast_path(explicit, "cuda").compile_mode == "reduce-overhead"


def test_a_checkpoint_resumes_across_speed_only_switches_but_not_arithmetic_ones() -> None:
    from visionpipe.config import FastPathConfig, GoogLeNetConfig
    from visionpipe.training.resume import same_training

    # A checkpoint from before compile could be empty stored "compile": false.
    saved = FinetuneConfig.model_validate_json(
        FinetuneConfig().model_dump_json().replace('"compile":null', '"compile":false'))
    assert saved.fast.compile is False
    assert same_training(saved, FinetuneConfig())
    faster = FinetuneConfig(fast=FastPathConfig(compile=True, compile_mode="default", num_workers=3,
                                                compile_min_images=5))
    assert same_training(FinetuneConfig(), faster)
    assert not same_training(FinetuneConfig(), FinetuneConfig(fast=FastPathConfig(autocast_bf16=True)))
    assert not same_training(FinetuneConfig(), FinetuneConfig(augment=True))
    assert same_training(GoogLeNetConfig(), GoogLeNetConfig(fast=FastPathConfig(compile=True)),
                         ignore={"launch"})
    explicit_default = FastPathConfig(compile_mode="default")
    assert resolve_fast_path(explicit_default, "cuda").compile_mode == "default"


def test_a_compiled_step_runs_the_short_last_batch_eagerly() -> None:
    from visionpipe.config import FastPathConfig
    from visionpipe.training.loop import FullBatchCompiled, maybe_compile

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 10))
    fast = resolve_fast_path(FastPathConfig(compile=True), "cpu")
    wrapped = maybe_compile(net, fast, batch_size=8)
    assert isinstance(wrapped, FullBatchCompiled)
    full, short = torch.randn(8, 3, 12, 12), torch.randn(3, 3, 12, 12)
    assert torch.allclose(wrapped(full), net(full), atol=1e-5)
    assert wrapped.eager_calls == 0
    out = wrapped(short)
    assert out.shape == (3, 10) and wrapped.eager_calls == 1
    assert torch.equal(out, net(short))
    out.sum().backward()  # gradients reach the one set of parameters both paths share
    assert all(p.grad is not None for p in net.parameters())
    assert {id(p) for p in wrapped.parameters()} == {id(p) for p in net.parameters()}


def test_a_compiled_fine_tune_trains_with_a_short_last_batch(tiny_digits: PreparedDataset,
                                                             tmp_path: Path) -> None:
    from visionpipe.config import FastPathConfig

    train = tiny_digits.split_counts["train"]
    batch = 16 if train % 16 else 15
    assert train % batch  # the last batch is short
    cfg = FinetuneConfig(arch="resnet18", batch_size=batch, fast=FastPathConfig(compile=True),
                         phases=[Phase(name="full", trainable=["*"], epochs=1, lr=0.01)])
    result = finetune(cfg, tiny_digits, _random_weights(tmp_path), tmp_path / "out")
    assert result.epochs_run == 1 and math.isfinite(result.history[0]["train_loss"])


def test_a_lone_last_training_image_is_left_out_where_batchnorm_could_not_take_it(
    tiny_digits: PreparedDataset, tmp_path: Path
) -> None:
    """ResNet's last stage is 1 x 1 at 32 px: a batch of one image cannot be batch-normalised."""
    count = tiny_digits.split_counts["train"]
    weights = _random_weights(tmp_path)
    full = FinetuneConfig(arch="resnet18", batch_size=count - 1,
                          phases=[Phase(name="full", trainable=["*"], epochs=1, lr=0.02)])
    result = finetune(full, tiny_digits, weights, tmp_path / "full")
    assert load_checkpoint(Path(result.last_checkpoint))["scheduler"]["last_epoch"] == 1
    heads = []
    for cached in (True, False):  # the frozen phase's feature cache leaves out the same image
        cfg = FinetuneConfig(arch="resnet18", batch_size=count - 1, cache_frozen_features=cached,
                             phases=[Phase(name="head", trainable=["fc"], epochs=2, lr=0.05)])
        result = finetune(cfg, tiny_digits, weights, tmp_path / f"head-{cached}")
        heads.append(load_checkpoint(Path(result.last_checkpoint)))
    assert [h["scheduler"]["last_epoch"] for h in heads] == [2, 2], "one step per epoch"
    torch.testing.assert_close(heads[0]["model"]["fc.weight"], heads[1]["model"]["fc.weight"],
                               rtol=1e-4, atol=1e-5)


def test_every_rank_leaves_out_its_lone_last_image_alike() -> None:
    from visionpipe.config import GoogLeNetConfig
    from visionpipe.training.distributed import DistContext
    from visionpipe.training.core import TrainingData
    from visionpipe.training.worker import rank_batches

    images = torch.zeros(21, 3, 8, 8, dtype=torch.uint8)  # 11 per rank: DistributedSampler pads
    for rank in (0, 1):
        ctx = DistContext(rank, 0, 2, torch.device("cpu"), rank == 0)
        for batch, sizes in ((5, [5, 5]), (4, [4, 4, 3])):  # 5: the same steps on every rank
            cfg = GoogLeNetConfig(batch_size=batch)
            data = TrainingData(None, cfg.fast, torch.device("cpu"), splits={
                "train": (images, torch.arange(21)), "val": (images, torch.arange(21))})
            loader = rank_batches(data, cfg, ctx)[0](1)
            assert [len(y) for _, y in loader] == sizes


def test_a_schedule_resumed_in_another_world_size_goes_on_where_its_epochs_left_it(
    tiny_digits: PreparedDataset, tmp_path: Path
) -> None:
    from visionpipe.config import GoogLeNetConfig
    from visionpipe.training.checkpoint import save_checkpoint
    from visionpipe.training.distributed import DistContext
    from visionpipe.training.jobs import WorkerJob
    from visionpipe.training.worker import _build_trainer, _save_checkpoint, peak_lr

    cfg = GoogLeNetConfig(epochs=4, batch_size=16, warmup_epochs=0)
    job = WorkerJob(config=cfg, dataset=tiny_digits, out_dir=str(tmp_path),
                    result_path=str(tmp_path / "result.json"))
    alone = DistContext(0, 0, 1, torch.device("cpu"), True)
    fast = resolve_fast_path(cfg.fast, "cpu")
    # What a world of 2 leaves after 2 of its 4 epochs of 3 steps each.
    trainer = _build_trainer(job, alone, 3, fast)
    for _ in range(2 * 3):
        trainer.optimizer.step()
        trainer.scheduler.step()
    trainer.progress.epoch = 2
    trainer.progress.history.append({"val_top1": 0.0})
    _save_checkpoint(trainer, improved=False)
    state = load_checkpoint(tmp_path / "last.pt")
    save_checkpoint({**state, "world_size": 2}, tmp_path / "last.pt")
    # Alone, an epoch has twice the steps: half the run is 2 x 6 steps, half-way down the cosine.
    resumed = _build_trainer(job, alone, 6, fast)
    assert resumed.scheduler.last_epoch == 12
    peak = peak_lr(cfg, alone)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(peak * 0.5)
    assert resumed.scheduler.get_last_lr() == [pytest.approx(peak * 0.5)]


@pytest.mark.parametrize("count", [100, 70])  # last groups: (32, 4) and (6)
def test_a_split_batch_with_accumulation_trains_as_the_whole_batch(count: int) -> None:
    """What the out-of-memory retry relies on: 32 x 2 gives the weights of 64, short groups too."""
    from torch import nn

    from visionpipe.training.loop import train_one_epoch

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(count, 8, generator=gen), torch.randint(0, 3, (count,), generator=gen)
    weights = []
    for batch, accumulation in ((64, 1), (32, 2)):
        torch.manual_seed(0)
        model = nn.Linear(8, 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        batches = list(zip(x.split(batch), y.split(batch), strict=True))
        train_one_epoch(model, batches, optimizer, None, nn.CrossEntropyLoss(),
                        torch.device("cpu"), accumulation=accumulation)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-5, atol=1e-6)
