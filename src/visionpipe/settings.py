"""Where visionpipe keeps its state, resolved from the environment when asked, never at import."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = ".visionpipe"


def visionpipe_home() -> Path:
    """The state folder: ``$VISIONPIPE_HOME`` or ``./.visionpipe``, created on first use."""
    home = Path(os.environ.get("VISIONPIPE_HOME", DEFAULT_HOME)).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def tracking_uri() -> str:
    """MLflow tracking URI: ``$MLFLOW_TRACKING_URI`` or SQLite inside the state folder."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return embedded_tracking_uri()


def embedded_tracking_uri() -> str:
    """The embedded MLflow store's URI: SQLite inside the state folder."""
    return f"sqlite:///{embedded_tracking_db()}"


def embedded_tracking_db() -> Path:
    """The SQLite file of the embedded MLflow store (used when ``MLFLOW_TRACKING_URI`` is unset)."""
    return visionpipe_home() / "mlflow.db"


def artifact_root() -> Path:
    """Local artifact store used when MLflow runs on the embedded SQLite database."""
    path = visionpipe_home() / "mlartifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir(kind: str) -> Path:
    """A named cache folder under the state folder (``datasets``, ``weights``, ``runs``...)."""
    path = visionpipe_home() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def stage_dir(flow_run_id: str, stage: str) -> Path:
    """Checkpoints of one stage of one flow run: a retry finds its predecessor's files here."""
    path = cache_dir("runs") / flow_run_id / stage
    path.mkdir(parents=True, exist_ok=True)
    return path
