"""register-model: every candidate becomes a version; the champion alias moves behind a gate."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from tasks.common import retry_transient, run_logger
from visionpipe import faults, registry, settings, tracking
from visionpipe.config import RegistryConfig
from visionpipe.data import PreparedDataset
from visionpipe.evaluation import Evaluation
from visionpipe.tracking import TrackingContext
from visionpipe.training.result import Candidate


@task(name="register-model", retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=retry_transient)
def register_model(candidates: list[Candidate], evaluations: list[Evaluation],
                   dataset: PreparedDataset, cfg: RegistryConfig, model_name: str,
                   context: TrackingContext) -> registry.GateDecision:
    """Register each candidate with its lineage; promote the best one only if it wins."""
    faults.inject("bug", "register")
    scores = {e.candidate: e.metrics for e in evaluations}
    registrations = []
    for candidate in candidates:
        export_dir = settings.stage_dir(context.flow_run_id, f"export-{candidate.name}")
        model_uri = registry.log_pyfunc_model(
            candidate.run_id, Path(candidate.result.best_checkpoint), export_dir, dataset)
        tags = {**registry.version_tags(candidate.lineage, export_dir),
                "prefect_flow_run_id": context.flow_run_id,
                "git_commit": tracking.git_commit(), "candidate": candidate.name,
                **{f"test_{k}": f"{v:.6f}" for k, v in scores[candidate.name].items()}}
        registrations.append(registry.register_version(candidate.name, model_name, model_uri,
                                                       candidate.run_id, tags))
    best, random_init = choose_for_gate(candidates, registrations, scores, cfg)
    decision = registry.gate_champion(best, dataset, cfg, random_init=random_init)
    run_logger().info("champion gate: %s", decision.reason)
    lineages = {c.name: c.lineage for c in candidates}
    for registration in registrations:
        registry.describe_version(model_name, registration.version, registry.model_card(
            registration, scores[registration.candidate], dataset,
            lineages[registration.candidate], decision))
    tracking.set_tags(context.parent_run_id, {"gate_decision": decision.reason,
                                              "candidate_version": decision.candidate_version})
    create_markdown_artifact(key="champion-decision", markdown=decision_markdown(decision, model_name, cfg.alias),
                             description=decision.reason)
    return decision


def choose_for_gate(candidates: list[Candidate], registrations: list[registry.Registration],
                    scores: dict[str, dict[str, float]], cfg: RegistryConfig
                    ) -> tuple[registry.Registration, bool]:
    """The best candidate the gate may promote, and whether it trained from a random init for
    want of pretrained weights (then no other candidate was eligible, and the gate says so)."""
    random_init = {c.name: c.pretrained_unreachable for c in candidates}
    ranked = sorted(registrations, key=lambda r: scores[r.candidate][cfg.champion_metric],
                    reverse=True)
    eligible = [r for r in ranked if cfg.promote_random_init or not random_init[r.candidate]]
    best = eligible[0] if eligible else ranked[0]
    for refused in ranked[:ranked.index(best)]:
        run_logger().warning("%s scored better but trained from a random init for want of "
                             "pretrained weights (registry.promote_random_init is false); the "
                             "gate takes %s", refused.candidate, best.candidate)
    return best, random_init[best.candidate]


def decision_markdown(decision: registry.GateDecision, model_name: str,
                      alias: str = "champion") -> str:
    moved = "moved to" if decision.promoted else "stays on"
    holder = decision.candidate_version if decision.promoted else decision.champion_version
    champion = "-" if decision.champion_score is None else f"{decision.champion_score:.4f}"
    return "\n".join([
        f"# `{model_name}`: @{alias} {moved} version {holder}", "",
        f"| | version | {decision.metric} |", "|---|---|---|",
        f"| candidate ({decision.candidate}) | {decision.candidate_version} | {decision.candidate_score:.4f} |",
        f"| @{alias} before | {decision.champion_version or '-'} | {champion} |", "",
        f"{decision.reason} (rule: `{decision.rule}`)",
    ])
