"""The tracking server on its production backend: `pipeline server mlflow --backend-store-uri
postgresql://...` against a real PostgreSQL server (the `postgres_server` fixture), running the
registry's flow end to end, with the rows checked in PostgreSQL itself; and the server command's
clear, bounded failure on a wrong or unreachable PostgreSQL URI.

The helpers (training, logging a run shaped like training's, registering) are test_registry's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pipeline.registry import best_runs, connect, promote, rollback
from pipeline.tags import CHAMPION, PREVIOUS_CHAMPION, ROLLED_BACK_TAG
from tests.conftest import MlflowServer, free_port, mlflow_uris_kept, running_mlflow_server
from tests.integration.test_registry import (
    FAST_LOCK,
    _accuracy,
    aliases,
    digits,  # noqa: F401 - the module-scoped dataset fixture
    digits_config,
    fresh_name,
    log_run,
    register,
    train_digits,
)

pytestmark = pytest.mark.slow

PIPELINE = str(Path(sys.executable).parent / "pipeline")
# SGD steps per quality. Hand-built here: these runs live on the PostgreSQL-backed server, not the
# session's, where trained_model is.
STEPS = {"medium": 6, "strong": 20}
EXPERIMENT = f"registry-postgres-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def pg_mlflow(postgres_server, tmp_path_factory):
    """`pipeline server mlflow` on the PostgreSQL database, artifacts in a tmp dir; MLflow
    pointed at it for this module (in-process and subprocesses)."""
    root = tmp_path_factory.mktemp("mlflow-postgres")
    with (
        running_mlflow_server(
            root, str(root / "artifacts"), backend_store_uri=postgres_server.uri()
        ) as (uri, log),
        pytest.MonkeyPatch.context() as mp,
    ):
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        with mlflow_uris_kept():
            yield MlflowServer(uri, root, log)


@pytest.fixture(scope="module")
def two_runs(pg_mlflow, digits) -> dict[str, str]:  # noqa: F811
    """medium (~50% test accuracy) and strong (~90%) runs, each with its model logged."""
    uri, manifest = digits
    cfg = digits_config(uri, pg_mlflow.uri, experiment=EXPERIMENT)
    out = {}
    for quality in ("medium", "strong"):
        model = train_digits(cfg, manifest, STEPS[quality])
        acc = _accuracy(model, cfg, manifest)
        out[quality] = log_run(cfg, manifest, model, quality, test_acc=acc, best_val_acc=acc)
    return out


def test_registry_flow_on_a_postgresql_backend(pg_mlflow, postgres_server, digits, two_runs):  # noqa: F811
    cfg = digits_config(digits[0], pg_mlflow.uri, experiment=EXPERIMENT)
    client = connect(pg_mlflow.uri)
    name = fresh_name()
    medium = register(cfg, two_runs["medium"], name)
    strong = register(cfg, two_runs["strong"], name)
    assert (medium, strong) == ("1", "2")

    first = promote(client, name, candidate=medium, lock=FAST_LOCK)
    assert first.acted and aliases(client, name) == {CHAMPION: medium}
    better = promote(client, name, candidate=strong, lock=FAST_LOCK)
    assert better.acted and better.candidate.acc > better.champion.acc
    assert aliases(client, name) == {CHAMPION: strong, PREVIOUS_CHAMPION: medium}

    worse = promote(client, name, candidate=medium, lock=FAST_LOCK)  # now worse than champion
    assert not worse.promote and not worse.acted
    assert "not better than the champion" in worse.reason
    assert aliases(client, name) == {CHAMPION: strong, PREVIOUS_CHAMPION: medium}

    assert rollback(client, name, FAST_LOCK) == (strong, medium)
    assert aliases(client, name) == {CHAMPION: medium}
    assert ROLLED_BACK_TAG in client.get_model_version(name, strong).tags

    rows = best_runs(client, EXPERIMENT, "best_val_acc", top=2)
    assert [r["run_id"] for r in rows] == [two_runs["strong"], two_runs["medium"]]
    assert {"name": name, "version": medium, "aliases": [CHAMPION]} in rows[1]["versions"]

    # The registry really lives in PostgreSQL: read MLflow's tables directly.
    with postgres_server.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM registered_models WHERE name = %s", (name,))
        assert cur.fetchone() == (1,)
        cur.execute(
            "SELECT version, run_id FROM model_versions WHERE name = %s ORDER BY version", (name,)
        )
        assert cur.fetchall() == [(1, two_runs["medium"]), (2, two_runs["strong"])]
        cur.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s", (name,))
        assert cur.fetchall() == [(CHAMPION, 1)]
        cur.execute(
            "SELECT value FROM model_version_tags WHERE name = %s AND version = 1 AND key = %s",
            (name, "promotion.decision"),
        )
        assert cur.fetchone() == ("refused",)  # the latest decision on v1: the refused retry
        cur.execute(
            "SELECT count(*) FROM runs JOIN experiments USING (experiment_id) "
            "WHERE experiments.name = %s AND runs.run_uuid IN %s",
            (EXPERIMENT, tuple(two_runs.values())),
        )
        assert cur.fetchone() == (2,)
    assert not (pg_mlflow.root / "mlflow.db").exists()  # no SQLite file on the side


def _server(backend_uri: str, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PIPELINE, "server", "mlflow", "--backend-store-uri", backend_uri,
         "--artifacts-destination", str(root / "artifacts"), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )  # fmt: skip


def _assert_clear_error(result, shown: str, secret: str, expected: str) -> None:
    stderr = " ".join(result.stderr.split())
    assert result.returncode == 2, result.stderr
    assert f"error: --backend-store-uri {shown}" in stderr and expected in stderr
    assert "Traceback" not in result.stderr and secret not in result.stderr + result.stdout
    assert "MLflow tracking server on" not in stderr  # it never started
    # No clock: MLflow alone retries for ~100 s and then prints a traceback, which the checks
    # above refuse; `_server`'s subprocess timeout is only a guard against a hang.


def test_unreachable_postgresql_uri_fails_fast_naming_the_uri(tmp_path):
    port = free_port()  # nothing listens there
    result = _server(f"postgresql://mlflow:s3cr3t-pw@127.0.0.1:{port}/mlflow", tmp_path)
    _assert_clear_error(
        result, f"postgresql://mlflow:***@127.0.0.1:{port}/mlflow", "s3cr3t-pw", "refused"
    )
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize(
    ("password", "database", "expected"),
    [
        ("wrong-pw-123", None, "password authentication failed"),
        (None, "no_such_db", 'database "no_such_db" does not exist'),
    ],
    ids=["wrong-password", "missing-database"],
)
def test_wrong_postgresql_uri_fails_naming_the_uri(
    postgres_server, tmp_path, password, database, expected
):
    uri = postgres_server.uri(password=password, database=database)
    secret = password or postgres_server.password
    shown = uri.replace(f":{secret}@", ":***@")
    result = _server(uri, tmp_path)
    _assert_clear_error(result, shown, secret, expected)
    assert "check that the server runs" in result.stderr
    assert not (tmp_path / "artifacts").exists()


def test_on_a_postgresql_store_an_advisory_lock_is_the_primary_mutex(postgres_server):
    """Two lockers of one model on a PostgreSQL tracking store: the second waits on the advisory
    lock the first holds (visible in pg_locks) and gives up at its deadline; different models
    do not contend."""
    from types import SimpleNamespace

    from pipeline.errors import RegistryError
    from pipeline.registry import LockSettings, PromotionLock

    client = SimpleNamespace(tracking_uri=postgres_server.uri())
    quick = LockSettings(poll_s=0.05, timeout_s=0.5)
    first = PromotionLock(client, "pg-model", quick)
    first._lock_database(time.monotonic() + 5)
    try:
        with postgres_server.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted")
            assert cur.fetchone()[0] == 1
        second = PromotionLock(client, "pg-model", quick)
        with pytest.raises(RegistryError, match="holds the lock"):
            second._lock_database(time.monotonic() + 0.5)
        other = PromotionLock(client, "another-model", quick)
        other._lock_database(time.monotonic() + 5)
        other._unlock_database()
    finally:
        first._unlock_database()
    second._lock_database(time.monotonic() + 5)  # released: free again
    second._unlock_database()
