"""`pipeline server mlflow` with its artifacts on S3 (moto's server standing in for MinIO/AWS)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import boto3
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import BIN, free_port, stop, wait_for_health

pytestmark = [pytest.mark.s3, pytest.mark.slow]


def test_tracking_server_proxies_artifacts_to_s3(s3_server, tmp_path):
    bucket = s3_server.new_bucket()
    port = free_port()
    log = tmp_path / "server.log"
    cmd = [
        str(BIN / "pipeline"),
        "server",
        "mlflow",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--artifacts-destination",
        f"s3://{bucket}/mlflow",
        "--endpoint-url",
        s3_server.endpoint,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(
        cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_for_health(uri, proc, log)
        client = MlflowClient(uri)
        run = client.create_run(client.create_experiment("s3-artifacts"))
        client.log_text(run.info.run_id, "stored on S3", "notes/hello.txt")
        keys = [
            o["Key"]
            for o in boto3.client("s3", endpoint_url=s3_server.endpoint)
            .list_objects_v2(Bucket=bucket)
            .get("Contents", [])
        ]
        assert any(k.startswith("mlflow/") and k.endswith("notes/hello.txt") for k in keys), keys
        local = client.download_artifacts(run.info.run_id, "notes/hello.txt", str(tmp_path))
        assert Path(local).read_text() == "stored on S3"
    finally:
        stop(proc)
