"""evaluate-candidates: every candidate on the same held-out test split."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.common import per_flow_run
from visionpipe import settings, tracking
from visionpipe.config import EvalConfig
from visionpipe.data import PreparedDataset
from visionpipe.evaluation import Evaluation, evaluate_checkpoint
from visionpipe.tracking import TrackingContext
from visionpipe.training.result import Candidate


@task(name="evaluate-candidates", retries=2, retry_delay_seconds=[5, 30],
      cache_key_fn=per_flow_run, persist_result=True)
def evaluate_candidates(candidates: list[Candidate], dataset: PreparedDataset, cfg: EvalConfig,
                        context: TrackingContext) -> list[Evaluation]:
    """Test-split metrics for each candidate, logged to its run and compared side by side."""
    out_dir = settings.stage_dir(context.flow_run_id, "evaluation")
    evaluations = []
    for candidate in candidates:
        evaluation = evaluate_checkpoint(candidate.name, Path(candidate.result.best_checkpoint),
                                         dataset, cfg.batch_size, out_dir)
        tracking.log_metrics(candidate.run_id, {f"test_{k}": v for k, v in evaluation.metrics.items()})
        for path in (evaluation.confusion_csv, evaluation.confusion_png, evaluation.report_json):
            tracking.log_artifact(candidate.run_id, Path(path), "evaluation")
        evaluations.append(evaluation)
    rows = [{"candidate": e.candidate, **{k: round(v, 4) for k, v in e.metrics.items()}}
            for e in evaluations]
    create_table_artifact(key="candidate-metrics", table=rows,
                          description=f"test split of {dataset.name} {dataset.version}")
    create_markdown_artifact(key="candidate-comparison", markdown=comparison_markdown(evaluations),
                             description="candidates side by side")
    return evaluations


def comparison_markdown(evaluations: list[Evaluation]) -> str:
    """A markdown table with one column per candidate."""
    names = [e.candidate for e in evaluations]
    metrics = sorted({k for e in evaluations for k in e.metrics})
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for metric in metrics:
        values = [f"{e.metrics[metric]:.4f}" if metric in e.metrics else "-" for e in evaluations]
        lines.append(f"| {metric} | " + " | ".join(values) + " |")
    return "# Candidates on the test split\n\n" + "\n".join(lines)
