"""The streaming path for large datasets gives the batches, and so the weights, of the in-memory one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from visionpipe.config import DataConfig, FastPathConfig, FinetuneConfig, GoogLeNetConfig, Phase
from visionpipe.data import PreparedDataset, build_loader, load_split, prepare_dataset
from visionpipe.data.streaming import StreamingLoader, decoded_bytes
from visionpipe.models import build_resnet
from visionpipe.training.checkpoint import load_checkpoint

CPU = torch.device("cpu")


@pytest.fixture()
def tiny_digits(vp_home: Path) -> PreparedDataset:
    return prepare_dataset(DataConfig(max_per_class=12))


def _same(batches: list[tuple[torch.Tensor, torch.Tensor]],
          expected: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return len(batches) == len(expected) and all(
        torch.equal(x, ex) and torch.equal(y, ey) for (x, y), (ex, ey) in zip(batches, expected, strict=True))


@pytest.mark.parametrize("decode_on_device", [False, True])
def test_streamed_batches_equal_the_in_memory_ones_epoch_after_epoch(
        tiny_digits: PreparedDataset, decode_on_device: bool) -> None:
    images, labels = load_split(tiny_digits, "train")
    stream = StreamingLoader(tiny_digits, "train", 16, shuffle=True, augment=True, seed=0,
                             device=CPU, num_workers=2, decode_on_device=decode_on_device)
    assert stream.loader.persistent_workers
    workers = None
    for epoch in (3, 4):  # the in-memory path is rebuilt with seed + epoch every epoch
        stream.set_epoch(epoch)
        got = list(stream)
        assert _same(got, list(build_loader(images, labels, 16, shuffle=True, augment=True, seed=epoch)))
        pids = [w.pid for w in stream.loader._iterator._workers]  # type: ignore[union-attr]
        assert workers is None or pids == workers, "the workers were started again"
        workers = pids


def test_streaming_starts_above_the_memory_limit(tiny_digits: PreparedDataset) -> None:
    size = decoded_bytes(tiny_digits, "train")
    assert size == tiny_digits.split_counts["train"] * 3 * tiny_digits.image_size ** 2
    assert not FastPathConfig().wants_streaming(size)
    assert FastPathConfig(memory_limit_gb=size / 2**30 / 2).wants_streaming(size)
    assert FastPathConfig(streaming=True).wants_streaming(1)


def test_a_streamed_finetune_ends_with_the_weights_of_the_in_memory_one(
        tiny_digits: PreparedDataset, tmp_path: Path) -> None:
    from visionpipe.training.finetune import finetune

    torch.manual_seed(1)
    weights = tmp_path / "w.pth"
    torch.save(build_resnet("resnet18", 1000).state_dict(), weights)
    states = []
    for streaming in (False, True):
        cfg = FinetuneConfig(arch="resnet18", batch_size=16, augment=False,
                             fast=FastPathConfig(streaming=streaming, num_workers=1),
                             phases=[Phase(name="head", trainable=["fc"], epochs=1, lr=0.05),
                                     Phase(name="full", trainable=["*"], epochs=1, lr=0.02)])
        result = finetune(cfg, tiny_digits, weights, tmp_path / f"out-{streaming}")
        states.append(load_checkpoint(Path(result.last_checkpoint))["model"])
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_a_streamed_googlenet_ends_with_the_weights_of_the_in_memory_one(
        tiny_digits: PreparedDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from visionpipe.training.worker import WorkerJob, main

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    states = []
    for streaming in (False, True):
        out = tmp_path / f"out-{streaming}"
        cfg = GoogLeNetConfig(epochs=1, batch_size=16, augment=True,
                              fast=FastPathConfig(streaming=streaming, num_workers=1))
        job = WorkerJob(config=cfg, dataset=tiny_digits, out_dir=str(out),
                        result_path=str(out / "result.json"))
        out.mkdir()
        (out / "job.json").write_text(job.model_dump_json())
        assert main([str(out / "job.json")]) == 0
        states.append(load_checkpoint(out / "last.pt")["model"])
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_each_rank_streams_the_shard_and_crops_it_would_slice_from_memory(
        tiny_digits: PreparedDataset) -> None:
    from visionpipe.training.distributed import DistContext
    from visionpipe.training.worker import _batches

    seen: list[torch.Tensor] = []
    for rank in (0, 1):
        ctx = DistContext(rank, 0, 2, CPU, rank == 0)  # a world of 2; no process group needed
        per_path = []
        for streaming in (False, True):
            cfg = GoogLeNetConfig(batch_size=8, augment=True,
                                  fast=FastPathConfig(streaming=streaming, num_workers=0))
            epoch_batches, _ = _batches(tiny_digits, cfg, ctx, cfg.fast.resolve("cpu"))
            per_path.append(list(epoch_batches(2)))
        assert _same(per_path[1], per_path[0])
        seen.append(torch.cat([y for _, y in per_path[0]]))
    # The two shards together are the split, each image once.
    assert sum(len(s) for s in seen) == tiny_digits.split_counts["train"]


def test_each_rank_validates_its_own_share_streamed_or_from_memory(
        tiny_digits: PreparedDataset) -> None:
    from visionpipe.training.distributed import DistContext
    from visionpipe.training.worker import _batches

    count = tiny_digits.split_counts["val"]
    _, whole = load_split(tiny_digits, "val")
    for world in (2, count + 1):  # in the larger world the last rank's share is empty
        shares = []
        for rank in range(world) if world == 2 else (0, count):
            ctx = DistContext(rank, 0, world, CPU, rank == 0)
            per_path = []
            for streaming in (False, True):
                cfg = GoogLeNetConfig(batch_size=4, fast=FastPathConfig(streaming=streaming,
                                                                         num_workers=0))
                _, val = _batches(tiny_digits, cfg, ctx, cfg.fast.resolve("cpu"))
                per_path.append(list(val))
            assert _same(per_path[1], per_path[0])
            labels = [y for _, y in per_path[0]]
            shares.append(torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64))
        if world == 2:  # image i on rank i % 2: the two shares are the split, each image once
            assert torch.equal(torch.stack([shares[0][:len(shares[1])], shares[1]], 1).reshape(-1),
                               whole[:2 * len(shares[1])])
            assert len(shares[0]) + len(shares[1]) == count
        else:
            assert torch.equal(shares[0], whole[:1]) and len(shares[1]) == 0
