"""The one rule for retries: the input's and the code's errors fail at once, the machine's pass."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INTERNAL_ERROR,
    RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE,
)

from visionpipe import errors
from visionpipe.registry import RegistryError


@pytest.mark.parametrize(("exc", "transient"), [
    (ValueError("bad config"), False),
    (KeyError("missing"), False),
    (FileNotFoundError("no such folder"), False),
    (errors.DatasetError("too few images"), False),
    (errors.WeightsUnavailable("retried already"), False),
    (errors.CheckpointError("damaged"), False),
    (errors.PreflightError("no GPUs"), False),
    (errors.InjectedBugError("bug"), False),
    (errors.LaunchStopped("stopped"), False),
    (errors.LaunchError("rank raised", rank_transient=False), False),
    (type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory"), False),
    (OSError(28, "No space left on device"), True),
    (ConnectionResetError("reset"), True),
    (RuntimeError("[gloo] Connection closed by peer"), True),
    (errors.RendezvousUnreachable("no answer"), True),
    (errors.SharedStorageError("S3 down"), True),
    (errors.TrackingUnavailable("MLflow down"), True),
    (errors.InjectedFault("fault"), True),
    (errors.LaunchTimeout("slow"), True),
    (errors.LaunchPreempted("SIGTERM"), True),
    (errors.LaunchError("rank killed"), True),
    (errors.NodeRunFailed("node 1", transient=True), True),
    (errors.NodeRunFailed("node 1", transient=False), False),
])
def test_is_transient(exc: BaseException, transient: bool) -> None:
    assert errors.is_transient(exc) is transient


def test_mlflow_errors_are_classified_by_their_code() -> None:
    assert errors.is_transient(MlflowException("locked", error_code=TEMPORARILY_UNAVAILABLE))
    assert not errors.is_transient(MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST))
    cause = MlflowException("down", error_code=INTERNAL_ERROR)
    assert errors.is_transient(RegistryError("registry outage", cause))


def test_a_rank_records_its_exception_and_the_rules_answer() -> None:
    record = errors.rank_failure_record(errors.DatasetError("changed file"))
    assert record == {"type": "visionpipe.errors.DatasetError", "name": "DatasetError",
                      "transient": False}


def test_every_exception_of_the_library_is_defined_in_errors() -> None:
    import ast
    from pathlib import Path

    import visionpipe

    root = Path(visionpipe.__file__).parent
    defined = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Unavailable")):
                defined.append(f"{path.relative_to(root)}:{node.name}")
    # RegistryError extends MLflow's exception type, so it lives beside MLflow.
    assert sorted(d for d in defined if not d.startswith("errors.py")) == ["registry.py:RegistryError"]
