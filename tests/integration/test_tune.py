"""Ray Tune search on a real local Ray: ASHA stops trials early, MLflow holds the hierarchy, the
best trial's model is registered, and a bad search space fails before any trial starts."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.tags import PARENT_RUN_TAG, SEARCH_TAG, TRIAL_STATE_TAG, TRIAL_TAG
from pipeline.tune import parse_search_space, run_tune

REPO = Path(__file__).resolve().parents[2]
DIGITS_CONFIG = REPO / "jobs" / "configs" / "digits.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # searches of several trials


def test_asha_search_records_the_hierarchy_and_registers_the_best_trial(
    ray_session, tmp_path, digits_uri, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(
        DIGITS_CONFIG,
        [
            f"data.uri={digits_uri}",
            f"run.storage_path={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "train.epochs=4",
            "train.schedule=constant",  # (one-cycle's first epochs say little about its last)
            "scaling.num_workers=1",
            "registry.model_name=tuned",
        ],
    )
    # Three learning rates, two hopeless. Trials run two at a time in grid order (bad, good,
    # bad): the third starts when one of the first two ends, meets both their results at ASHA's
    # first rung (grace 1 epoch, keep the top half) and is stopped there. (Three trials, not
    # more: each costs ~25 s of Ray Train start-up on 2 cores.)
    space = parse_search_space(
        {
            "num_samples": 1,
            "max_concurrent_trials": 2,
            "asha": {"grace_period": 1, "reduction_factor": 2},
            "space": {
                "train.lr": {"grid": [1e-5, 0.05, 1e-4]},
                "train.label_smoothing": {"uniform": [0.0, 0.2]},
            },
        },
        cfg,
    )
    summary = run_tune(cfg, space, name="search1")

    assert len(summary.trials) == 3
    states = [t.state for t in summary.trials]
    assert "stopped" in states, states
    assert "error" not in states, [t.error for t in summary.trials]
    stopped = [t for t in summary.trials if t.state == "stopped"]
    assert all(t.epochs < 4 for t in stopped)
    assert any(t.params["train.lr"] == pytest.approx(1e-4) for t in stopped)
    assert summary.epochs_total < 12

    client = MlflowClient(cfg.tracking.tracking_uri)
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.lr"] == "grid(1e-05, 0.05, 0.0001)"
    assert parent.data.params["tune.scheduler"] == "asha"
    assert parent.data.metrics["trials_stopped"] == len(stopped)
    children = client.search_runs(
        [summary.experiment_id], f"tags.`{PARENT_RUN_TAG}` = '{summary.parent_run_id}'"
    )
    assert len(children) == 3
    by_trial = {c.data.tags[TRIAL_TAG]: c for c in children}
    for trial in summary.trials:
        child = by_trial[trial.trial_id]
        assert child.data.tags[SEARCH_TAG] == "search1"
        assert child.data.tags[TRIAL_STATE_TAG] == trial.state
        assert float(child.data.params["train.lr"]) == pytest.approx(trial.params["train.lr"])
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "val_acc"))
        assert steps == list(range(trial.epochs)), (trial.trial_id, steps)
        assert child.info.status == ("KILLED" if trial.state == "stopped" else "FINISHED")

    # The parent's table (sorted by the metric) and plot.
    local = Path(client.download_artifacts(summary.parent_run_id, "trials.csv", str(tmp_path)))
    rows = list(csv.DictReader(local.open()))
    assert [r["trial_id"] for r in rows] == [t.trial_id for t in summary.trials]
    values = [float(r["best_val_acc"]) for r in rows]
    assert values == sorted(values, reverse=True)
    artifacts = {a.path for a in client.list_artifacts(summary.parent_run_id)}
    assert {"trials.csv", "val_acc_vs_params.png", "space.yaml", "config.yaml"} <= artifacts

    # The registered version is the best completed trial's model, tagged with search and trial.
    best = summary.best
    assert best is not None and best.state == "completed"
    assert best.params["train.lr"] == pytest.approx(0.05) and best.best > 0.5
    completed = [t for t in summary.trials if t.state == "completed"]
    assert best.best == max(t.best for t in completed)
    version = client.get_model_version("tuned", summary.model_version)
    assert version.run_id == best.run_id
    assert version.tags[SEARCH_TAG] == "search1"
    assert version.tags[TRIAL_TAG] == best.trial_id
    final_parent = client.get_run(summary.parent_run_id).data
    assert final_parent.tags["pipeline.best_trial_id"] == best.trial_id
    assert final_parent.tags["pipeline.completed"] == "true"
    assert final_parent.metrics["best_val_acc"] == pytest.approx(best.best)

    # The same name again: the search is finished, nothing runs, nothing is registered twice.
    again = run_tune(cfg, space, name="search1")
    assert again.model_version == summary.model_version
    assert len(client.search_model_versions("name = 'tuned'")) == 1


def test_bad_search_space_fails_before_anything_starts(tmp_path, digits_uri):
    space = tmp_path / "space.yaml"
    space.write_text(
        "space:\n  train.lrr: {loguniform: [0.01, 0.5]}\n  train.momentum: {uniform: [0.9, 0.1]}\n"
    )
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "pipeline"),
            "tune",
            "--config",
            str(DIGITS_CONFIG),
            "--space",
            str(space),
            "--set",
            f"data.uri={digits_uri}",
            "--set",
            f"run.storage_path={tmp_path / 'runs'}",
            "--set",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "space.train.lrr: unknown config field" in proc.stderr
    assert "space.train.momentum: uniform needs low < high" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_an_interrupted_search_resumes_under_the_same_name(tmp_path, digits_uri):
    """Ctrl-C in the middle of an Optuna search, then the same command again: the search
    finishes with each trial once, each epoch logged once, one model registered."""
    space = tmp_path / "space.yaml"
    space.write_text(
        "num_samples: 2\n"
        "max_concurrent_trials: 1\n"
        "search: optuna\n"
        "scheduler: none\n"
        "space:\n"
        "  train.lr: {loguniform: [0.01, 0.1]}\n"
    )
    command = [
        str(Path(sys.executable).parent / "pipeline"),
        "tune",
        "--config",
        str(DIGITS_CONFIG),
        "--space",
        str(space),
        "--name",
        "resumable",
        *("--set", f"data.uri={digits_uri}"),
        *("--set", f"run.storage_path={tmp_path / 'runs'}"),
        *("--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"),
        *("--set", "train.epochs=2"),
        *("--set", "scaling.num_workers=1"),
        *("--set", "registry.model_name=resumed"),
    ]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    }
    first = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    experiment = tmp_path / "runs" / "resumable"
    deadline = time.monotonic() + 600
    while not any(
        '"epochs_done": 2' in p.read_text() for p in experiment.glob("*/result.json")
    ):  # the first trial has finished its last epoch
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "no trial finished in 10 minutes"
        time.sleep(1)
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 2, stderr
    assert "was interrupted" in stderr and "to resume" in stderr

    second = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert second.returncode == 0, second.stderr
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store, registry_uri=store)
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("digits").experiment_id],
        "tags.`pipeline.kind` = 'tune'",
    )
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["pipeline.completed"] == "true"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`{PARENT_RUN_TAG}` = '{parent.info.run_id}'"
    )
    assert len(children) == 2
    assert len({c.data.tags[TRIAL_TAG] for c in children}) == 2
    for child in children:
        assert child.data.tags[TRIAL_STATE_TAG] == "completed"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")]
        assert sorted(steps) == [0, 1], steps  # no epoch logged twice
    assert len(client.search_model_versions("name = 'resumed'")) == 1
