"""Nightly retraining on a real local Ray and MLflow: first run trains and promotes, a second run
the same day is a no-op, new shards are found and fine-tuned on, a failing run leaves the
champion alone, and a second run while one holds the lock is refused."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.data.shards import Manifest, ShardInfo, dataset_digest
from pipeline.data.sources import WriteOptions, prepare_digits
from pipeline.errors import NightlyError
from pipeline.evaluation import evaluate_model
from pipeline.nightly import NightlyLock, run_nightly
from pipeline.registry import LockSettings, aliases_of
from pipeline.tags import KIND_TAG, NIGHTLY_DATE_TAG, NIGHTLY_DECISION_TAG
from pipeline.train import trainer
from pipeline.train.callbacks import KillWorkerOnce

REPO = Path(__file__).resolve().parents[2]
NIGHTLY_CONFIG = REPO / "jobs" / "configs" / "nightly.yaml"
DAY = "2026-11-28"

# Each test trains several times and runs CLI processes: 2-4 min each on 2 quiet cores.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def append_train_shard(uri: str) -> str:
    """New labelled data arrives: a new train shard (yesterday's images shifted by a pixel) and
    a manifest that lists it, as an ingestion job would write them."""
    root = Path(uri)
    manifest = Manifest.model_validate_json((root / "manifest.json").read_text())
    train = manifest.splits["train"]
    table = pq.read_table(root / train.shards[0].path)
    spec = manifest.image
    h, w, c = spec.height, spec.width, spec.channels
    assert spec.encoding == "raw"
    images = [
        np.roll(np.frombuffer(b, np.uint8).reshape(h, w, c), 1, axis=1).tobytes()
        for b in table.column("image").to_pylist()
    ]
    new = pa.table(
        {
            "image": pa.array(images, pa.binary()),
            "label": table.column("label"),
            "id": pa.array([f"shifted-{i}" for i in table.column("id").to_pylist()]),
        },
        schema=table.schema,
    )
    path = "train/part-nightly-00001.parquet"
    pq.write_table(new, root / path)
    blob = (root / path).read_bytes()
    train.shards.append(
        ShardInfo(
            path=path, rows=new.num_rows, bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest()
        )
    )
    train.rows += new.num_rows
    counts = np.bincount(new.column("label").to_numpy(), minlength=manifest.num_classes)
    train.class_counts = [a + int(b) for a, b in zip(train.class_counts, counts, strict=True)]
    manifest.digest = dataset_digest(manifest.splits)
    (root / "manifest.json").write_text(manifest.model_dump_json(indent=2))
    return path


@pytest.fixture
def setup(tmp_path, monkeypatch):
    # `evaluate_model` (the test's own check) reads the store from the environment.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    data = tmp_path / "digits"
    prepare_digits(WriteOptions(out=str(data)))
    overrides = [
        f"data.uri={data}",
        f"run.storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "train.epochs=3",
        "nightly.epochs=2",
        "scaling.num_workers=1",
        "registry.class_floor=0.0",
        "registry.model_name=nightly-model",
    ]
    return tmp_path, data, overrides


def nightly_runs(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name("digits")
    return client.search_runs([exp.experiment_id], f"tags.`{KIND_TAG}` = 'nightly'")


def report_of(client: MlflowClient, run_id: str, tmp: Path) -> dict:
    local = client.download_artifacts(run_id, "nightly/report.json", str(tmp))
    return json.loads(Path(local).read_text())


def champion_now(data: Path) -> float:
    """Today's test accuracy of the champion, recomputed by `pipeline evaluate`'s code."""
    return evaluate_model("models:/nightly-model@champion", str(data))["acc"]


def test_nightly_trains_promotes_skips_fine_tunes_and_survives_a_failed_run(
    ray_session, setup, monkeypatch
):
    tmp, data, overrides = setup
    cfg = load_config(NIGHTLY_CONFIG, overrides)
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")

    # 1. No champion yet: train from scratch, the first version becomes champion. One epoch at
    # a tiny LR: a deliberately weak champion, so that step 4's candidate is better by a wide
    # margin.
    weak = load_config(NIGHTLY_CONFIG, [*overrides, "train.epochs=1", "train.lr=0.002"])
    first = run_nightly(weak, date=DAY)
    assert first.decision == "promoted", first.reason
    assert first.init == "scratch" and first.candidate_version == "1"
    assert aliases_of(client, "nightly-model")["champion"] == "1"
    assert first.data is not None and first.data.champion_digest is None

    # 2. Same day again: nothing happens.
    second = run_nightly(cfg, date=DAY)
    assert second.decision == "skipped"
    assert len(client.search_model_versions("name = 'nightly-model'")) == 1
    assert len(nightly_runs(client)) == 1

    # 3. A new day with the same data: nothing new to train on.
    quiet = run_nightly(cfg, date="2026-11-29")
    assert quiet.decision == "no-new-data"
    assert quiet.data.new_shards == [] and quiet.champion_after == "1"
    assert len(client.search_model_versions("name = 'nightly-model'")) == 1

    # 4. New shards arrive; a forced run fine-tunes the weak champion on them, at a full LR:
    # better, so promoted.
    added = append_train_shard(str(data))
    better = load_config(NIGHTLY_CONFIG, [*overrides, "nightly.lr=0.1"])
    forced = run_nightly(better, date="2026-11-29", force=True)
    assert forced.data.new_shards == [added] and forced.data.new_rows > 0
    assert forced.data.removed_shards == []
    assert forced.init == "models:/nightly-model/1"
    assert forced.candidate_version == "2"
    assert forced.decision == "promoted", forced.reason
    assert aliases_of(client, "nightly-model") == {"champion": "2", "previous-champion": "1"}
    train_run = client.get_run(forced.training_run_id)
    assert train_run.data.params["model.weights"] == "models:/nightly-model/1"
    assert train_run.data.params["train.epochs"] == "2"  # nightly.epochs when fine-tuning

    # The report, as an MLflow artifact of the nightly run.
    report = report_of(client, forced.nightly_run_id, tmp)
    assert report["decision"] == forced.decision
    assert report["data"]["new_shards"] == [added]
    assert report["promotion"]["candidate"]["version"] == "2"
    assert report["promotion"]["champion"]["version"] == "1"
    # The decision follows the accuracies it reports, and those are today's, recomputed.
    candidate_acc = report["promotion"]["candidate"]["acc"]
    champion_acc = report["promotion"]["champion"]["acc"]
    assert candidate_acc > champion_acc
    assert candidate_acc == pytest.approx(
        evaluate_model("models:/nightly-model/2", str(data))["acc"], abs=1e-9
    )
    assert champion_acc == pytest.approx(
        evaluate_model("models:/nightly-model/1", str(data))["acc"], abs=1e-9
    )
    run = client.get_run(forced.nightly_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[NIGHTLY_DECISION_TAG] == forced.decision
    assert run.data.tags[NIGHTLY_DATE_TAG] == "2026-11-29"
    md = client.download_artifacts(forced.nightly_run_id, "nightly/report.md", str(tmp))
    assert added in Path(md).read_text()

    # 5. A run forced to be worse (from scratch, one epoch at a tiny LR) is refused, and the
    # champion stays.
    worse = load_config(
        NIGHTLY_CONFIG,
        [*overrides, "nightly.init=scratch", "train.epochs=1", "train.lr=0.0001"],
    )
    refused = run_nightly(worse, date="2026-11-30", force=True)
    assert refused.decision == "refused", refused.reason
    assert refused.init == "scratch" and refused.candidate_version == "3"
    assert aliases_of(client, "nightly-model") == {"champion": "2", "previous-champion": "1"}
    report = report_of(client, refused.nightly_run_id, tmp)
    assert report["decision"] == "refused"
    assert report["promotion"]["champion"]["version"] == "2"
    assert report["promotion"]["candidate"]["acc"] < report["promotion"]["champion"]["acc"]
    assert report["promotion"]["champion"]["acc"] == pytest.approx(champion_now(data))
    run = client.get_run(refused.nightly_run_id)
    assert run.data.tags[NIGHTLY_DECISION_TAG] == "refused"

    # 6. A worker dies mid-training with no retries left: the run fails, the champion stays.
    kill = [KillWorkerOnce(epoch=0, marker=str(tmp / "injected-failure"))]
    failing = load_config(NIGHTLY_CONFIG, [*overrides, "run.max_failures=0"])
    with monkeypatch.context() as patch, pytest.raises(NightlyError, match="unchanged: v2"):
        patch.setattr(
            trainer, "run_training", functools.partial(trainer.run_training, loop_callbacks=kill)
        )
        run_nightly(failing, date="2026-12-01", force=True)
    assert aliases_of(client, "nightly-model") == {"champion": "2", "previous-champion": "1"}
    failed = [r for r in nightly_runs(client) if r.data.tags[NIGHTLY_DATE_TAG] == "2026-12-01"]
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    assert failed[0].data.tags[NIGHTLY_DECISION_TAG] == "failed"
    report = report_of(client, failed[0].info.run_id, tmp)
    assert report["error"] and report["champion_after"] == "2"


def test_a_second_nightly_run_is_refused_while_one_holds_the_lock(ray_session, setup):
    """(No champion needed: each nightly training costs ~30 s, so the failed run's check lives
    in the test above, on its champion.)"""
    tmp, _, overrides = setup
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")

    # While another nightly run holds the lock, a second one (a real CLI process) is refused at
    # once and changes nothing.
    lock = LockSettings(timeout_s=10.0, ttl_s=120.0, settle_s=1.0)
    client.create_registered_model("nightly-model")  # (the lock is a tag on it)
    with NightlyLock(client, "nightly-model", lock):
        proc = subprocess.run(
            [
                str(Path(sys.executable).parent / "pipeline"),
                "nightly",
                "--config",
                str(NIGHTLY_CONFIG),
                "--date",
                "2026-12-01",
                "--force",
                *[arg for o in overrides for arg in ("--set", o)],
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert proc.returncode == 2, proc.stderr
    assert "another nightly run is in progress" in proc.stderr
    assert "Traceback" not in proc.stderr
    experiment = client.get_experiment_by_name("digits")
    assert experiment is None or client.search_runs([experiment.experiment_id]) == []
    assert client.search_model_versions("name = 'nightly-model'") == []

    # Two real nightly processes started together: exactly one proceeds (and trains), the other
    # is refused.
    command = [
        str(Path(sys.executable).parent / "pipeline"),
        "nightly",
        "--config",
        str(NIGHTLY_CONFIG),
        "--date",
        "2026-12-02",
        "--force",  # both want to train (without it the second would wait, then skip the day)
        *[arg for o in overrides for arg in ("--set", o)],
    ]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    racers = [
        subprocess.Popen(
            command, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outcomes = sorted(
        ((p.wait(timeout=600), p.communicate()[1]) for p in racers), key=lambda o: o[0]
    )
    assert [code for code, _ in outcomes] == [0, 2], outcomes
    assert "another nightly run is in progress" in outcomes[1][1]
    day = [r for r in nightly_runs(client) if r.data.tags[NIGHTLY_DATE_TAG] == "2026-12-02"]
    assert len(day) == 1 and day[0].info.status == "FINISHED"
    assert len(client.search_model_versions("name = 'nightly-model'")) == 1
    assert aliases_of(client, "nightly-model")["champion"] == "1"
