"""A production-like stack on 127.0.0.1: ``make stack-up`` / ``make stack-down``.

- Prefect server on PostgreSQL (``PREFECT_SERVER_DATABASE_CONNECTION_URL``);
- MLflow tracking server on PostgreSQL, artifacts proxied into an S3 bucket
  (``--artifacts-destination``);
- an S3-compatible endpoint: moto's server here, MinIO or AWS in production (configuration only);
- Prefect results and cache records in that bucket (``deployments.results``: an S3Bucket block
  and ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``), so a retry on another worker finds them.

``up`` writes ``$VISIONPIPE_HOME/stack.env`` (source it to use the stack) and keeps the process
ids in ``$VISIONPIPE_HOME/stack/pids.json``; ``down`` stops every process group it started.
PostgreSQL itself is not started here: ``VISIONPIPE_PG`` (default
``postgres@127.0.0.1:5432``) names a running server. The stack is disposable: moto keeps S3 in
memory, so ``up`` starts from empty databases (``<VISIONPIPE_STACK_DB>_prefect`` and
``_mlflow``, default prefix ``visionpipe``) and an empty bucket.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from deployments.results import RESULTS_BLOCK
from visionpipe.settings import visionpipe_home

BUCKET = "visionpipe-artifacts"
DATA_BUCKET = "visionpipe-datasets"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "visionpipe", "AWS_SECRET_ACCESS_KEY": "visionpipe-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _create_databases(pg: str, names: list[str]) -> None:
    """Fresh, empty databases: moto keeps S3 in memory, so old runs would point at lost objects."""
    import psycopg2

    user, _, hostport = pg.partition("@")
    host, _, port = hostport.partition(":")
    conn = psycopg2.connect(user=user, host=host, port=int(port or 5432), dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        for name in names:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()


def _start(name: str, cmd: list[str], env: dict[str, str], state: Path) -> int:
    log = (state / f"{name}.log").open("ab")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=state)
    return proc.pid


def _wait(url: str, name: str, state: Path, pid: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise RuntimeError(f"{name} exited while starting; see {state / (name + '.log')}")
        try:
            with urllib.request.urlopen(url, timeout=3):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{name} did not answer at {url} within {timeout:.0f} s; see "
                       f"{state / (name + '.log')}")


def up() -> dict[str, str]:
    """Start the three servers, wait until they answer, write stack.env; return its variables."""
    home = visionpipe_home()
    state = home / "stack"
    state.mkdir(exist_ok=True)
    if (state / "pids.json").exists():
        raise RuntimeError(f"a stack is already up ({state / 'pids.json'}); run make stack-down first")
    pg = os.environ.get("VISIONPIPE_PG", "postgres@127.0.0.1:5432")
    db = os.environ.get("VISIONPIPE_STACK_DB", "visionpipe")
    _create_databases(pg, [f"{db}_prefect", f"{db}_mlflow"])
    ports = {name: _free_port() for name in ("s3", "mlflow", "prefect")}
    s3 = f"http://127.0.0.1:{ports['s3']}"
    base = {**os.environ, **S3_KEYS, "AWS_ENDPOINT_URL_S3": s3, "MLFLOW_S3_ENDPOINT_URL": s3}
    pids: dict[str, int] = {}
    try:
        pids["s3"] = _start("s3", [_bin("moto_server"), "-H", "127.0.0.1", "-p", str(ports["s3"])],
                            base, state)
        _wait(f"{s3}/moto-api/", "s3", state, pids["s3"])
        _create_buckets(s3)
        pids["mlflow"] = _start("mlflow", [
            _bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(ports["mlflow"]),
            "--backend-store-uri", f"postgresql+psycopg2://{pg}/{db}_mlflow",
            "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--workers", "1"], base, state)
        prefect_env = {**base, "PREFECT_HOME": str(state / "prefect"),
                       "PREFECT_SERVER_DATABASE_CONNECTION_URL":
                           f"postgresql+asyncpg://{pg}/{db}_prefect",
                       "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        pids["prefect"] = _start("prefect", [
            _bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(ports["prefect"])],
            prefect_env, state)
        _wait(f"http://127.0.0.1:{ports['mlflow']}/health", "mlflow", state, pids["mlflow"])
        _wait(f"http://127.0.0.1:{ports['prefect']}/api/health", "prefect", state, pids["prefect"])
        api = f"http://127.0.0.1:{ports['prefect']}/api"
        # Results and cache records in the bucket: a retry on another worker finds them.
        made = subprocess.run([sys.executable, "-m", "deployments.results", "--bucket", BUCKET,
                               "--endpoint", s3], env={**base, "PREFECT_API_URL": api},
                              capture_output=True, text=True, cwd=Path(__file__).parents[1])
        if made.returncode != 0:
            raise RuntimeError(f"could not create the result storage block: {made.stderr[-2000:]}")
    finally:
        (state / "pids.json").write_text(json.dumps(pids))
    env = {"PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
           "AWS_ENDPOINT_URL_S3": s3, **S3_KEYS, "VISIONPIPE_HOME": str(home),
           "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": f"s3-bucket/{RESULTS_BLOCK}",
           "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true"}
    (home / "stack.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return env


def _create_buckets(endpoint: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
                          region_name=S3_KEYS["AWS_DEFAULT_REGION"])
    for bucket in (BUCKET, DATA_BUCKET):
        client.create_bucket(Bucket=bucket)


def down() -> list[int]:
    """Stop every process group the stack started (SIGTERM, then SIGKILL); return their pids."""
    home = visionpipe_home()
    pids_file = home / "stack" / "pids.json"
    if not pids_file.exists():
        return []
    pids = list(json.loads(pids_file.read_text()).values())
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.2)
    pids_file.unlink()
    (home / "stack.env").unlink(missing_ok=True)
    return pids


def _alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str]) -> int:
    if argv == ["up"]:
        env = up()
        print("stack is up; use it with:  set -a; . " f"{visionpipe_home() / 'stack.env'}; set +a")
        for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3"):
            print(f"  {key}={env[key]}")
        return 0
    if argv == ["down"]:
        print(f"stopped {len(down())} process group(s)")
        return 0
    print("usage: python -m deployments.stack up|down", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
