"""The trainer core both trainers share: progress, checkpoints, resume check, records, batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from visionpipe import tracking
from visionpipe.config import DataConfig, FastPathConfig, FinetuneConfig, GoogLeNetConfig
from visionpipe.data import PreparedDataset, prepare_dataset
from visionpipe.models import ModelSpec
from visionpipe.errors import CheckpointError, is_transient
from visionpipe.training.checkpoint import latest_checkpoint, save_checkpoint
from visionpipe.training.fastpath import resolve_fast_path
from visionpipe.training.core import (
    Progress,
    Shard,
    TrainingData,
    check_resumable,
    in_second_half,
    epoch_callbacks,
    epoch_record,
    load_training_data,
    save_progress,
)
from visionpipe.training.loop import EpochStats
from visionpipe.training.oom import batch_split_factor, is_out_of_memory, with_oom_fallback

CPU = torch.device("cpu")


def _record(epoch: int, val_top1: float, phase: str = "train") -> dict[str, object]:
    val = EpochStats(25.0, round(val_top1 * 100), 100, 0.5)  # mean loss 0.25
    return epoch_record(epoch, EpochStats(2.0, 3, 4, 1.0), val, phase=phase, phase_epoch=epoch)


def test_progress_keeps_the_best_epoch_and_counts_epochs_since() -> None:
    progress = Progress(step=7)  # a preemption checkpoint's step ends with its epoch
    assert progress.end_epoch(_record(1, 0.25)) and progress.step == 0
    assert not progress.end_epoch(_record(2, 0.25)), "a tie is no improvement"
    assert not progress.end_epoch(_record(3, 0.1))
    assert (progress.epoch, progress.best_epoch, progress.best_top1, progress.since_best) == (3, 1, 0.25, 2)
    assert progress.end_epoch(_record(4, 0.5)) and progress.since_best == 0
    assert [r["epoch"] for r in progress.history] == [1, 2, 3, 4]


def test_an_epoch_record_names_its_phase_and_both_losses() -> None:
    record = _record(3, 0.25, phase="head")
    assert record["phase"] == "head" and record["epoch"] == 3 and record["phase_epoch"] == 3
    assert record["train_loss"] == 0.5 and record["train_top1"] == 0.75
    assert record["val_loss"] == 0.25 and record["val_top1"] == 0.25
    assert record["train_images_per_s"] == 4.0 and record["val_seconds"] == 0.5


def _save(out_dir: Path, cfg: GoogLeNetConfig, progress: Progress, improved: bool) -> nn.Module:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    spec = ModelSpec(arch="googlenet", num_classes=2, class_names=["a", "b"], image_size=32)
    save_progress(out_dir, model=model, optimizer=optimizer,
                  scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), cfg=cfg,
                  spec=spec, progress=progress, phase="train", improved=improved, world_size=2)
    return model


def test_a_checkpoint_gives_back_the_progress_and_what_the_trainer_added(tmp_path: Path) -> None:
    cfg = GoogLeNetConfig(epochs=3)
    progress = Progress(skipped=["head"])
    progress.end_epoch(_record(1, 0.5))
    progress.end_epoch(_record(2, 0.4))
    progress.step = 5  # preempted 5 steps into epoch 3
    model = _save(tmp_path, cfg, progress, improved=False)
    saved = latest_checkpoint(tmp_path)
    assert saved is not None and saved["world_size"] == 2 and saved["phase"] == "train"
    assert not (tmp_path / "best.pt").exists(), "best.pt only when the epoch improved"
    torch.testing.assert_close(saved["model"]["weight"], model.weight.detach())
    restored = Progress.restored(saved)
    assert restored.resumed_from_epoch == 2 and restored.step == 5
    assert restored == Progress(epoch=2, step=5, best_top1=0.5, best_epoch=1, since_best=1,
                                history=progress.history, skipped=["head"], resumed_from_epoch=2)


def test_resume_is_refused_under_another_training_config_with_one_message(tmp_path: Path) -> None:
    cfg = GoogLeNetConfig(epochs=3)
    _save(tmp_path, cfg, Progress(), improved=True)
    saved = latest_checkpoint(tmp_path)
    assert saved is not None
    relaunched = cfg.model_copy(update={"launch": cfg.launch.model_copy(update={"nnodes": "2"})})
    assert check_resumable(saved, relaunched, ignore={"launch"}) == cfg
    with pytest.raises(ValueError, match=r"last.pt was written with another googlenet config; "
                                         r"use a new flow run, or delete that folder"):
        check_resumable(saved, cfg.model_copy(update={"lr": 0.05}))
    finetune = FinetuneConfig()
    saved["config"] = finetune.model_dump_json()
    with pytest.raises(ValueError, match="another finetune config"):
        check_resumable(saved, finetune.model_copy(update={"seed": finetune.seed + 1}))


def test_only_an_epoch_of_the_second_half_can_be_the_best() -> None:
    progress = Progress()
    assert not progress.end_epoch(_record(1, 0.9), eligible=in_second_half(1, 4))
    assert not progress.end_epoch(_record(2, 0.8), eligible=in_second_half(2, 4))
    assert progress.since_best == 2 and progress.best_epoch == 0
    assert progress.end_epoch(_record(3, 0.3), eligible=in_second_half(3, 4)), "the first eligible"
    assert progress.best_epoch == 3 and progress.best_top1 == 0.3
    assert in_second_half(1, 1) and not in_second_half(2, 5) and in_second_half(3, 5)


def test_a_checkpoint_of_an_older_visionpipe_is_refused_with_the_fix_and_kept(tmp_path: Path) -> None:
    # What the trainers wrote before the core: the progress spread over top-level keys.
    cfg = GoogLeNetConfig(epochs=3)
    old = {"model": nn.Linear(2, 2).state_dict(), "optimizer": {}, "scheduler": {},
           "config": cfg.model_dump_json(), "epoch": 1, "step": 0, "best": 0.5, "history": [],
           "scaler": None, "rng": None}
    save_checkpoint(old, tmp_path / "last.pt")
    saved = latest_checkpoint(tmp_path)
    assert saved is not None
    with pytest.raises(CheckpointError, match=r"last.pt has no 'progress': it was written by an "
                                              r"older visionpipe.*Fix: start a new flow run"):
        check_resumable(saved, cfg)
    assert not is_transient(CheckpointError("x")), "a retry would only meet the same file"
    assert (tmp_path / "last.pt").is_file(), "the refusal deletes nothing"


def test_epoch_metrics_go_to_mlflow_from_rank_0_only(vp_home: Path) -> None:
    experiment = tracking.ensure_experiment("core-test")
    run_id = tracking.start_run(experiment, "candidate")
    seen: list[dict[str, object]] = []
    assert epoch_callbacks(run_id, seen.append, is_main=False) == []
    for callback in epoch_callbacks(run_id, seen.append):
        callback(_record(2, 0.75, phase="full"))
    assert len(seen) == 1
    metrics = tracking.client().get_run(run_id).data.metrics
    assert metrics["val_top1"] == 0.75 and metrics["val_loss"] == 0.25
    assert not {"epoch", "phase", "phase_epoch"} & metrics.keys()
    history = tracking.client().get_metric_history(run_id, "val_top1")
    assert [m.step for m in history] == [2]
    assert epoch_callbacks(None, None, seen.append) == [seen.append], "no run: no MLflow"


@pytest.fixture()
def tiny_digits(vp_home: Path) -> PreparedDataset:
    return prepare_dataset(DataConfig(max_per_class=12))


def _labels(batches: object) -> list[int]:
    return torch.cat([y for _, y in batches]).tolist()  # type: ignore[attr-defined]


def test_one_loader_choice_gives_the_same_batches_in_memory_and_streamed(
        tiny_digits: PreparedDataset) -> None:
    per_kind = []
    for streaming in (False, True):
        fast = FastPathConfig(streaming=streaming, num_workers=0)
        data = load_training_data(tiny_digits, fast, CPU, resolve_fast_path(fast, "cpu"))
        assert data.streaming is streaming
        first = data.batches("train", 8, shuffle=True, augment=True, seed=3, drop_lone_last=True)
        per_kind.append([(x.clone(), y.clone()) for x, y in first])
        again = data.batches("train", 8, shuffle=True, augment=True, seed=4, drop_lone_last=True)
        if streaming:  # one persistent loader per kind, re-seeded each epoch
            assert again is first and len(data.streams) == 1
        assert _labels(again) != _labels(per_kind[-1]), "another seed, another shuffle"
    for (xa, ya), (xb, yb) in zip(*per_kind, strict=True):
        assert torch.equal(ya, yb)
        torch.testing.assert_close(xa, xb)


def test_shards_split_training_and_validation_between_the_ranks(tiny_digits: PreparedDataset) -> None:
    fast = FastPathConfig(streaming=False)
    data = load_training_data(tiny_digits, fast, CPU, resolve_fast_path(fast, "cpu"))
    count = data.count("val")
    _, whole = data.splits["val"]
    shares = [_labels(data.batches("val", 4, shuffle=False, augment=False, seed=0,
                                   shard=Shard(rank, 2))) for rank in (0, 1)]
    assert shares[0] == whole[0::2].tolist() and shares[1] == whole[1::2].tolist()
    assert len(shares[0]) + len(shares[1]) == count
    ids = TrainingData(None, fast, CPU, splits={"train": (torch.zeros(10, 3, 8, 8, dtype=torch.uint8),
                                                          torch.arange(10))})
    train = {epoch: [_labels(ids.batches("train", 2, shuffle=True, augment=False, seed=0,
                                         epoch=epoch, shard=Shard(rank, 2, seed=5)))
                     for rank in (0, 1)] for epoch in (1, 2)}
    for epoch in (1, 2):
        assert sorted(train[epoch][0] + train[epoch][1]) == list(range(10)), "each image once"
    assert train[1] != train[2], "DistributedSampler draws a new shard order each epoch"


def test_in_memory_data_counts_the_tensors_it_was_given() -> None:
    images = torch.zeros(5, 3, 8, 8, dtype=torch.uint8)
    data = TrainingData(None, FastPathConfig(), CPU, splits={"train": (images, torch.arange(5)),
                                                             "val": (images[:2], torch.arange(2))})
    assert (data.count("train"), data.count("val"), data.streaming) == (5, 2, False)
    # 5 images in batches of 4 leave one alone: it is dropped (BatchNorm needs 2).
    assert [len(y) for _, y in data.batches("train", 4, shuffle=True, augment=False, seed=0,
                                            drop_lone_last=True)] == [4]


def test_an_odd_batch_out_of_memory_keeps_the_global_batch_or_says_why_it_cannot() -> None:
    assert [batch_split_factor(b) for b in (64, 65, 9, 67, 3, 2)] == [2, 5, 3, None, None, None]
    calls: list[tuple[int, int]] = []

    def train(cfg: GoogLeNetConfig) -> str:
        calls.append((cfg.batch_size, cfg.grad_accumulation))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (raised by the test)")
        return "trained"

    assert with_oom_fallback(GoogLeNetConfig(batch_size=65), train) == "trained"  # type: ignore[arg-type]
    assert calls == [(65, 1), (13, 5)], "65 = 13 x 5: the global batch of the checkpoints"
    calls.clear()
    with pytest.raises(RuntimeError, match="batch of 67, which cannot be split") as err:
        with_oom_fallback(GoogLeNetConfig(batch_size=67), train)  # type: ignore[arg-type]
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError) and calls == [(67, 1)]
    assert not is_out_of_memory(ValueError("no")), "other errors are not retried with a split batch"
