"""Real torchrun on the CPU: 2 gloo ranks, the worker's own pieces, the launcher's failure path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from visionpipe import tracking
from visionpipe.config import DataConfig, FinetuneConfig, GoogLeNetConfig, LaunchConfig, Phase
from visionpipe.data import PreparedDataset, prepare_dataset
from visionpipe.evaluation import load_trained_model
from visionpipe.models import build_backbone
from visionpipe.training.checkpoint import load_checkpoint
from visionpipe.training.core import load_training_data, parse_epoch_line
from visionpipe.training.fastpath import resolve_fast_path
from visionpipe.training.jobs import WorkerJob, finetune_processes, launch_finetune
from visionpipe.training.launch import LaunchError, run_torchrun, torchrun_command, worker_env
from visionpipe.training.loop import evaluate

pytestmark = pytest.mark.integration
PROBE = Path(__file__).with_name("ddp_probe.py")


def _torchrun_script(args: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "--tee=3", str(PROBE), *args]


def _run(cmd: list[str], nproc: int = 2) -> list[tuple[int | None, str]]:
    lines: list[tuple[int | None, str]] = []
    run_torchrun(cmd, 300, lambda rank, line: lines.append((rank, line)), env=worker_env(nproc))
    return lines


def test_ranks_see_disjoint_shards_and_keep_identical_weights(tmp_path: Path) -> None:
    _run(_torchrun_script(["shards", str(tmp_path)]))
    seen = [json.loads((tmp_path / f"shards-{r}.json").read_text()) for r in (0, 1)]
    for epoch in ("1", "2"):
        a, b = set(seen[0][epoch]), set(seen[1][epoch])
        assert not a & b and a | b == set(range(22)), "shards overlap or miss samples"
    assert seen[0]["1"] != seen[0]["2"], "set_epoch did not reshuffle"
    w0, w1 = (torch.load(tmp_path / f"weights-{r}.pt", weights_only=True) for r in (0, 1))
    initial = torch.load(tmp_path / "initial.pt", weights_only=True)
    assert not torch.equal(initial["fc.weight"], w0["fc.weight"]), "the step changed nothing"
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "DDP ranks diverged after a step"


def test_syncbn_step_on_two_ranks_matches_one_process_with_the_double_batch(tmp_path: Path) -> None:
    _run(_torchrun_script(["syncbn", str(tmp_path), "4"]))
    grads = torch.load(tmp_path / "grads.pt", weights_only=True)
    ref, sync, plain = grads["reference"], grads["sync"], grads["plain"]
    def worst(grads: dict[str, torch.Tensor]) -> float:
        return max(float((grads[n] - ref[n]).abs().max() / ref[n].abs().max().clamp(min=1e-30))
                   for n in grads)

    # In float64 only the order of the sums differs (two partial sums all-reduced vs one sum):
    # measured ~2e-7 of each tensor's largest gradient; 1e-5 leaves room and still catches any
    # statistic computed per rank, which is off by the whole gradient.
    assert worst(sync) < 1e-5
    # Without synchronised BatchNorm each rank normalises by its own batch: the check must fail.
    assert worst(plain) > 1e-2


@pytest.mark.parametrize("nproc,count", [(2, 23), (3, 2)])
def test_ranks_validate_their_own_shares_of_rank_zeros_model(
    tmp_path: Path, nproc: int, count: int
) -> None:
    """Every image is scored once, by rank 0's model, however the split divides over the ranks
    (with 3 ranks and 2 images, rank 2's share is empty)."""
    _run(_torchrun_script(["validation", str(tmp_path), str(count)], nproc), nproc)
    results = [json.loads((tmp_path / f"validation-{rank}.json").read_text()) for rank in range(nproc)]
    assert sum(r["share"] for r in results) == count
    assert [r["top1"] for r in results] == [results[0]["expected"]] * nproc


def test_ranks_that_found_a_checkpoint_and_none_both_stop_with_the_reason(tmp_path: Path) -> None:
    _run(_torchrun_script(["resume_check", str(tmp_path)]))
    for rank in (0, 1):
        outcome = json.loads((tmp_path / f"resume-{rank}.json").read_text())
        assert "different checkpoints" in outcome and "['2:0', 'none']" in outcome


@pytest.fixture()
def tiny_job(vp_home: Path, tmp_path: Path) -> tuple[WorkerJob, Path]:
    dataset = prepare_dataset(DataConfig(max_per_class=10))
    experiment = tracking.ensure_experiment("ddp-test")
    run_id = tracking.start_run(experiment, "scratch-googlenet")
    cfg = GoogLeNetConfig(epochs=2, batch_size=8, launch=LaunchConfig(nproc_per_node=2))
    out = tmp_path / "out"
    out.mkdir()
    job = WorkerJob(config=cfg, dataset=dataset, out_dir=str(out),
                    result_path=str(out / "result.json"), mlflow_run_id=run_id)
    path = tmp_path / "job.json"
    path.write_text(job.model_dump_json())
    return job, path


def test_worker_trains_on_two_ranks_and_only_rank_zero_writes(tiny_job: tuple[WorkerJob, Path]) -> None:
    job, path = tiny_job
    lines = _run(torchrun_command(job.config.launch, path, 2, "test"))
    assert {r for r, _ in lines if r is not None} == {0, 1}, "both ranks' lines come back"
    out = Path(job.out_dir)
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pt", "best.pt.sha256", "last.pt", "last.pt.sha256", "prev.pt", "prev.pt.sha256",
        "result.json"]
    state = load_checkpoint(out / "last.pt")
    assert state["rank"] == 0 and state["world_size"] == 2 and state["epoch"] == 2
    assert any(k.startswith("aux1.") for k in state["model"]), "training state keeps the aux heads"
    model, spec = load_trained_model(out / "best.pt")
    assert model.aux1 is None and spec.arch == "googlenet"
    run = tracking.client().get_run(job.mlflow_run_id or "")
    history = tracking.client().get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2], "one value per epoch: only rank 0 logs"
    assert run.data.params["world_size"] == "2"


def test_a_rank_that_raises_fails_the_launch_with_its_message(
    tiny_job: tuple[WorkerJob, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    job, path = tiny_job
    monkeypatch.setenv("VISIONPIPE_INJECT_FAULT", "raise:1")
    with pytest.raises(LaunchError) as err:
        _run(torchrun_command(job.config.launch, path, 2, "fail"))
    assert err.value.rank == 1 and err.value.exit_code != 0
    assert "injected fault on rank 1" in str(err.value)
    # Classified by the error file the rank wrote, not by its text: a retry may pass.
    assert err.value.exception == "InjectedFault" and err.value.transient


def test_a_rank_error_from_the_input_is_not_worth_a_retry(
    tiny_job: tuple[WorkerJob, Path], tmp_path: Path
) -> None:
    job, _ = tiny_job
    too_big = job.model_copy(update={"config": job.config.model_copy(update={"batch_size": 10_000})})
    path = tmp_path / "big" / "job.json"
    path.parent.mkdir()
    path.write_text(too_big.model_dump_json())
    with pytest.raises(LaunchError) as err:
        _run(torchrun_command(job.config.launch, path, 2, "too-big"))
    assert err.value.exception == "ValueError" and not err.value.transient
    assert "batch_size 10000 is larger than" in str(err.value)
    # The rank that raised first recorded it where the launcher reads it (torchrun stops the
    # other, which may not get that far).
    records = list((path.parent / "torchrun-logs").glob("*/attempt_0/*/error.json"))
    assert records and all('"transient": false' in r.read_text() for r in records), records


@pytest.fixture()
def finetune_inputs(vp_home: Path, tmp_path: Path) -> tuple[PreparedDataset, Path]:
    dataset = prepare_dataset(DataConfig(max_per_class=10))
    torch.manual_seed(1)
    weights = tmp_path / "resnet18.pth"
    torch.save(build_backbone("resnet18", 1000).state_dict(), weights)
    return dataset, weights


def _two_rank_finetune(phases: list[Phase], **changes: object) -> FinetuneConfig:
    return FinetuneConfig(arch="resnet18", batch_size=8, phases=phases,
                          launch=LaunchConfig(nproc_per_node=2), **changes)  # type: ignore[arg-type]


def test_finetune_on_two_ranks_trains_every_phase_and_only_rank_zero_writes(
    finetune_inputs: tuple[PreparedDataset, Path], tmp_path: Path
) -> None:
    dataset, weights = finetune_inputs
    cfg = _two_rank_finetune([Phase(name="head", trainable=["fc"], epochs=2, lr=0.05),
                              Phase(name="full", trainable=["*"], epochs=1, lr=0.01)])
    assert finetune_processes(cfg) == 2
    run_id = tracking.start_run(tracking.ensure_experiment("ddp-test"), "finetune-resnet18")
    lines: list[tuple[int | None, str]] = []
    out = tmp_path / "out"
    result = launch_finetune(cfg, dataset, weights, out, run_id, "ft-test",
                             lambda rank, line: lines.append((rank, line)))
    assert result.world_size == 2 and len(result.rank_weight_digests) == 2
    assert len(set(result.rank_weight_digests)) == 1, "DDP ranks ended with different weights"
    assert [r["phase"] for r in result.history] == ["head", "head", "full"]
    printed = [(rank, parse_epoch_line(line)) for rank, line in lines if parse_epoch_line(line)]
    assert [rank for rank, _ in printed] == [0, 0, 0], "rank 0 alone reports the epochs"
    assert {r for r, _ in lines if r is not None} == {0, 1}, "both ranks' lines come back"
    state = load_checkpoint(out / "last.pt")
    assert (state["rank"], state["world_size"], state["epoch"]) == (0, 2, 3)
    assert FinetuneConfig.model_validate_json(state["config"]) == cfg
    history = tracking.client().get_metric_history(run_id, "val_top1")
    assert [m.step for m in history] == [1, 2, 3], "one value per epoch: only rank 0 logs"
    assert tracking.client().get_run(run_id).data.params["world_size"] == "2"
    # Every rank scored its share of the validation split with rank 0's model and the sums
    # were added up: the whole split, scored once by the saved weights.
    model = build_backbone("resnet18", dataset.num_classes, dataset.image_size)
    model.load_state_dict(state["model"])
    fast_path = resolve_fast_path(cfg.fast, "cpu")
    data = load_training_data(dataset, cfg.fast, torch.device("cpu"), fast_path)
    alone = evaluate(model, data.batches("val", 8, shuffle=False, augment=False, seed=0),
                     torch.nn.CrossEntropyLoss(), torch.device("cpu"), fast_path)
    assert alone.count == dataset.split_counts["val"]
    assert result.history[-1]["val_top1"] == pytest.approx(alone.top1)
    assert result.history[-1]["val_loss"] == pytest.approx(alone.loss, rel=1e-4)


def test_finetune_on_two_ranks_trains_the_same_head_on_cached_features_as_on_images(
    finetune_inputs: tuple[PreparedDataset, Path], tmp_path: Path
) -> None:
    """The frozen features are computed once, half on each rank, and gathered: each rank's
    shard of every epoch is then the one the image batches would give it."""
    dataset, weights = finetune_inputs
    heads = []
    for cached in (True, False):
        cfg = _two_rank_finetune([Phase(name="head", trainable=["fc"], epochs=2, lr=0.05)],
                                 cache_frozen_features=cached)
        lines: list[str] = []
        result = launch_finetune(cfg, dataset, weights, tmp_path / f"out-{cached}", None,
                                 f"ft-cache-{cached}", lambda rank, line: lines.append(line))
        assert result.world_size == 2 and len(set(result.rank_weight_digests)) == 1
        assert any("frozen features" in line for line in lines) == cached, lines[-20:]
        heads.append(load_checkpoint(Path(result.last_checkpoint))["model"])
    for key in ("fc.weight", "fc.bias"):
        torch.testing.assert_close(heads[0][key], heads[1][key], rtol=1e-4, atol=1e-5)


def test_the_style_network_on_two_ranks_resumes_after_a_killed_rank_to_the_same_weights(
        vp_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.style_fixtures import TINY_LOSS, TINY_TRAIN, style_inputs
    from visionpipe.style.worker import launch_style

    inputs = style_inputs(tmp_path, max_per_class=8)
    train = TINY_TRAIN.model_copy(update={"launch": LaunchConfig(nproc_per_node=2), "batch_size": 4})
    straight = launch_style(train, TINY_LOSS, inputs, tmp_path / "straight", None, "style-a",
                            lambda rank, line: None)
    assert straight.world_size == 2 and len(set(straight.rank_weight_digests)) == 1
    assert straight.epochs_run == 2 and straight.resumed_from_epoch is None
    monkeypatch.setenv("VISIONPIPE_INJECT_FAULT", f"die:1@{tmp_path / 'died'}")
    with pytest.raises(LaunchError) as err:  # rank 1 is SIGKILLed as its second epoch starts
        launch_style(train, TINY_LOSS, inputs, tmp_path / "retried", None, "style-b",
                     lambda rank, line: None)
    assert "DDP worker failed" in str(err.value)
    assert load_checkpoint(tmp_path / "retried" / "last.pt")["epoch"] == 1
    resumed = launch_style(train, TINY_LOSS, inputs, tmp_path / "retried", None, "style-c",
                           lambda rank, line: None)
    assert resumed.resumed_from_epoch == 1 and resumed.epochs_run == 2
    a = load_checkpoint(Path(straight.checkpoint))["model"]
    b = load_checkpoint(Path(resumed.checkpoint))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run ends elsewhere"
