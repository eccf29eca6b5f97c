"""Every exception of the project, and the one rule that says which failures a retry can fix.

``is_transient`` is asked by the tasks' retry condition, by the launcher about a failed rank
(the rank writes the answer into torchrun's error file, ``rank_failure_record``) and by the
multi-node parent about a failed node run (the node run's final state name). Errors that come
from the input or the code fail at once; the machine's and the network's (a killed rank, a
refused connection, a throttled store) are retried.

This module imports nothing heavy: the DDP worker, the serving model and the tasks all use it.
(``registry.RegistryError`` stays beside MLflow, whose exception type it must extend; MLflow
errors are classified by their error code here.)
"""

from __future__ import annotations

from typing import Any

# Built-in exceptions that a second attempt raises again: the input or the code is wrong.
# A missing file is one (a path that is not there now is not there in a minute); other OSErrors
# (a full disk, a reset connection, a stale NFS handle) may pass.
DETERMINISTIC_BUILTINS: tuple[type[BaseException], ...] = (
    ValueError, TypeError, LookupError, AttributeError, NotImplementedError, AssertionError,
    ImportError, ArithmeticError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
)
# torch.OutOfMemoryError, by name (this module does not import torch): the training task handles
# it once, with a smaller per-device batch; a blind retry would run out of memory again.
HANDLED_BY_NAME = frozenset({"OutOfMemoryError"})

# Answers of the transports that mean "try again later"; any other 4xx is a wrong URL, key or
# credentials.
TRANSIENT_HTTP_STATUS = frozenset({408, 425, 429})  # and every 5xx
TRANSIENT_S3_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeoutException",
    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests",
})
TRANSIENT_MLFLOW_CODES = frozenset({"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE",
                                    "REQUEST_LIMIT_EXCEEDED"})

# The final state names a node run reports its failure with (flows/ddp_node.py); a node run
# that failed without one never ran its task (its parameters or its image were refused).
NODE_FAILED_TRANSIENT = "FailedTransient"
NODE_FAILED_DETERMINISTIC = "FailedDeterministic"


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt may succeed where ``exc`` failed."""
    if isinstance(exc, VisionpipeError):
        return exc.transient
    if type(exc).__name__ in HANDLED_BY_NAME or isinstance(exc, DETERMINISTIC_BUILTINS):
        return False
    code = getattr(exc, "error_code", None)
    if isinstance(code, str) and any(c.__name__ == "MlflowException" for c in type(exc).__mro__):
        return code in TRANSIENT_MLFLOW_CODES
    return True  # OSError, ConnectionError, S3 and gloo errors, a rank's RuntimeError


def http_status_is_transient(status: int) -> bool:
    return status >= 500 or status in TRANSIENT_HTTP_STATUS


def rank_failure_record(exc: BaseException) -> dict[str, Any]:
    """What a failed rank adds to its torchrun error file: its exception and ``is_transient``."""
    kind = type(exc)
    return {"type": f"{kind.__module__}.{kind.__qualname__}", "name": kind.__name__,
            "transient": is_transient(exc)}


class VisionpipeError(Exception):
    """Base of the project's errors; ``transient`` is the class's answer to ``is_transient``."""

    transient = False


# -- input and configuration: the message names the problem and the fix -------------------------

class DatasetError(VisionpipeError):
    """A dataset cannot be prepared or loaded."""


class WeightsError(VisionpipeError, RuntimeError):
    """Weights cannot be used."""

    def __init__(self, message: str) -> None:
        from visionpipe.redaction import redact

        super().__init__(redact(message))  # URLs may carry credentials


class WeightsUnavailable(WeightsError):
    """Every attempt to reach the weights' source failed on network errors.

    Not transient: the fetch already retried with backoff (``weights.attempts``).
    """


class CheckpointError(VisionpipeError, RuntimeError):
    """A checkpoint is missing, damaged or not ours."""


class DigestError(VisionpipeError, RuntimeError):
    """A file does not match the sha256 recorded beside it (or one of the two is missing)."""


class PreflightError(VisionpipeError, ValueError):
    """This host cannot run the node as configured; another attempt on it fails alike."""


class NodeTrainingError(VisionpipeError, RuntimeError):
    """A rank of this node raised a deterministic error (its input or code)."""


# -- the machine and the network: worth another attempt ----------------------------------------

class RendezvousUnreachable(VisionpipeError, ConnectionError):
    """The rendezvous endpoint did not answer in time (node 0 not up yet, network, DNS)."""

    transient = True


class SharedStorageError(VisionpipeError, RuntimeError):
    """The shared checkpoint folder cannot be read or written (storage, network)."""

    transient = True


class TrackingUnavailable(VisionpipeError, RuntimeError):
    """The MLflow tracking server did not answer (after MLflow's own HTTP retries)."""

    transient = True


class EphemeralAPIError(VisionpipeError, RuntimeError):
    """Prefect's ephemeral API server did not start; the message has its exit code and the fix."""


class InjectedFault(VisionpipeError, RuntimeError):
    """A transient failure raised on purpose (``visionpipe.faults``)."""

    transient = True


class InjectedBugError(VisionpipeError, AssertionError):
    """A deterministic failure raised on purpose (``visionpipe.faults``)."""


# -- launches: torchrun on this node, node runs of a multi-node world ---------------------------

class LaunchError(VisionpipeError, RuntimeError):
    """A torchrun launch failed.

    ``rank`` is the rank whose lines the message shows, ``rank_exit_code`` its exit code
    (negative: killed by that signal). ``exception`` names what the failing ranks raised, and
    ``rank_transient`` is the ranks' own ``is_transient`` answer, both read from the error files
    they wrote (None: no rank raised, e.g. all were killed).
    """

    def __init__(self, message: str, rank: int | None = None, exit_code: int | None = None,
                 rank_exit_code: int | None = None, exception: str | None = None,
                 rank_transient: bool | None = None) -> None:
        super().__init__(message)
        self.rank, self.exit_code = rank, exit_code
        self.rank_exit_code, self.exception = rank_exit_code, exception
        self.rank_transient = rank_transient

    @property
    def transient(self) -> bool:  # type: ignore[override]
        """A rank that raised decides; one that was killed (no error file) is the machine's."""
        return True if self.rank_transient is None else self.rank_transient


class LaunchPreempted(LaunchError):
    """The ranks were asked to stop (SIGTERM) and checkpointed: always worth a retry."""

    @property
    def transient(self) -> bool:  # type: ignore[override]
        return True


class LaunchTimeout(LaunchError):
    """The launch ran past its timeout and was killed."""

    @property
    def transient(self) -> bool:  # type: ignore[override]
        return True


class LaunchStopped(LaunchError):
    """Whoever launched it asked it to stop (another stage failed): its error is the run's."""

    @property
    def transient(self) -> bool:  # type: ignore[override]
        return False


class NodeRunFailed(VisionpipeError, RuntimeError):
    """A node run failed and the others were cancelled."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self._transient = transient

    @property
    def transient(self) -> bool:  # type: ignore[override]
        return self._transient
