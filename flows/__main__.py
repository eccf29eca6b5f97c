"""``python -m flows [config.json]``: one run of the pipeline, as ``make run`` starts it.

Three fixed costs of a short run are cut here, without changing what runs:

- With no Prefect API configured, Prefect starts its ephemeral API server at the first call to
  it, and only after importing its server module into this process (3-4 s of one core). Here
  Prefect's same server process starts right after Prefect's settings are read, before any
  other import, and the client is pointed at it (``flows/ephemeral_api.py``): its start overlaps
  this process's imports of torch, torchvision and MLflow, and the server module is never
  imported here. It stops at exit, as Prefect stops the one it starts itself.
- Prefect's migrations of a new SQLite database (11 s of the server's 20 s first start on a
  slower 2-core host) are run once by ``make install`` into a template, and a new state
  folder's database starts as a copy of it (``flows/prefect_database.py``).
- Python's cyclic garbage collector scans every object the imports created, again and again
  during the imports and once more at exit (3-4 s here). Those objects live until exit, so they
  are frozen out of its sight (``gc.freeze``), once after the imports and once at the end.

``python -m flows.train_image_classifiers`` runs the same pipeline without any of these.
"""

from __future__ import annotations

import gc
import sys

from flows.ephemeral_api import EphemeralAPIError, start_ephemeral_api, startup_timeout_s


def main(argv: list[str]) -> int:
    gc.disable()  # imports make next to no garbage; collecting during them costs about 1 s
    try:
        api = start_ephemeral_api()  # stopped at exit, whatever happens from here on
        from flows.train_image_classifiers import main as run_pipeline
    finally:
        gc.freeze()
        gc.enable()
    if api is not None:
        try:
            api.wait_ready(startup_timeout_s())
        except EphemeralAPIError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    try:
        code = run_pipeline(argv)
    finally:
        # What is left goes with the process; only garbage in reference cycles is not collected
        # (files are closed and logs flushed by then: atexit handlers still run).
        gc.freeze()
    if code != 0 and api is not None and (gone := api.exit_code()) is not None:
        print(f"error: Prefect's ephemeral API server exited with code {gone} during the run; "
              "its output is above.", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
