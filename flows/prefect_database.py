"""An empty Prefect database, migrated once per install, that new state folders start from.

Prefect's ephemeral API keeps its state in SQLite under ``PREFECT_HOME``. On a new state folder
its first start runs every one of Prefect's migrations: 11 s of a 20 s start on 2 cores, paid
again by every new state folder (a new machine, each benchmark's and test's folder). ``make
install`` runs those same migrations once, with Prefect's own ``prefect server database
upgrade``, into ``<venv>/share/visionpipe/prefect-<version>.db``; ``python -m flows`` copies that
file to where the ephemeral API's database will be when there is none yet, and Prefect then
finds it at the head revision. A database that exists is never touched, nor is one behind a
configured API or another database URL; without a template for the installed Prefect version
everything happens as before.

    python -m flows.prefect_database     # what `make install` runs
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
from contextlib import closing
from importlib.metadata import version
from pathlib import Path

from visionpipe.templates import install_template, seed_file

_SQLITE = "sqlite+aiosqlite:///"


def template_path() -> Path:
    """Where this environment's template is, keyed on the Prefect version it was migrated by."""
    return Path(sys.prefix) / "share" / "visionpipe" / f"prefect-{version('prefect')}.db"


def make_template(path: Path | None = None) -> Path:
    """Migrate a new SQLite database to Prefect's head revision with Prefect's own CLI."""
    path = path or template_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        db = Path(scratch) / path.name
        # Only this new file: never a database the environment configures (PostgreSQL, say).
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PREFECT_API_", "PREFECT_SERVER_DATABASE_"))}
        env.update(PREFECT_HOME=scratch, PREFECT_SERVER_DATABASE_CONNECTION_URL=f"{_SQLITE}{db}")
        done = subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0 or not db.is_file():
            raise RuntimeError(f"prefect server database upgrade failed ({done.returncode}): "
                               f"{(done.stderr or done.stdout)[-2000:]}")
        # Prefect's SQLite runs in WAL mode: all of it goes into the one file that is copied.
        with closing(sqlite3.connect(db)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return install_template(db, path, "prefect-*.db")


def ephemeral_database(connection_url: str | None) -> Path | None:
    """The file of an ``sqlite+aiosqlite:///<path>`` URL; None for any other database."""
    if not connection_url or not connection_url.startswith(_SQLITE):
        return None
    location = connection_url.removeprefix(_SQLITE)
    if not location or "?" in location or location.startswith(":memory:"):
        return None
    return Path(location)


def seed_database(database: Path, template: Path | None = None) -> bool:
    """Copy the template to ``database`` if there is no database there yet; True if copied.

    A database in use is never replaced (``visionpipe.templates.seed_file``).
    """
    return seed_file(database, template or template_path())


if __name__ == "__main__":
    print(f"migrated Prefect {version('prefect')}'s database template: {make_template()}")
