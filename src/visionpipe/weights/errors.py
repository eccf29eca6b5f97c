"""The weights package's two errors, in one module of their own so that they can move as one."""

from __future__ import annotations

from visionpipe.redaction import redact


class WeightsError(RuntimeError):
    """Weights cannot be used; the message names what is wrong and how to fix it."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))  # URLs may carry credentials


class WeightsUnavailable(WeightsError):
    """Every attempt to reach the weights' source failed on network errors."""
