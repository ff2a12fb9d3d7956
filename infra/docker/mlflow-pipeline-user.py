#!/usr/bin/env python
"""Create MLflow's non-admin user for Ray pods (or reset its password), so that they log runs and
register models without the admin credentials. Idempotent: safe to run at every deploy.

Installed in the training image as /usr/local/bin/mlflow-pipeline-user; run by the mlflow-setup
Job (infra/k8s/mlflow.yaml) and the compose service of the same name. Configured only through the
environment, so no credential appears in a manifest or a process list:
  MLFLOW_TRACKING_URI                                  the tracking server, e.g. http://mlflow:5000
  MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD  the admin (creates the user)
  MLFLOW_PIPELINE_USERNAME / MLFLOW_PIPELINE_PASSWORD  the user to create for Ray pods
  MLFLOW_SETUP_WAIT_S                                  how long to wait for the server (300)

The user is never an admin: it can create experiments and registered models (and manage what it
created) and reads the rest at the server's default permission. Exit status 0 when the user exists
with that password, 1 otherwise; messages name the user, never a password.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request


def wait_for_server(uri: str, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=5):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"{uri}/health did not answer within {wait_s:g} s: {exc}") from None
            print(f"waiting for {uri} ({exc})", flush=True)
            time.sleep(5)


def ensure_user(uri: str, username: str, password: str) -> str:
    """Create `username` as a non-admin, or set its password; returns what was done."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    client = AuthServiceClient(uri)
    try:
        client.create_user(username, password)
        done = "created"
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        client.update_user_password(username, password)
        done = "password set"
    client.update_user_admin(username, False)  # least privilege even if someone promoted it
    return done


def main() -> int:
    missing = [
        name
        for name in (
            "MLFLOW_TRACKING_URI",
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
            "MLFLOW_PIPELINE_USERNAME",
            "MLFLOW_PIPELINE_PASSWORD",
        )
        if not os.environ.get(name)
    ]
    if missing:
        print(f"error: set {', '.join(missing)}", file=sys.stderr)
        return 1
    uri = os.environ["MLFLOW_TRACKING_URI"].rstrip("/")
    username = os.environ["MLFLOW_PIPELINE_USERNAME"]
    if username == os.environ["MLFLOW_TRACKING_USERNAME"]:
        print(f"error: MLFLOW_PIPELINE_USERNAME is the admin {username!r}; use another user",
              file=sys.stderr)  # fmt: skip
        return 1
    wait_for_server(uri, float(os.environ.get("MLFLOW_SETUP_WAIT_S", "300")))
    done = ensure_user(uri, username, os.environ["MLFLOW_PIPELINE_PASSWORD"])
    print(f"MLflow user {username!r} (not admin): {done}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
