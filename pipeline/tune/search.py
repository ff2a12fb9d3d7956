"""`pipeline tune`: a Ray Tune search over any config field; every trial is a full training run.

Each trial follows the Train V2 pattern: a function that builds the same TorchTrainer as
`pipeline train` and fits it, with `TuneReportCallback` forwarding each epoch's metrics to Tune,
so a trial can itself be data-parallel. ASHA stops poor trials early (its time axis is epochs).
MLflow: one parent run per search and one nested child run per trial (the trial's training run
itself); at the end the parent holds the table of trials, a plot of the metric against each
hyperparameter, and the best trial's model is registered with tags naming the search and trial
(`pipeline.tune.results`).
"""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime
from typing import Any

import yaml

from pipeline import storage as st
from pipeline.config import PipelineConfig, flatten
from pipeline.errors import TuneError
from pipeline.events import EventSink, TrialUpdate, ignore
from pipeline.ray_compat import (
    placement_group_recorder,
    release_recorded_placement_group,
    tuner_trials,
)
from pipeline.tags import CONFIG_ARTIFACT, KIND_TAG, PARENT_RUN_TAG, SEARCH_TAG, TRIAL_TAG
from pipeline.tracking import config_yaml_for_mlflow
from pipeline.tune.results import TuneSummary, finish_search, summary_from_mlflow
from pipeline.tune.space import SearchSpace, trial_config

log = logging.getLogger(__name__)

# The trial function only waits on its TorchTrainer, whose workers hold the real resources; Tune
# refuses an empty request, hence a token share.
TRIAL_FN_CPU = 0.01


# One trial (runs in a Tune trial actor)


def _run_trial(
    params: dict[str, Any],
    *,
    base: dict[str, Any],
    manifest: dict[str, Any],
    search: str,
    parent_run_id: str,
) -> None:
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.data.shards import Manifest
    from pipeline.tracking import open_mlflow_run
    from pipeline.train.trainer import build_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(base, params)
    man = Manifest.model_validate(manifest)
    run_name = f"{search}-{trial_id}"
    tags = {
        PARENT_RUN_TAG: parent_run_id,
        SEARCH_TAG: search,
        TRIAL_TAG: trial_id,
        KIND_TAG: "trial",
    }
    run_id, _, completed = open_mlflow_run(cfg, run_name, man, tags=tags)
    if completed:  # a restored search re-ran a trial that had finished: nothing left to do
        return
    trainer = build_trainer(
        cfg,
        man,
        run_name,
        run_id,
        callbacks=[TuneReportCallback(), placement_group_recorder(trial_id)],
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error


def _release_callback():
    """A Tune callback releasing each ended trial's Train placement group (ray-project/ray#54305:
    see `pipeline.ray_compat`)."""
    from ray.tune import Callback

    class ReleasePlacementGroups(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            release_recorded_placement_group(trial.trial_id)

        def on_trial_error(self, iteration, trials, trial, **info):
            release_recorded_placement_group(trial.trial_id)

    return ReleasePlacementGroups()


def _short(params: dict[str, Any], space: SearchSpace) -> str:
    out = []
    for p in space.params:
        value = params.get(p.path)
        if isinstance(value, float):
            value = f"{value:.4g}"
        out.append(f"{p.path.split('.')[-1]}={value}")
    return " ".join(out)


def _progress_callback(on_event: EventSink, space: SearchSpace, max_epochs: int):
    """A Tune callback that turns trial events into `TrialUpdate`s for `on_event`."""
    from ray.tune import Callback

    class Progress(SearchProgress, Callback):
        pass

    return Progress(on_event, space, max_epochs)


class SearchProgress:
    """Counts of running / stopped / finished / errored trials and the best so far; every trial
    event sends the caller a `TrialUpdate` (the status, plus a line for a trial that ended)."""

    def __init__(self, on_event: EventSink, space: SearchSpace, max_epochs: int) -> None:
        self.on_event = on_event
        self.space = space
        self.max_epochs = max_epochs
        self.sign = 1 if space.mode == "max" else -1
        self.running: set[str] = set()
        self.counts = {"finished": 0, "stopped": 0, "errored": 0}
        self.best: tuple[float, str, str] | None = None
        self.epochs: dict[str, int] = {}

    # Tune pickles its run config (callbacks included) with the experiment state; the caller's
    # sink (a live display holding locks) is not part of it.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "on_event"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.on_event = ignore

    def status(self) -> str:
        best = "-"
        if self.best:
            value, trial_id, params = self.best
            best = f"{self.space.metric} {value * self.sign:.4f} (trial {trial_id}: {params})"
        return (
            f"trials: {len(self.running)} running, {self.counts['stopped']} stopped early, "
            f"{self.counts['finished']} finished, {self.counts['errored']} errored | best {best}"
        )

    def _send(self, line: str | None = None) -> None:
        self.on_event(TrialUpdate(self.status(), line))

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._send()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metric = self.space.metric
        if metric in result:
            value = self.sign * float(result[metric])
            if self.best is None or value > self.best[0]:
                self.best = (value, trial.trial_id, _short(trial.config, self.space))
        self.epochs[trial.trial_id] = int(result.get("epochs_done", 0))
        self._send()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        done = self.epochs.get(trial.trial_id, 0)
        finished = done >= self.max_epochs
        self.counts["finished" if finished else "stopped"] += 1
        last = (trial.last_result or {}).get(self.space.metric)
        shown = f"{last:.4f}" if isinstance(last, int | float) else "-"
        word = "finished" if finished else f"stopped early after {done} epoch(s)"
        self._send(
            f"trial {trial.trial_id} {word}: {self.space.metric} {shown}  "
            f"({_short(trial.config, self.space)})"
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.counts["errored"] += 1
        self._send(f"trial {trial.trial_id} failed ({_short(trial.config, self.space)})")


def _concurrency(cfg: PipelineConfig, space: SearchSpace) -> int:
    """Trials at once: as many training runs as the cluster holds side by side with
    `scaling.data_cpus` left for Ray Data (`pipeline.train.resources`, the rule every run is
    checked by), or fewer if asked. More would never start, or would leave Ray Data no CPU to
    read with, and the search would hang."""
    from pipeline.train.resources import FIXES, Cluster, Needs, problems, runs_that_fit

    needs = Needs.of(cfg, extra_cpus=TRIAL_FN_CPU)
    cluster = Cluster.now()
    fits = runs_that_fit(needs, cluster)
    if fits < 1:
        if not cfg.scaling.autoscaling:
            raise TuneError(
                f"one trial does not fit the Ray cluster: {'; '.join(problems(needs, cluster))}. "
                f"Fix: {FIXES}"
            )
        fits = 1  # the autoscaler adds nodes for it
    wanted = space.settings.max_concurrent_trials
    if wanted and wanted > fits:
        log.warning(
            "max_concurrent_trials=%d lowered to %d: the cluster has %g CPUs, each trial's "
            "workers take %g and Ray Data needs %g more",
            wanted,
            fits,
            cluster.cpus,
            needs.workers * needs.cpus_per_worker + needs.extra_cpus,
            needs.data_cpus,
        )
    return min(wanted or fits, fits, space.total_trials())


def _open_parent(cfg, name: str, space: SearchSpace, manifest) -> tuple[str, str, bool]:
    from pipeline.tracking import open_mlflow_run

    # The base config, with each searched field shown as its distribution.
    params = flatten(cfg.to_dict())
    params.update({p.path: p.describe() for p in space.params})
    s = space.settings
    params.update(
        {
            "tune.metric": space.metric,
            "tune.mode": space.mode,
            "tune.num_samples": s.num_samples,
            "tune.search": s.search,
            "tune.scheduler": s.scheduler,
            "tune.seed": s.seed,
            "tune.time_budget_s": s.time_budget_s,
            "tune.max_concurrent_trials": s.max_concurrent_trials,
        }
    )
    if s.scheduler == "asha":
        params["tune.asha.grace_period"] = s.asha.grace_period
        params["tune.asha.reduction_factor"] = s.asha.reduction_factor
    return open_mlflow_run(
        cfg,
        name,
        manifest,
        tags={KIND_TAG: "tune", SEARCH_TAG: name},
        params=params,
        texts={
            "space.yaml": yaml.safe_dump(s.model_dump(), sort_keys=False),
            CONFIG_ARTIFACT: config_yaml_for_mlflow(cfg.to_yaml()),
        },
    )


def _searcher(space: SearchSpace, concurrency: int):
    s = space.settings
    if s.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=s.seed), max_concurrent=concurrency)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=s.seed, max_concurrent=concurrency)


def _scheduler(space: SearchSpace, max_epochs: int):
    if space.settings.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    a = space.settings.asha
    return ASHAScheduler(
        time_attr="epochs_done",
        max_t=max_epochs,
        grace_period=a.grace_period,
        reduction_factor=a.reduction_factor,
        brackets=a.brackets,
        # ASHA would otherwise stop a trial at its last report (epochs_done == max_t), killing it
        # before it evaluates the test split and logs its model.
        stop_last_trials=False,
    )


def run_tune(
    cfg: PipelineConfig,
    space: SearchSpace,
    name: str | None = None,
    on_event: EventSink | None = None,
) -> TuneSummary:
    """Run the search (or resume it: same name) and return its summary. `on_event` receives a
    `TrialUpdate` whenever a trial starts, reports, finishes, is stopped or fails."""
    from pipeline.train.trainer import preflight

    started = time.time()
    cfg = cfg.with_absolute_paths()
    manifest = preflight(cfg)
    name = (
        name or cfg.run.name or f"{cfg.tracking.experiment}-tune-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    )
    parent_id, experiment_id, completed = _open_parent(cfg, name, space, manifest)
    summary_base = {
        "name": name,
        "parent_run_id": parent_id,
        "experiment_id": experiment_id,
        "tracking_uri": cfg.tracking.resolved_uri(),
        "metric": space.metric,
        "mode": space.mode,
    }
    if completed:
        log.info(
            "search %r already finished (MLflow run %s); nothing to do. Use a new --name to "
            "search again.",
            name,
            parent_id,
        )
        return summary_from_mlflow(cfg, summary_base)

    try:
        summary = _search(cfg, space, manifest, summary_base, on_event or ignore)
    except BaseException:
        _fail_parent(cfg, parent_id)
        raise
    summary.seconds = time.time() - started
    return summary


def _search(cfg, space: SearchSpace, manifest, summary_base: dict, on_event: EventSink):
    import ray
    from ray import tune

    from pipeline.train.ray_runtime import init_ray

    name, parent_id = summary_base["name"], summary_base["parent_run_id"]
    wanted = space.settings.max_concurrent_trials or 1
    init_ray(cfg, concurrent_runs=wanted, extra_cpus=wanted * TRIAL_FN_CPU)
    concurrency = _concurrency(cfg, space)
    storage = st.resolve(cfg.run.storage_path, cfg.storage)
    if storage.is_s3:
        st.check_bucket(storage.uri, cfg.storage)
    trainable = tune.with_resources(
        tune.with_parameters(
            _run_trial,
            base=cfg.to_dict(),
            manifest=manifest.model_dump(mode="json"),
            search=name,
            parent_run_id=parent_id,
        ),
        {"CPU": TRIAL_FN_CPU},
    )
    # Tune's own console reporter (tables, a banner) would talk over the live display.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    progress = _progress_callback(on_event, space, cfg.train.epochs)
    run_config = tune.RunConfig(
        name=name,
        storage_path=storage.path,
        storage_filesystem=storage.fs,
        callbacks=[_release_callback(), progress],
        verbose=0,
        failure_config=tune.FailureConfig(max_failures=max(cfg.run.max_failures, 0)),
    )
    experiment_path = os.path.join(storage.path, name)
    restoring = tune.Tuner.can_restore(experiment_path, storage_filesystem=storage.fs)
    if restoring:
        log.info("resuming search %r from %s/%s", name, storage.uri.rstrip("/"), name)
        tuner = tune.Tuner.restore(
            experiment_path,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=storage.fs,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space.param_space(),
            tune_config=tune.TuneConfig(
                metric=space.metric,
                mode=space.mode,
                search_alg=_searcher(space, concurrency),
                scheduler=_scheduler(space, cfg.train.epochs),
                num_samples=space.settings.num_samples,  # concurrency: in the searcher
                time_budget_s=space.settings.time_budget_s,
                trial_dirname_creator=lambda trial: trial.trial_id,
            ),
            run_config=run_config,
        )
    log.info(
        "searching %d field(s) of %s on %s: %d trial(s), %d at a time, %d worker(s) each, "
        "%s scheduler; search %r",
        len(space.params),
        cfg.model.name,
        manifest.name,
        space.total_trials(),
        concurrency,
        cfg.scaling.num_workers,
        space.settings.scheduler,
        name,
    )
    try:
        grid = tuner.fit()
    except (ray.exceptions.RayError, tune.TuneError) as exc:
        raise TuneError(f"search {name!r} failed: {exc}") from exc
    # Ctrl-C (SIGINT) makes Tune save its state and return early: trials unfinished, or not
    # yet sampled (only a time budget may legitimately end a search short of its samples).
    trials = tuner_trials(grid)
    budget = bool(space.settings.time_budget_s)
    unfinished = sum(not _finished(t, budget) for t in trials)
    unsampled = space.total_trials() - len(trials)
    if unfinished or (unsampled > 0 and not space.settings.time_budget_s):
        raise TuneError(
            f"search {name!r} was interrupted with {unfinished + max(unsampled, 0)} trial(s) "
            f"unfinished; its state is saved in {storage.uri.rstrip('/')}/{name}: run the same "
            "command (same --name) to resume it"
        )
    return finish_search(cfg, space, grid, summary_base)


def _finished(trial: Any, time_budget: bool = False) -> bool:
    """Whether a trial of a returned `Tuner.fit()` ended (completed, stopped early or failed).
    A trial Ctrl-C caught while it started comes back TERMINATED with nothing reported; Tune's
    saved state (written before it stops the trials) still has it pending, so a restore runs
    it: unfinished. (Under a time budget, the budget may have ended it: finished.)"""
    if trial.status == "ERROR" or (trial.status == "TERMINATED" and time_budget):
        return True
    # (`last_result` is never empty: Tune fills in its own fields; ours come with a report)
    return trial.status == "TERMINATED" and "epochs_done" in trial.last_result


def _fail_parent(cfg: PipelineConfig, parent_id: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(cfg.tracking.resolved_uri()).set_terminated(parent_id, status="FAILED")
