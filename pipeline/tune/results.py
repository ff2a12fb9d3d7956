"""After a search: each trial's state and metrics from its MLflow run, the table and plot on the
parent run, and the best completed trial's model registered."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.tags import (
    BEST_RUN_TAG,
    BEST_TRIAL_TAG,
    COMPLETED_TAG,
    MODEL_VERSION_TAG,
    PARENT_RUN_TAG,
    SEARCH_RUN_TAG,
    SEARCH_TAG,
    STOPPED_AT_EPOCH_TAG,
    TRIAL_STATE_TAG,
    TRIAL_TAG,
)
from pipeline.tune.space import SearchSpace

log = logging.getLogger(__name__)


@dataclass
class TrialRow:
    trial_id: str
    state: str  # completed | stopped | error
    epochs: int
    best: float | None  # best value of the metric over the trial's epochs
    last: float | None
    params: dict[str, Any]
    run_id: str | None = None
    test_acc: float | None = None
    error: str | None = None


@dataclass
class TuneSummary:
    name: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    metric: str
    mode: str
    trials: list[TrialRow] = field(default_factory=list)
    best: TrialRow | None = None
    model_version: str | None = None
    registered_name: str | None = None
    epochs_total: int = 0
    seconds: float = 0.0

    @property
    def run_url(self) -> str:
        from pipeline.tracking import run_link

        return run_link(self.tracking_uri, self.experiment_id, self.parent_run_id)


def _trial_rows(
    cfg: PipelineConfig, space: SearchSpace, grid, children: dict, client
) -> list[TrialRow]:
    """One row per trial. Epochs and metric values come from the trial's MLflow run: a stopped
    trial may finish (and log) one more epoch between its last report and Tune's stop."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        child = children.get(trial_id)
        values: list[float] = []
        if child is not None:
            history = client.get_metric_history(child.info.run_id, space.metric)
            values = [m.value for m in sorted(history, key=lambda m: m.step)]
        elif result.metrics_dataframe is not None and space.metric in result.metrics_dataframe:
            values = [float(v) for v in result.metrics_dataframe[space.metric].dropna()]
        epochs = max(int(metrics.get("epochs_done", 0)), len(values))
        state = "completed" if epochs >= cfg.train.epochs else "stopped"
        if result.error is not None:
            state = "error"
        best = (max(values) if space.mode == "max" else min(values)) if values else None
        rows.append(
            TrialRow(
                trial_id=trial_id,
                state=state,
                epochs=epochs,
                best=best,
                last=values[-1] if values else None,
                params={p.path: (result.config or {}).get(p.path) for p in space.params},
                run_id=child.info.run_id if child else None,
                test_acc=child.data.metrics.get("test_acc") if child else None,
                error=str(result.error).strip().splitlines()[-1] if result.error else None,
            )
        )
    sign = 1 if space.mode == "max" else -1
    rows.sort(key=lambda r: (r.best is None, -sign * (r.best or 0.0)))
    return rows


def finish_search(cfg, space: SearchSpace, grid, summary_base: dict) -> TuneSummary:
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    uri = cfg.tracking.resolved_uri()
    client = MlflowClient(uri)
    parent_id = summary_base["parent_run_id"]
    children = {
        run.data.tags.get(TRIAL_TAG): run
        for run in client.search_runs(
            [summary_base["experiment_id"]], f"tags.`{PARENT_RUN_TAG}` = '{parent_id}'"
        )
    }
    rows = _trial_rows(cfg, space, grid, children, client)
    status = {"completed": "FINISHED", "stopped": "KILLED", "error": "FAILED"}
    for row in rows:
        if row.run_id is None:
            continue
        client.set_tag(row.run_id, TRIAL_STATE_TAG, row.state)
        if row.state == "stopped":
            client.set_tag(row.run_id, STOPPED_AT_EPOCH_TAG, str(row.epochs))
        run = children[row.trial_id]
        if run.info.status == "RUNNING" or row.state != "completed":
            client.set_terminated(row.run_id, status=status[row.state])

    summary = TuneSummary(**summary_base, trials=rows)
    summary.epochs_total = sum(r.epochs for r in rows)
    candidates = [
        r
        for r in rows
        if r.state == "completed"
        and r.run_id
        and children[r.trial_id].data.tags.get(COMPLETED_TAG) == "true"
    ]
    summary.best = candidates[0] if candidates else None

    tracking.start_or_resume_run(uri, cfg.tracking.experiment, run_id=parent_id)
    with tempfile.TemporaryDirectory() as d:
        table = _write_table(rows, space, Path(d) / "trials.csv")
        mlflow.log_artifact(str(table))
        plot = _plot(rows, space, Path(d) / f"{space.metric}_vs_params.png")
        if plot is not None:
            mlflow.log_artifact(str(plot))
    counts = {s: sum(r.state == s for r in rows) for s in ("completed", "stopped", "error")}
    mlflow.log_metrics(
        {
            "trials_completed": counts["completed"],
            "trials_stopped": counts["stopped"],
            "trials_errored": counts["error"],
            "epochs_total": summary.epochs_total,
        }
    )
    if summary.best is not None and summary.best.best is not None:
        best = summary.best
        mlflow.log_metric(f"best_{space.metric}", best.best)
        if best.test_acc is not None:
            mlflow.log_metric("best_test_acc", best.test_acc)
        mlflow.set_tags(
            {
                BEST_TRIAL_TAG: best.trial_id,
                BEST_RUN_TAG: best.run_id or "",
                **{f"best.{k}": str(v) for k, v in best.params.items()},
            }
        )
        if cfg.registry.model_name and cfg.tracking.log_model:
            version = _register_best(cfg, best, summary_base)
            summary.model_version, summary.registered_name = str(version.version), version.name
            mlflow.set_tag(MODEL_VERSION_TAG, summary.model_version)
    if summary.best is None:
        log.warning("no trial completed its full budget: no model was registered")
    mlflow.set_tag(COMPLETED_TAG, "true")
    mlflow.end_run()
    return summary


def _register_best(cfg: PipelineConfig, best: TrialRow, summary_base: dict):
    from mlflow.tracking import MlflowClient

    from pipeline.registry import register_run_model

    version = register_run_model(cfg, best.run_id)
    client = MlflowClient(cfg.tracking.resolved_uri())
    for key, value in {
        SEARCH_TAG: summary_base["name"],
        TRIAL_TAG: best.trial_id,
        SEARCH_RUN_TAG: summary_base["parent_run_id"],
    }.items():
        client.set_model_version_tag(version.name, version.version, key, value)
    return version


def _write_table(rows: list[TrialRow], space: SearchSpace, path: Path) -> Path:
    import csv

    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "rank",
                "trial_id",
                "state",
                "epochs",
                f"best_{space.metric}",
                f"last_{space.metric}",
                "test_acc",
                *[p.path for p in space.params],
                "mlflow_run_id",
            ]
        )
        for i, r in enumerate(rows, 1):
            writer.writerow(
                [
                    i,
                    r.trial_id,
                    r.state,
                    r.epochs,
                    "" if r.best is None else f"{r.best:.6f}",
                    "" if r.last is None else f"{r.last:.6f}",
                    "" if r.test_acc is None else f"{r.test_acc:.6f}",
                    *[r.params.get(p.path) for p in space.params],
                    r.run_id or "",
                ]
            )
    return path


def _plot(rows: list[TrialRow], space: SearchSpace, path: Path) -> Path | None:
    """The metric (best over each trial's epochs) against each searched field, one panel each;
    colour says whether the trial finished, was stopped early or failed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r.best is not None]
    if not scored or not space.params:
        return None
    n = len(space.params)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    colours = {"completed": "tab:green", "stopped": "tab:orange", "error": "tab:red"}
    for ax, p in zip(axes[0], space.params, strict=True):
        categorical = p.kind in ("choice", "grid") and not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in p.values
        )
        labels = [str(v) for v in p.values]
        for state, colour in colours.items():
            pts = [r for r in scored if r.state == state]
            if not pts:
                continue
            xs = [
                labels.index(str(r.params[p.path])) if categorical else r.params[p.path]
                for r in pts
            ]
            ax.scatter(xs, [r.best for r in pts], c=colour, label=state, alpha=0.8)
        if categorical:
            ax.set_xticks(range(len(labels)), labels, rotation=20)
        if p.log_scale:
            ax.set_xscale("log")
        ax.set_xlabel(p.path)
        ax.set_ylabel(f"best {space.metric}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{space.metric} by trial")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_from_mlflow(cfg: PipelineConfig, summary_base: dict) -> TuneSummary:
    from mlflow.tracking import MlflowClient

    run = MlflowClient(cfg.tracking.resolved_uri()).get_run(summary_base["parent_run_id"])
    summary = TuneSummary(**summary_base)
    summary.model_version = run.data.tags.get(MODEL_VERSION_TAG)
    summary.registered_name = cfg.registry.model_name if summary.model_version else None
    summary.epochs_total = int(run.data.metrics.get("epochs_total", 0))
    best_id = run.data.tags.get(BEST_TRIAL_TAG)
    if best_id:
        summary.best = TrialRow(
            trial_id=best_id,
            state="completed",
            epochs=cfg.train.epochs,
            best=run.data.metrics.get(f"best_{summary.metric}"),
            last=None,
            params={
                k.removeprefix("best."): v
                for k, v in run.data.tags.items()
                if k.startswith("best.")
            },
            run_id=run.data.tags.get(BEST_RUN_TAG),
            test_acc=run.data.metrics.get("best_test_acc"),
        )
    return summary
