"""MLflow's tracking server as infra/ runs it (infra/docker/mlflow-server.sh: basic auth and
allowed hosts), started for real on 127.0.0.1, and the least-privilege user the Ray pods log with
(infra/docker/mlflow-pipeline-user.py)."""

from __future__ import annotations

import base64
import http.client
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO, free_port, stop, wait_for_health

pytestmark = pytest.mark.slow

START_SCRIPT = REPO / "infra" / "docker" / "mlflow-server.sh"
USER_SCRIPT = REPO / "infra" / "docker" / "mlflow-pipeline-user.py"
ADMIN = "admin"


@dataclass
class AuthServer:
    port: int
    admin_password: str
    log: Path

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(
        self,
        method: str,
        path: str,
        *,
        user: tuple[str, str] | None = None,
        host: str | None = None,
        body: dict | None = None,
    ) -> int:
        """The HTTP status of one request, with the Host header and credentials given."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Host": host or f"127.0.0.1:{self.port}", "Content-Type": "application/json"}
        if user:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(user).encode()).decode()
        try:
            conn.request(method, path, body=json.dumps(body) if body else None, headers=headers)
            return conn.getresponse().status
        finally:
            conn.close()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory) -> Iterator[AuthServer]:
    """One basic-auth server for the module: SQLite stores in a tmp dir, a free loopback port,
    Host headers limited to 127.0.0.1:PORT; always stopped."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    port, password = free_port(), secrets.token_hex(16)
    env = {
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # this venv's mlflow
        "HOME": str(root),
        "TMPDIR": str(root),  # basic_auth.ini goes here
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{root / 'mlflow.db'}",
        "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{root / 'auth.db'}",
        "MLFLOW_ARTIFACTS_DESTINATION": str(root / "artifacts"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN,
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_SERVER_ALLOWED_HOSTS": f"127.0.0.1:{port}",
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
    }
    log = root / "server.log"
    proc = subprocess.Popen(
        ["bash", str(START_SCRIPT)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        wait_for_health(f"http://127.0.0.1:{port}", proc, log)
        yield AuthServer(port, password, log)
    finally:
        stop(proc, grace_s=3)


SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


def test_requests_without_credentials_are_refused(auth_server):
    assert auth_server.request("GET", SEARCH) == 401
    assert auth_server.request("GET", SEARCH, user=(ADMIN, "wrong-password")) == 401
    assert auth_server.request("GET", SEARCH, user=(ADMIN, auth_server.admin_password)) == 200
    assert auth_server.request("GET", "/health") == 200  # probes need no credentials


def test_a_foreign_host_header_is_refused_even_with_credentials(auth_server):
    admin = (ADMIN, auth_server.admin_password)
    for host in ("evil.example", f"evil.example:{auth_server.port}", "10.0.0.1:5000"):
        assert auth_server.request("GET", SEARCH, user=admin, host=host) == 403, host


def test_the_pipeline_user_logs_runs_but_cannot_administer(auth_server):
    user_password = secrets.token_hex(16)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": auth_server.uri,
        "MLFLOW_TRACKING_USERNAME": ADMIN,
        "MLFLOW_TRACKING_PASSWORD": auth_server.admin_password,
        "MLFLOW_PIPELINE_USERNAME": "pipeline",
        "MLFLOW_PIPELINE_PASSWORD": user_password,
        "MLFLOW_SETUP_WAIT_S": "30",
    }
    for _ in range(2):  # idempotent: the second run resets the password of the existing user
        done = subprocess.run(
            [sys.executable, str(USER_SCRIPT)], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert user_password not in done.stdout + done.stderr
        assert auth_server.admin_password not in done.stdout + done.stderr
    assert "password set" in done.stdout

    user = ("pipeline", user_password)
    create = {"name": f"least-privilege-{secrets.token_hex(4)}"}
    assert (
        auth_server.request("POST", "/api/2.0/mlflow/experiments/create", user=user, body=create)
        == 200
    )
    new_user = {"username": "intruder", "password": secrets.token_hex(8)}
    assert (
        auth_server.request("POST", "/api/2.0/mlflow/users/create", user=user, body=new_user) == 403
    )
    admin_flag = {"username": "pipeline", "is_admin": True}
    assert (
        auth_server.request(
            "PATCH", "/api/2.0/mlflow/users/update-admin", user=user, body=admin_flag
        )
        == 403
    )


def test_the_user_script_refuses_the_admin_as_pipeline_user(auth_server):
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": auth_server.uri,
        "MLFLOW_TRACKING_USERNAME": ADMIN,
        "MLFLOW_TRACKING_PASSWORD": auth_server.admin_password,
        "MLFLOW_PIPELINE_USERNAME": ADMIN,
        "MLFLOW_PIPELINE_PASSWORD": "x",
    }
    done = subprocess.run(
        [sys.executable, str(USER_SCRIPT)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and "is the admin" in done.stderr
