"""evaluate-candidates: every candidate on the same held-out test split."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.common import per_flow_run
from visionpipe import settings, tracking
from visionpipe.config import EvalConfig
from visionpipe.data import PreparedDataset
from visionpipe.evaluation import Evaluation, evaluate_checkpoint, filters_figure
from visionpipe.tracking import TrackingContext
from visionpipe.training.result import Candidate
from visionpipe.weights import FetchedWeights


@task(name="evaluate-candidates", retries=2, retry_delay_seconds=[5, 30],
      cache_key_fn=per_flow_run, persist_result=True)
def evaluate_candidates(candidates: list[Candidate], dataset: PreparedDataset, cfg: EvalConfig,
                        context: TrackingContext, weights: FetchedWeights | None = None
                        ) -> list[Evaluation]:
    """Test-split metrics and pictures for each candidate, logged to its run and compared side
    by side; the first-layer filters of the fine-tune's starting ``weights`` and of every
    candidate in one picture."""
    out_dir = settings.stage_dir(context.flow_run_id, "evaluation")
    evaluations = []
    for candidate in candidates:
        evaluation = evaluate_checkpoint(candidate.name, Path(candidate.result.best_checkpoint),
                                         dataset, cfg.batch_size, out_dir,
                                         history=candidate.result.history)
        tracking.log_metrics(candidate.run_id, {f"test_{k}": v for k, v in evaluation.metrics.items()})
        for path in (evaluation.confusion_csv, evaluation.confusion_png, evaluation.report_json,
                     *evaluation.figures.values()):
            tracking.log_artifact(candidate.run_id, Path(path), "evaluation")
        evaluations.append(evaluation)
    starts = {} if weights is None else {
        ("random init" if weights.random_init else f"pretrained: {weights.source}"): Path(weights.path)}
    filters = filters_figure(starts, {c.name: Path(c.result.best_checkpoint) for c in candidates},
                             out_dir / "first-layer-filters.png")
    for candidate in candidates:
        tracking.log_artifact(candidate.run_id, filters, "evaluation")
    rows = [{"candidate": e.candidate, **{k: round(v, 4) for k, v in e.metrics.items()}}
            for e in evaluations]
    create_table_artifact(key="candidate-metrics", table=rows,
                          description=f"test split of {dataset.name} {dataset.version}")
    create_markdown_artifact(key="candidate-comparison",
                             markdown=comparison_markdown(evaluations, candidates, filters.name),
                             description="candidates side by side")
    return evaluations


def comparison_markdown(evaluations: list[Evaluation], candidates: list[Candidate] | None = None,
                        filters: str | None = None) -> str:
    """A markdown table with one column per candidate, and where each one's pictures are."""
    names = [e.candidate for e in evaluations]
    metrics = sorted({k for e in evaluations for k in e.metrics})
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for metric in metrics:
        values = [f"{e.metrics[metric]:.4f}" if metric in e.metrics else "-" for e in evaluations]
        lines.append(f"| {metric} | " + " | ".join(values) + " |")
    runs = {c.name: c.run_id for c in candidates or []}
    pictures = []
    for e in evaluations:
        if e.candidate in runs:
            files = [Path(p).name for p in (e.confusion_png, *e.figures.values())]
            files += [filters] if filters else []
            pictures.append(f"- {e.candidate}: " + ", ".join(
                f"`runs:/{runs[e.candidate]}/evaluation/{name}`" for name in files))
    pictures_text = ("\n\n## Pictures (MLflow artifacts of each candidate's run)\n\n"
                     + "\n".join(pictures)) if pictures else ""
    return "# Candidates on the test split\n\n" + "\n".join(lines) + pictures_text
