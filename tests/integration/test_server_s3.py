"""`pipeline server mlflow` with its artifacts on S3 (moto's server standing in for MinIO/AWS)."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import running_mlflow_server

pytestmark = [pytest.mark.s3, pytest.mark.slow]


def test_tracking_server_proxies_artifacts_to_s3(s3_server, tmp_path):
    bucket = s3_server.new_bucket()
    destination = f"s3://{bucket}/mlflow"
    with running_mlflow_server(tmp_path, destination, "--endpoint-url", s3_server.endpoint) as (
        uri,
        _,
    ):
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
