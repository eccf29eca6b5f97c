"""Secrets stay out of params and tags; runs are addressed by id on the embedded SQLite store."""

from __future__ import annotations

from pathlib import Path

import pytest

from visionpipe import settings, tracking
from visionpipe.config import PipelineConfig


def test_redact_hides_passwords_in_urls_only() -> None:
    assert tracking.redact("postgresql://vp:s3cret@db:5432/mlflow") == "postgresql://vp:***@db:5432/mlflow"
    assert tracking.redact("https://example.org/a:b") == "https://example.org/a:b"
    assert tracking.redact("https://:token@example.org/x") == "https://:***@example.org/x"


def test_redact_hides_bare_tokens_and_userinfo() -> None:
    assert tracking.redact("https://user:pa55@mirror.example/x.pth") == "https://user:***@mirror.example/x.pth"
    assert tracking.redact("https://ghp_T0KEN@mirror.example/x.pth") == "https://***@mirror.example/x.pth"
    assert tracking.redact("uri 'https://T0KEN@h/x' failed") == "uri 'https://***@h/x' failed"
    # Not userinfo: an @ in a path, a query or a models:/ alias stays.
    for text in ("https://example.org/pkg@v2/x", "https://h/x?mail=a@b.org", "models:/digits@champion"):
        assert tracking.redact(text) == text


def test_redact_hides_presigned_url_signatures() -> None:
    s3 = ("https://b.s3.amazonaws.com/w.pth?X-Amz-Algorithm=AWS4-HMAC-SHA256"
          "&X-Amz-Credential=AKIAEXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request"
          "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
          "&X-Amz-Security-Token=FwoGZX&X-Amz-Signature=0123abcd")
    assert tracking.redact(s3) == (
        "https://b.s3.amazonaws.com/w.pth?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
        "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
        "&X-Amz-Security-Token=***&X-Amz-Signature=***")
    assert (tracking.redact("https://h/w.pth?AWSAccessKeyId=AKIA&Expires=1&Signature=ab%2Bc%3D")
            == "https://h/w.pth?AWSAccessKeyId=***&Expires=1&Signature=***")
    assert (tracking.redact('{"uri": "https://acct.blob.core.windows.net/c/w.pth?sv=2022&sig=Zz%3D#f"}')
            == '{"uri": "https://acct.blob.core.windows.net/c/w.pth?sv=2022&sig=***#f"}')
    # Parameters that only start like a secret one are left alone.
    assert tracking.redact("https://h/x?design=1&signer=2") == "https://h/x?design=1&signer=2"


def test_flatten_gives_dotted_params() -> None:
    flat = tracking.flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x://u:p@h"})
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "d": "x://u:***@h"}


def test_embedded_store_lives_in_the_state_folder(vp_home: Path) -> None:
    assert settings.tracking_uri() == f"sqlite:///{vp_home.resolve() / 'mlflow.db'}"
    experiment = tracking.ensure_experiment("exp")
    assert tracking.ensure_experiment("exp") == experiment
    location = tracking.client().get_experiment(experiment).artifact_location
    assert location.startswith((vp_home / "mlartifacts").resolve().as_uri())
    parent = tracking.start_run(experiment, "parent", tags={"prefect.flow_run_id": "fr-1"})
    child = tracking.start_run(experiment, "child", parent_run_id=parent)
    tracking.log_config(child, PipelineConfig())
    run = tracking.client().get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params["finetune.arch"] == "resnet50"
    tracking.fail_runs_of_flow_run("fr-1")
    assert {tracking.client().get_run(r).info.status for r in (parent, child)} == {"FAILED"}


def test_a_deleted_experiment_is_named_with_the_fixes_not_revived(vp_home: Path) -> None:
    experiment = tracking.ensure_experiment("gone")
    tracking.client().delete_experiment(experiment)
    with pytest.raises(ValueError, match=f"'gone' \\(id {experiment}\\) is deleted.*experiments restore"):
        tracking.ensure_experiment("gone")
    assert tracking.client().get_experiment(experiment).lifecycle_stage == "deleted"


def test_an_unreachable_tracking_server_is_named_without_its_password(
    vp_home: Path, monkeypatch: "pytest.MonkeyPatch"
) -> None:
    import socket

    import pytest

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://vp:hunter2@127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    with pytest.raises(tracking.TrackingUnavailable) as err:
        tracking.ensure_experiment("exp")
    message = str(err.value)
    assert f"127.0.0.1:{port}" in message and "MLFLOW_TRACKING_URI" in message
    assert "hunter2" not in message


def test_a_new_state_folder_starts_from_the_installs_migrated_mlflow_database(
        vp_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3
    from contextlib import closing

    from visionpipe import templates

    stale = tmp_path / "share" / "mlflow-0.0.1.db"
    stale.parent.mkdir()
    stale.write_bytes(b"another MLflow version's")
    template = templates.make_mlflow_template(tmp_path / "share" / "mlflow-test.db")  # MLflow's own
    assert template.is_file() and not stale.exists()
    with closing(sqlite3.connect(template)) as db, db:
        assert db.execute("SELECT count(*) FROM experiments").fetchone() == (0,)
        db.execute("CREATE TABLE visionpipe_mark (x)")  # a mark only the template carries
    monkeypatch.setattr(tracking, "_mlflow_template", lambda: template)

    experiment_id = tracking.ensure_experiment("seeded")
    database = settings.embedded_tracking_db()
    with closing(sqlite3.connect(database)) as db:
        assert db.execute("SELECT count(*) FROM visionpipe_mark").fetchone() == (0,)
    # MLflow made its Default experiment where it would in a new database, and ours after it.
    experiments = {e.name: e for e in tracking.client().search_experiments()}
    assert experiments["Default"].experiment_id == "0"
    assert experiments["Default"].artifact_location == str(Path.cwd() / "mlruns" / "0")
    assert experiments["seeded"].experiment_id == experiment_id == "1"
    # A database that exists is never replaced, not even by a newer template.
    before = database.read_bytes()
    assert templates.seed_file(database, template) is False
    assert database.read_bytes() == before
    assert not list(database.parent.glob(".mlflow.db.*.tmp"))


def test_a_configured_tracking_uri_is_never_seeded(
        vp_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    template = tmp_path / "template.db"
    template.write_bytes(b"not to be copied")
    monkeypatch.setattr(tracking, "_mlflow_template", lambda: template)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'configured.db'}")
    tracking.ensure_experiment("configured")
    assert not settings.embedded_tracking_db().exists()
    assert (tmp_path / "configured.db").read_bytes()[:15] == b"SQLite format 3"
