"""Empty databases migrated once per install, that new state folders start from.

A new state folder's first MLflow call runs every one of MLflow's migrations on a new SQLite
file (1.9-2.1 s on 2 cores, against 0.63-0.68 s on a migrated copy), in every new folder: a new machine's first run, each benchmark's
and each test's folder. ``make install`` runs those migrations once, through MLflow's own
store, into ``<venv>/share/visionpipe/mlflow-<version>.db``; a state folder without a database
starts from a copy, which MLflow finds at its head revision. Only the embedded default is
seeded: never a database that exists, nor one behind ``MLFLOW_TRACKING_URI``. Without a
template for the installed version everything happens as before.

The template holds no experiment: MLflow creates its ``Default`` experiment when it first opens
the copy, with the artifact location it would give it in a new database.

    python -m visionpipe.templates     # what `make install` runs
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
import tempfile
from contextlib import closing
from importlib.metadata import version
from pathlib import Path


def template_dir() -> Path:
    """Where this environment keeps its templates."""
    return Path(sys.prefix) / "share" / "visionpipe"


def mlflow_template_path() -> Path:
    """This environment's MLflow template, keyed on the MLflow version it was migrated by."""
    return template_dir() / f"mlflow-{version('mlflow')}.db"


def seed_file(database: Path, template: Path) -> bool:
    """Copy ``template`` to ``database`` if there is no database there yet; True if copied.

    The copy is put in place by a hard link, which fails if another process created the
    database meanwhile: a database in use is never replaced. Where hard links are not
    supported, nothing is copied and the database is created as it always is.
    """
    if database.exists() or not template.is_file():
        return False
    database.parent.mkdir(parents=True, exist_ok=True)
    tmp = database.with_name(f".{database.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(template, tmp)
        os.link(tmp, database)
    except OSError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def make_mlflow_template(path: Path | None = None) -> Path:
    """Migrate a new SQLite file to MLflow's head revision with MLflow's own store."""
    from mlflow.tracking import MlflowClient

    path = path or mlflow_template_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        db = Path(scratch) / path.name
        # Opening the store creates the tables and runs every migration.
        MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
        with closing(sqlite3.connect(db)) as conn, conn:
            # The Default experiment's artifact location depends on where it is created.
            conn.execute("DELETE FROM experiment_tags WHERE experiment_id = 0")
            conn.execute("DELETE FROM experiments WHERE experiment_id = 0")
        with closing(sqlite3.connect(db)) as conn:
            conn.execute("VACUUM")
        return install_template(db, path, "mlflow-*.db")


def install_template(db: Path, path: Path, versions: str) -> Path:
    """Put the migrated ``db`` at ``path``; remove the other versions' templates (``versions``)."""
    os.replace(db, path)
    for stale in path.parent.glob(versions):
        if stale != path:
            stale.unlink(missing_ok=True)
    return path


if __name__ == "__main__":
    print(f"migrated MLflow {version('mlflow')}'s database template: {make_mlflow_template()}")
