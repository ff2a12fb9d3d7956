"""Training end to end on a real local Ray: accuracy, MLflow records, S3, faults, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.data.sources import WriteOptions, prepare_digits
from pipeline.errors import TrainingError
from pipeline.registry import register_training
from pipeline.tags import FAILURE_REASON_TAG
from pipeline.train.callbacks import KillWorkerOnce
from pipeline.train.trainer import run_training
from tests.support import bn_batches_tracked, repo_files, untrained_accuracy

REPO = Path(__file__).resolve().parents[2]
DIGITS_CONFIG = REPO / "jobs" / "configs" / "digits.yaml"

pytestmark = pytest.mark.slow


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def config(workdir: Path, data_uri: str, *overrides: str):
    return load_config(
        DIGITS_CONFIG,
        [
            f"data.uri={data_uri}",
            f"run.storage_path={workdir / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
            *overrides,
        ],
    )


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.timeout(1800)  # 40 epochs on 2 workers: ~1-2 min alone, more on a shared machine
def test_default_config_trains_two_workers_and_records_everything(
    ray_session, workdir, digits_uri, monkeypatch
):
    """The suite's one accuracy acceptance test: `make train`'s config (2 CPU workers, 40
    epochs) reaches >= 95% digits test accuracy. Every other test compares a trained model with
    the untrained one instead.

    (Seed 0, the config's, reaches 99.63% on the dev VM; seeds 0-3 gave 99.63, 98.51, 100 and
    100%: see README "Accuracy". The bar here is the issue's 95%, which holds for any seed and
    CPU, since another CPU's float rounding takes another trajectory.)"""
    cfg = config(workdir, digits_uri, "run.name=default")
    summary = run_training(cfg)
    assert summary.model_version is None  # training itself registers nothing
    register_training(cfg, summary)
    assert summary.metrics["test_acc"] >= 0.95, summary.metrics
    assert summary.model_version == "1" and summary.registered_name == "digits-resnet"

    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(summary.run_id)
    params = run.data.params
    assert params["train.lr"] == "0.1" and params["scaling.num_workers"] == "2"
    assert params["data.uri"] == digits_uri
    assert metric_steps(client, summary.run_id, "val_acc") == list(range(40))
    for key in ("train_loss", "train_acc", "val_loss", "val_top5", "images_per_s", "lr"):
        assert len(metric_steps(client, summary.run_id, key)) == 40, key
    assert run.data.metrics["best_val_acc"] >= 0.97
    tags = run.data.tags
    assert {"git_commit", "ray_version", "torch_version", "python_version"} <= tags.keys()
    assert tags["pipeline.completed"] == "true"
    artifacts = {a.path for a in client.list_artifacts(summary.run_id)}
    assert {
        "config.yaml",
        "learning_curves.png",
        "confusion_matrix.png",
        "per_class_accuracy.csv",
        "test_metrics.json",
    } <= artifacts
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name == "digits"
    local = client.download_artifacts(summary.run_id, "test_metrics.json", str(workdir))
    assert json.loads(Path(local).read_text())["test_acc"] == pytest.approx(
        run.data.metrics["test_acc"]
    )
    version = client.get_model_version("digits-resnet", "1")
    assert version.tags["dataset_digest"] == tags["pipeline.dataset_digest"]
    assert float(version.tags["test_acc"]) == pytest.approx(summary.metrics["test_acc"], abs=1e-6)

    # `pipeline evaluate` recomputes the same test accuracy from the registered model.
    from pipeline.evaluation import evaluate_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.tracking.tracking_uri)
    result = evaluate_model("models:/digits-resnet/1", digits_uri)
    assert result["acc"] == pytest.approx(summary.metrics["test_acc"], abs=1e-9)


@pytest.fixture(scope="module")
def faulty_run(ray_session, digits_uri, tmp_path_factory):
    """A 4-epoch run whose last worker is killed halfway through epoch 1 (run.max_failures=1):
    Train restarts the group from the epoch-0 checkpoint. Every checkpoint is kept."""
    workdir = tmp_path_factory.mktemp("faulty")
    cfg = config(
        workdir,
        digits_uri,
        "run.name=faulty",
        "train.epochs=4",
        "run.max_failures=1",
        "run.num_to_keep=4",
        "registry.model_name=",
    )
    marker = workdir / "injected-failure"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        summary = run_training(cfg, loop_callbacks=[KillWorkerOnce(epoch=1, marker=str(marker))])
    return workdir, cfg, summary


def test_worker_death_resumes_from_checkpoint_in_the_same_mlflow_run(faulty_run):
    workdir, cfg, summary = faulty_run
    marker = workdir / "injected-failure"
    assert marker.exists(), "the worker process was killed"
    client = MlflowClient(cfg.tracking.tracking_uri)
    runs = client.search_runs([summary.experiment_id])
    assert len(runs) == 1
    for key in ("val_acc", "train_loss", "epoch_time_s"):
        assert metric_steps(client, summary.run_id, key) == [0, 1, 2, 3], key
    assert "test_acc" in summary.metrics


def test_after_a_worker_death_the_weights_continue_rather_than_restart(faulty_run):
    """Batch norm counts the steps its weights went through: after the restart at epoch 1 the
    count goes on from epoch 0's (4 epochs' worth at the end), not from zero (3 epochs')."""
    import torch

    workdir, _, _ = faulty_run
    steps = {}
    for done in range(1, 5):  # epoch-000N: the checkpoint after N epochs
        path = workdir / "runs" / "faulty" / f"epoch-{done:04d}" / "checkpoint.pt"
        saved = torch.load(path, map_location="cpu", weights_only=True)
        counts = set(bn_batches_tracked(saved["model"]))
        assert len(counts) == 1, counts  # every layer saw every step
        steps[done] = counts.pop()
    per_epoch = steps[1]
    assert per_epoch > 0
    assert steps == {n: per_epoch * n for n in range(1, 5)}, steps


def test_a_restart_records_the_epoch_it_resumed_from(faulty_run):
    _, cfg, summary = faulty_run
    client = MlflowClient(cfg.tracking.tracking_uri)
    resumed = client.get_metric_history(summary.run_id, "resumed_from_epoch")
    # The worker died in the second epoch (epoch 1, 0-based); the latest checkpoint then was
    # the first epoch's (epoch 0): that is the epoch the group resumed from.
    assert [m.value for m in resumed] == [0.0]


def test_worker_deaths_beyond_max_failures_fail_the_run_and_leave_the_registry_alone(
    ray_session, workdir, digits_uri
):
    """Every attempt loses a worker in epoch 1: with run.max_failures=1 that is one restart,
    then the run is FAILED (with the reason), nothing is registered, the champion keeps its
    alias, and the error is a TrainingError (a user error: the CLI exits 2)."""
    name = "doomed-model"
    cfg = config(
        workdir, digits_uri, "run.name=doomed", "train.epochs=3", "run.max_failures=1",
        "scaling.num_workers=1", "train.batch_size=128", f"registry.model_name={name}",
    )  # fmt: skip
    client = MlflowClient(cfg.tracking.tracking_uri)
    client.create_registered_model(name)
    champion = client.create_model_version(name, source=str(workdir / "champion"), run_id=None)
    client.set_registered_model_alias(name, "champion", champion.version)
    kill = KillWorkerOnce(epoch=1, marker=str(workdir / "deaths"), times=99)
    with pytest.raises(TrainingError, match="doomed"):
        register_training(cfg, run_training(cfg, loop_callbacks=[kill]))
    assert kill.deaths() == 2, "the first attempt and one restart, then no more"
    (run,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags.get(FAILURE_REASON_TAG)
    assert [str(v.version) for v in client.search_model_versions(f"name='{name}'")] == ["1"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_the_same_name_resumes_past_a_damaged_checkpoint_and_a_new_name_starts_fresh(
    ray_session, workdir, digits_uri, monkeypatch
):
    """One store, two run names, four runs (one test: each run costs ~25 s of Ray start-up).

    * A run stopped after two checkpoints, the latest then damaged on disk: the same command
      under run.max_failures=-1 continues the same MLflow run from the checkpoint before, with
      each epoch logged once.
    * Another name starts a new MLflow run from epoch 0, and when its only checkpoint is
      damaged it fails with a message naming it instead of restarting forever.
    * Nothing is written to the working directory or the checkout: run artifacts and the logged
      model sit beside the SQLite store (MLflow's default would be ./mlruns), checkpoints under
      run.storage_path.
    """
    cwd = workdir / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = repo_files()
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")

    def stopped_run(run_name: str, epochs: int) -> tuple[Path, list[str], str]:
        overrides = [
            f"run.name={run_name}", f"train.epochs={epochs}", "scaling.num_workers=1",
            "train.batch_size=128", "run.num_to_keep=4", "registry.model_name=",
        ]  # fmt: skip
        kill = [KillWorkerOnce(epoch=epochs - 1, marker=str(workdir / f"{run_name}-killed"))]
        with pytest.raises(TrainingError, match=run_name):
            run_training(
                config(workdir, digits_uri, *overrides, "run.max_failures=0"), loop_callbacks=kill
            )
        (run,) = client.search_runs(
            [client.get_experiment_by_name("digits").experiment_id],
            f"attributes.run_name = '{run_name}'",
        )
        assert metric_steps(client, run.info.run_id, "val_acc") == list(range(epochs - 1))
        return workdir / "runs" / run_name, [*overrides, "run.max_failures=-1"], run.info.run_id

    run_dir, again, first_id = stopped_run("damaged", epochs=3)  # checkpoints after epochs 1, 2
    truncate(run_dir / "epoch-0002" / "checkpoint.pt")
    summary = run_training(config(workdir, digits_uri, *again))
    assert summary.run_id == first_id, "the same name continues the same MLflow run"
    assert metric_steps(client, summary.run_id, "val_acc") == [0, 1, 2]
    resumed = client.get_metric_history(summary.run_id, "resumed_from_epoch")
    assert [m.value for m in resumed] == [0.0], "resumed after epoch 0, from epoch-0001"

    run_dir, again, fresh_id = stopped_run("hopeless", epochs=2)  # one checkpoint, after epoch 1
    assert fresh_id != first_id, "a new name starts a new run (its epochs from 0, checked above)"
    truncate(run_dir / "epoch-0001" / "checkpoint.pt")
    with pytest.raises(TrainingError, match="no checkpoint of this run can be read") as info:
        run_training(config(workdir, digits_uri, *again))
    assert "epoch-0001" in str(info.value)

    assert list(cwd.iterdir()) == []
    assert repo_files() - before == set()
    artifacts = client.get_run(summary.run_id).info.artifact_uri
    assert artifacts.startswith((workdir / "mlartifacts").as_uri()), artifacts
    logged = list((workdir / "mlartifacts").rglob("weights.pt"))
    assert logged, "the logged model lives beside the store too"


@pytest.mark.s3
def test_shards_and_checkpoints_on_s3(ray_session, workdir, s3_server):
    import boto3

    bucket = s3_server.new_bucket()
    data_uri = f"s3://{bucket}/datasets/digits"
    prepare_digits(WriteOptions(out=data_uri))
    cfg = config(
        workdir,
        data_uri,
        "run.name=on-s3",
        "train.epochs=3",
        f"run.storage_path=s3://{bucket}/checkpoints",
        "registry.model_name=",
        "data.prepare=",
        "run.checkpoint_upload=async",
        "run.max_failures=1",
    )
    # Rank 0 dies right after handing epoch 1's checkpoint to the asynchronous upload: the
    # group restarts from whatever checkpoint Ray had registered, and each epoch is logged once.
    kill = KillWorkerOnce(epoch=1, marker=str(workdir / "killed"), after_report=True)
    summary = run_training(cfg, loop_callbacks=[kill])
    assert kill.deaths() == 1
    client = MlflowClient(cfg.tracking.tracking_uri)
    assert metric_steps(client, summary.run_id, "val_acc") == [0, 1, 2]
    assert client.get_metric_history(summary.run_id, "resumed_from_epoch")
    assert summary.metrics["test_acc"] > untrained_accuracy(cfg) + 0.1
    keys = [
        o["Key"]
        for o in boto3.client("s3", endpoint_url=s3_server.endpoint)
        .list_objects_v2(Bucket=bucket, Prefix="checkpoints/on-s3/")
        .get("Contents", [])
    ]
    assert any(k.endswith("epoch-0003/checkpoint.pt") for k in keys), keys
    assert not any("epoch-0001/" in k for k in keys), "num_to_keep=2 prunes old checkpoints"


def test_loop_features_streaming_ingest(ray_session, workdir, digits_uri):
    """The paths the default recipe does not take: Ray Data augmenting in map_batches every
    epoch (no worker cache), a dynamic-conv net, bf16 autocast, EMA, MixUp/CutMix, clipping,
    AdamW with cosine warm-up, gradient accumulation under DDP, asynchronous checkpoint upload."""
    cfg = config(
        workdir,
        digits_uri,
        "run.name=features",
        "train.epochs=3",
        "data.cache=never",
        "model.name=dy_cifar_resnet20",
        "model.dynamic.temperature_epochs=2",
        "train.precision=bf16",
        "train.ema_decay=0.9",
        "train.mixup_alpha=0.2",
        "train.cutmix_alpha=1.0",
        "train.grad_clip=5",
        "train.optimizer=adamw",
        "train.lr=0.003",
        "train.schedule=cosine",
        "train.warmup_epochs=1",
        "train.accumulate_steps=2",
        "run.checkpoint_upload=async",
        "registry.model_name=",
    )
    summary = run_training(cfg)
    # Ray waits for pending async uploads before the run ends: the last epoch's is there.
    assert (workdir / "runs" / "features" / "epoch-0003" / "checkpoint.pt").is_file()
    client = MlflowClient(cfg.tracking.tracking_uri)
    assert metric_steps(client, summary.run_id, "val_acc") == [0, 1, 2]
    lrs = [
        m.value
        for m in sorted(client.get_metric_history(summary.run_id, "lr"), key=lambda m: m.step)
    ]
    assert lrs[0] > lrs[-1], "cosine decays after the warm-up"
    # Learning happened, through every feature at once.
    assert summary.metrics["test_acc"] > untrained_accuracy(cfg) + 0.1
