"""The search space file: every field and distribution checked against the config schema."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.tune import load_search_space, parse_search_space, trial_config


@pytest.fixture
def cfg():
    return load_config(None, ["train.epochs=6"])


def test_parses_every_distribution(cfg):
    space = parse_search_space(
        {
            "num_samples": 3,
            "space": {
                "train.lr": {"loguniform": [0.01, 0.5]},
                "train.label_smoothing": {"uniform": [0.0, 0.3]},
                "model.dynamic.num_kernels": {"randint": [2, 6]},
                "train.optimizer": {"choice": ["sgd", "adamw"]},
                "train.batch_size": {"grid": [32, 64]},
            },
        },
        cfg,
    )
    kinds = {p.path: p.kind for p in space.params}
    assert kinds == {
        "train.lr": "loguniform",
        "train.label_smoothing": "uniform",
        "model.dynamic.num_kernels": "randint",
        "train.optimizer": "choice",
        "train.batch_size": "grid",
    }
    assert space.metric == "val_acc" and space.mode == "max"
    assert space.total_trials() == 6  # 3 samples x 2 grid values
    domains = space.param_space()
    assert domains["train.batch_size"] == {"grid_search": [32, 64]}
    assert domains["train.lr"].lower == 0.01 and domains["train.lr"].upper == 0.5


def test_loss_metrics_are_minimised(cfg):
    space = parse_search_space(
        {"metric": "val_loss", "space": {"train.lr": {"uniform": [0.01, 0.1]}}}, cfg
    )
    assert space.mode == "min"


def test_trial_config_sets_nested_fields(cfg):
    trial = trial_config(cfg.to_dict(), {"train.lr": 0.3, "model.dynamic.num_kernels": 3})
    assert trial.train.lr == 0.3 and trial.model.dynamic.num_kernels == 3
    assert trial.train.epochs == 6  # everything else from the base config


def problems(cfg, raw) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_search_space(raw, cfg, "space.yaml")
    return str(exc.value)


def test_unknown_field_is_named(cfg):
    msg = problems(cfg, {"space": {"train.lrr": {"uniform": [0.1, 0.2]}}})
    assert "space.train.lrr: unknown config field" in msg and "lr" in msg


def test_every_problem_is_reported_at_once(cfg):
    msg = problems(
        cfg,
        {
            "metric": "accuracy",
            "space": {
                "train.lr": {"loguniform": [0.0, 0.5]},
                "train.momentum": {"uniform": [0.9, 0.5]},
                "train.optimizer": {"choice": ["sgd", "adam"]},
                "train.seed": {"randint": [0.5, 3]},
                "model.dropout": {"normal": [0, 1]},
                "train": {"uniform": [0, 1]},
                "train.lr.value": {"uniform": [0, 1]},
            },
        },
    )
    assert msg.startswith("space.yaml: 8 problem(s)")
    for expected in (
        "metric: 'accuracy' is not a per-epoch metric",
        "space.train.lr: loguniform needs low > 0",
        "space.train.momentum: uniform needs low < high",
        "space.train.optimizer: the value 'adam' is not valid",
        "space.train.seed: randint bounds must be integers",
        "space.model.dropout: unknown distribution 'normal'",
        "space.train: is a section",
        "space.train.lr.value: train.lr is a value, not a section",
    ):
        assert expected in msg, (expected, msg)


def test_values_outside_the_schema_are_refused(cfg):
    msg = problems(cfg, {"space": {"model.dropout": {"uniform": [0.0, 1.5]}}})
    assert "space.model.dropout: the value 1.5 is not valid" in msg


def test_fixed_fields_cannot_be_searched(cfg):
    msg = problems(
        cfg,
        {
            "space": {
                "train.epochs": {"choice": [5, 10]},
                "scaling.num_workers": {"choice": [1, 2]},
                "tracking.experiment": {"choice": ["a", "b"]},
            }
        },
    )
    assert "space.train.epochs: is fixed for a search" in msg
    assert "space.scaling.num_workers: is in the 'scaling' section" in msg
    assert "space.tracking.experiment: is in the 'tracking' section" in msg


def test_settings_are_validated(cfg):
    msg = problems(
        cfg,
        {
            "num_samples": 0,
            "scheduler": "hyperband",
            "colour": "blue",
            "space": {"train.lr": {"uniform": [0.1, 0.2]}},
        },
    )
    assert "num_samples" in msg and "scheduler" in msg and "colour: unknown field" in msg


def test_grace_period_beyond_the_budget_and_grid_with_optuna(cfg):
    msg = problems(
        cfg,
        {
            "search": "optuna",
            "asha": {"grace_period": 7},
            "space": {"train.lr": {"grid": [0.1, 0.2]}},
        },
    )
    assert "asha.grace_period (7) exceeds train.epochs (6)" in msg
    assert "grid is not supported with search: optuna" in msg


def test_empty_space_and_bad_shapes(cfg):
    assert "space: empty" in problems(cfg, {"space": {}})
    assert "the top level must be a mapping" in problems(cfg, ["train.lr"])
    assert "expected one distribution" in problems(cfg, {"space": {"train.lr": 0.1}})
    assert "needs [low, high]" in problems(cfg, {"space": {"train.lr": {"uniform": [0.1]}}})


def test_load_from_file(tmp_path, cfg):
    with pytest.raises(ConfigError, match="search space file not found"):
        load_search_space(tmp_path / "missing.yaml", cfg)
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_search_space(bad, cfg)
    good = tmp_path / "space.yaml"
    good.write_text("space:\n  train.lr: {loguniform: [0.01, 0.5]}\n")
    assert [p.path for p in load_search_space(good, cfg).params] == ["train.lr"]


@pytest.mark.parametrize(
    ("status", "last_result", "finished"),
    [
        ("TERMINATED", {"epochs_done": 2}, True),  # completed, or stopped early by ASHA
        ("ERROR", {"trial_id": "a"}, True),  # failed (a restore retries it: resume_errored)
        ("RUNNING", {"epochs_done": 1}, False),
        ("PENDING", {"trial_id": "a"}, False),
        # Ctrl-C while it started: Tune's saved state still has it pending. Tune fills in its
        # own fields (trial id, pid, host, time) before any report.
        ("TERMINATED", {"trial_id": "a", "pid": 1, "hostname": "h", "timestamp": 0}, False),
    ],
)
def test_a_trial_interrupted_before_its_first_report_is_unfinished(status, last_result, finished):
    from types import SimpleNamespace

    from pipeline.tune.search import _finished

    trial = SimpleNamespace(status=status, last_result=last_result)
    assert _finished(trial) is finished
    # under search.time_budget_s the budget may end a trial before its first report
    assert _finished(trial, time_budget=True) is (finished or status == "TERMINATED")
