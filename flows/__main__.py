"""``python -m flows [config.json]``: one run of the pipeline, as ``make run`` starts it.

Three fixed costs of a short run are cut here, without changing what runs:

- With no Prefect API configured, Prefect starts its ephemeral API server at the first call to
  it, and on a new state folder that server first migrates its SQLite database: 13-16 s on 2
  cores, after the 7-11 s this process spends importing torch, torchvision and MLflow. Here the
  same server starts before those imports, in its own process, so the two overlap: a first run's
  flow begins 7-11 s sooner. Prefect stops it at exit, as it stops the one it starts itself.
- Those migrations (11 s of the server's 20 s first start on a slower 2-core host) are run once
  by ``make install`` into a template, and a new state folder's database starts as a copy of
  it (``flows/prefect_database.py``); the server's start then takes about as long as the
  imports it overlaps.
- Python's cyclic garbage collector scans every object the imports created, again and again
  during the imports and once more at exit (3-4 s here). Those objects live until exit, so they
  are frozen out of its sight (``gc.freeze``), once after the imports and once at the end.

``python -m flows.train_image_classifiers`` runs the same pipeline without any of these.
"""

from __future__ import annotations

import gc
import sys
import threading


def start_ephemeral_api() -> threading.Thread | None:
    """Start the ephemeral API in the background when Prefect would use one; None otherwise.

    ``SubprocessASGIServer`` is one instance per process: the flow's client finds it running and
    uses it. A start that fails in the background is tried again, and reported, by that client.
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, get_current_settings

    from flows.prefect_database import ephemeral_database, seed_database

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    url = get_current_settings().server.database.connection_url
    database = ephemeral_database(url.get_secret_value() if url is not None else None)
    if database is not None:
        seed_database(database)  # a new state folder starts from the install's migrated database
    thread = threading.Thread(target=SubprocessASGIServer().start, name="ephemeral-api", daemon=True)
    thread.start()
    return thread


def main(argv: list[str]) -> int:
    gc.disable()  # imports make next to no garbage; collecting during them costs about 1 s
    try:
        starting = start_ephemeral_api()
        try:
            from flows.train_image_classifiers import main as run_pipeline
        except BaseException:
            if starting is not None:
                from prefect.server.api.server import SubprocessASGIServer

                # Not before the start has finished: its server process would outlive this one.
                starting.join()
                SubprocessASGIServer().stop()
            raise
    finally:
        gc.freeze()
        gc.enable()
    if starting is not None:
        starting.join()
    try:
        return run_pipeline(argv)
    finally:
        # What is left goes with the process; only garbage in reference cycles is not collected
        # (files are closed and logs flushed by then: atexit handlers still run).
        gc.freeze()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
