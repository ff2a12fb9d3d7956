"""`pipeline tune`: a Ray Tune search over any config field; every trial is a full training run.

A search space file (YAML) names config fields and a distribution for each:

    metric: val_acc            # a per-epoch metric; mode follows (…loss: min, else max)
    num_samples: 8
    space:
      train.lr: {loguniform: [0.01, 0.5]}
      train.label_smoothing: {uniform: [0.0, 0.3]}
      train.batch_size: {choice: [32, 64, 128]}
      model.dynamic.num_kernels: {randint: [2, 6]}   # upper bound excluded

The file is checked against the config schema before anything starts: an unknown field, a
distribution with bad bounds, or a value the config would refuse is an error naming the field.

Each trial follows the Train V2 pattern: a function that builds the same TorchTrainer as
`pipeline train` and fits it, with `TuneReportCallback` forwarding each epoch's metrics to Tune,
so a trial can itself be data-parallel. ASHA stops poor trials early (its time axis is epochs).
MLflow: one parent run per search and one nested child run per trial (the trial's training run
itself); at the end the parent holds the table of trials, a plot of the metric against each
hyperparameter, and the best trial's model is registered with tags naming the search and trial.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console

from pipeline import storage as st
from pipeline.config import PipelineConfig, deep_merge, flatten, format_validation_error
from pipeline.errors import ConfigError, TuneError
from pipeline.tags import (
    BEST_RUN_TAG,
    BEST_TRIAL_TAG,
    COMPLETED_TAG,
    CONFIG_ARTIFACT,
    EPOCH_METRICS,
    KIND_TAG,
    MODEL_VERSION_TAG,
    PARENT_RUN_TAG,
    SEARCH_RUN_TAG,
    SEARCH_TAG,
    STOPPED_AT_EPOCH_TAG,
    TRIAL_STATE_TAG,
    TRIAL_TAG,
)

# Metrics every epoch reports (pipeline/train/loop.py); the search optimises one of them.
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
# Fields a search must not vary: where runs are stored and logged, how they are resourced, and
# the epoch budget (ASHA's time axis).
FIXED_SECTIONS = ("run", "tracking", "registry", "storage", "scaling")
FIXED_FIELDS = ("train.epochs", "data.uri", "data.prepare")


# The trial function only waits on its TorchTrainer, whose workers hold the real resources; Tune
# refuses an empty request, hence a token share.
TRIAL_FN_CPU = 0.01


# ---------------------------------------------------------------------------------------------
# The search space file


class AshaSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_period: int = Field(1, ge=1)  # epochs every trial gets before it can be stopped
    reduction_factor: float = Field(3.0, gt=1)  # keep the top 1/rf at each rung
    brackets: int = Field(1, ge=1)


class SearchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    space: dict[str, Any]
    metric: str = "val_acc"
    mode: Literal["max", "min"] | None = None  # None: min for losses, else max
    num_samples: int = Field(8, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1)  # None: from the cluster's resources
    time_budget_s: float | None = Field(None, gt=0)
    search: Literal["random", "optuna"] = "random"
    scheduler: Literal["asha", "none"] = "asha"
    asha: AshaSettings = AshaSettings()
    seed: int = 0


@dataclass(frozen=True)
class Param:
    path: str  # a config field, e.g. train.lr
    kind: str  # one of DISTRIBUTIONS
    values: tuple[Any, ...]  # (low, high) or the choices

    def describe(self) -> str:
        return f"{self.kind}({', '.join(repr(v) for v in self.values)})"

    @property
    def log_scale(self) -> bool:
        return self.kind == "loguniform"

    def candidates(self) -> list[Any]:
        """Values whose validity stands for the whole range (the bounds, or every choice)."""
        if self.kind == "randint":
            return [self.values[0], self.values[1] - 1]
        return list(self.values)

    def domain(self):
        from ray import tune

        low_high = self.values
        return {
            "loguniform": lambda: tune.loguniform(*low_high),
            "uniform": lambda: tune.uniform(*low_high),
            "randint": lambda: tune.randint(*low_high),
            "choice": lambda: tune.choice(list(self.values)),
            "grid": lambda: tune.grid_search(list(self.values)),
        }[self.kind]()


@dataclass
class SearchSpace:
    source: str
    settings: SearchSettings
    params: list[Param]

    @property
    def mode(self) -> str:
        if self.settings.mode:
            return self.settings.mode
        return "min" if self.settings.metric.endswith("loss") else "max"

    @property
    def metric(self) -> str:
        return self.settings.metric

    def param_space(self) -> dict[str, Any]:
        return {p.path: p.domain() for p in self.params}

    def total_trials(self) -> int:
        grid = math.prod(len(p.values) for p in self.params if p.kind == "grid")
        return self.settings.num_samples * grid


def set_path(tree: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    node = tree
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> PipelineConfig:
    """The base config with a trial's sampled values set (flat dotted keys)."""
    update: dict[str, Any] = {}
    for path, value in params.items():
        set_path(update, path, value.item() if hasattr(value, "item") else value)
    return PipelineConfig.model_validate(deep_merge(base, update))


def _field_problem(path: str) -> str | None:
    """Why `path` is not a tunable leaf field of PipelineConfig, or None when it is."""
    if path in FIXED_FIELDS:
        return "is fixed for a search (every trial trains on the same data for train.epochs)"
    parts = path.split(".")
    if parts[0] in FIXED_SECTIONS:
        return (
            f"is in the {parts[0]!r} section, which a search does not vary: set it in the config "
            "(every trial is stored, tracked and resourced the same way)"
        )
    model: type[BaseModel] = PipelineConfig
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the config"
            return f"unknown config field ({where} has: {', '.join(fields)})"
        annotation = fields[part].annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if i < len(parts) - 1:
            if not is_section:
                return f"{'.'.join(parts[: i + 1])} is a value, not a section"
            model = annotation
        elif is_section:
            return f"is a section; name one of its fields ({', '.join(annotation.model_fields)})"
    return None


def _parse_param(path: str, spec: Any) -> tuple[Param | None, str | None]:
    if not isinstance(spec, dict) or len(spec) != 1:
        return None, f"expected one distribution, e.g. {{loguniform: [0.01, 0.5]}}; got {spec!r}"
    kind, values = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        return None, f"unknown distribution {kind!r} (use one of: {', '.join(DISTRIBUTIONS)})"
    if kind in ("choice", "grid"):
        if not isinstance(values, list) or not values:
            return None, f"{kind} needs a non-empty list of values"
        return Param(path, kind, tuple(values)), None
    if not isinstance(values, list) or len(values) != 2:
        return None, f"{kind} needs [low, high]; got {values!r}"
    low, high = values
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if not numbers:
        return None, f"{kind} bounds must be numbers; got {values!r}"
    if kind == "randint" and not all(isinstance(v, int) for v in values):
        return None, f"randint bounds must be integers; got {values!r}"
    if not low < high:
        return None, f"{kind} needs low < high; got [{low}, {high}]"
    if kind == "loguniform" and low <= 0:
        return None, f"loguniform needs low > 0; got {low}"
    return Param(path, kind, (low, high)), None


def parse_search_space(raw: Any, cfg: PipelineConfig, source: str = "search space") -> SearchSpace:
    """Validate a search space against the config schema; every problem is reported at once."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with a 'space' section")
    try:
        settings = SearchSettings.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    problems: list[str] = []
    if settings.metric not in EPOCH_METRICS:
        problems.append(
            f"metric: {settings.metric!r} is not a per-epoch metric "
            f"(use one of: {', '.join(EPOCH_METRICS)})"
        )
    if not settings.space:
        problems.append("space: empty; name at least one config field to search over")
    params: list[Param] = []
    base = cfg.to_dict()
    for path, spec in settings.space.items():
        where = f"space.{path}"
        problem = _field_problem(str(path))
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        param, problem = _parse_param(str(path), spec)
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        assert param is not None
        if param.kind == "grid" and settings.search == "optuna":
            problems.append(f"{where}: grid is not supported with search: optuna; use choice")
            continue
        for value in param.candidates():
            try:
                trial_config(base, {param.path: value})
            except ValidationError as err:
                msgs = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
                problems.append(f"{where}: the value {value!r} is not valid for the config: {msgs}")
                break
        else:
            params.append(param)
    if settings.scheduler == "asha" and settings.asha.grace_period > cfg.train.epochs:
        problems.append(
            f"asha.grace_period ({settings.asha.grace_period}) exceeds train.epochs "
            f"({cfg.train.epochs}), so no trial could be stopped early"
        )
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"{source}: {len(problems)} problem(s):\n{lines}")
    return SearchSpace(source, settings, params)


def load_search_space(path: str | Path, cfg: PipelineConfig) -> SearchSpace:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: search space file not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    return parse_search_space(raw, cfg, str(p))


# ---------------------------------------------------------------------------------------------
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
    from pipeline.train.trainer import build_trainer, open_mlflow_run

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
        callbacks=[TuneReportCallback(), _placement_group_recorder(trial_id)],
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error


# ---------------------------------------------------------------------------------------------
# Placement groups of stopped trials
#
# When ASHA stops a trial, Tune kills the trial's actor; the TorchTrainer controller it owns dies
# with it, but the placement group holding the trial's Train workers belongs to the job, so it
# stays reserved (ray-project/ray#54305). Ray Train's own PlacementGroupCleaner needs the State
# API (the dashboard), which a local `pipeline tune` does not start. So each trial records its
# worker group's placement group in the GCS key-value store, and the driver removes it once the
# trial has ended, whatever way it ended (a no-op when Ray Train already removed it).

_KV_NAMESPACE = "pipeline"


def _pg_key(trial_id: str) -> str:
    return f"tune/placement_group/{trial_id}"


def _placement_group_recorder(trial_id: str):
    """A Ray Train worker-group callback that records the group's placement group id."""
    from ray.experimental.internal_kv import _internal_kv_put
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class PlacementGroupRecorder(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group) -> None:
            handle = worker_group.get_worker_group_state().placement_group_handle
            pg_id = handle.placement_group.id.hex()
            _internal_kv_put(_pg_key(trial_id), pg_id, overwrite=True, namespace=_KV_NAMESPACE)

    return PlacementGroupRecorder()


def release_trial_placement_group(trial_id: str) -> bool:
    """Remove the placement group a finished trial's Train workers held; True if one was."""
    from ray._raylet import PlacementGroupID
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get
    from ray.util.placement_group import (
        PlacementGroup,
        placement_group_table,
        remove_placement_group,
    )

    raw = _internal_kv_get(_pg_key(trial_id), namespace=_KV_NAMESPACE)
    if not raw:
        return False
    _internal_kv_del(_pg_key(trial_id), namespace=_KV_NAMESPACE)
    pg = PlacementGroup(PlacementGroupID(bytes.fromhex(raw.decode())))
    if placement_group_table(pg).get("state") in (None, "REMOVED"):
        return False
    remove_placement_group(pg)
    return True


def _release_callback():
    """A Tune callback releasing each ended trial's Train placement group (see above)."""
    from ray.tune import Callback

    class ReleasePlacementGroups(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            release_trial_placement_group(trial.trial_id)

        def on_trial_error(self, iteration, trials, trial, **info):
            release_trial_placement_group(trial.trial_id)

    return ReleasePlacementGroups()


# ---------------------------------------------------------------------------------------------
# The live display (driver side)


def _short(params: dict[str, Any], space: SearchSpace) -> str:
    out = []
    for p in space.params:
        value = params.get(p.path)
        if isinstance(value, float):
            value = f"{value:.4g}"
        out.append(f"{p.path.split('.')[-1]}={value}")
    return " ".join(out)


def _display_callback(console: Console, space: SearchSpace, max_epochs: int):
    """A Tune callback printing one line per finished trial under a live status line."""
    from ray.tune import Callback

    class Display(_DisplayState, Callback):
        pass

    return Display(console, space, max_epochs)


class _DisplayState:
    """Counts of running / stopped / finished / errored trials and the best so far."""

    def __init__(self, console: Console, space: SearchSpace, max_epochs: int) -> None:
        self.space = space
        self.max_epochs = max_epochs
        self.sign = 1 if space.mode == "max" else -1
        self.running: set[str] = set()
        self.counts = {"finished": 0, "stopped": 0, "errored": 0}
        self.best: tuple[float, str, str] | None = None
        self.epochs: dict[str, int] = {}
        self._attach(console)

    def _attach(self, console: Console) -> None:
        from rich.live import Live

        self.console = console
        self.live = Live(console=console, transient=True, refresh_per_second=4)

    # Tune pickles its run config (callbacks included) with the experiment state; the console
    # and the live region hold locks and are not part of it.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("console", "live")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._attach(Console(stderr=True))

    def status(self) -> str:
        best = "-"
        if self.best:
            value, trial_id, params = self.best
            best = f"{self.space.metric} {value * self.sign:.4f} (trial {trial_id}: {params})"
        return (
            f"trials: {len(self.running)} running, {self.counts['stopped']} stopped early, "
            f"{self.counts['finished']} finished, {self.counts['errored']} errored | best {best}"
        )

    def _refresh(self) -> None:
        self.live.update(self.status())

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._refresh()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metric = self.space.metric
        if metric in result:
            value = self.sign * float(result[metric])
            if self.best is None or value > self.best[0]:
                self.best = (value, trial.trial_id, _short(trial.config, self.space))
        self.epochs[trial.trial_id] = int(result.get("epochs_done", 0))
        self._refresh()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        done = self.epochs.get(trial.trial_id, 0)
        finished = done >= self.max_epochs
        self.counts["finished" if finished else "stopped"] += 1
        last = (trial.last_result or {}).get(self.space.metric)
        shown = f"{last:.4f}" if isinstance(last, int | float) else "-"
        word = "finished" if finished else f"stopped early after {done} epoch(s)"
        self.console.print(
            f"trial {trial.trial_id} {word}: {self.space.metric} {shown}  "
            f"({_short(trial.config, self.space)})",
            highlight=False,
        )
        self._refresh()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.counts["errored"] += 1
        self.console.print(
            f"trial {trial.trial_id} failed ({_short(trial.config, self.space)})", highlight=False
        )
        self._refresh()


# ---------------------------------------------------------------------------------------------
# The search


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
        from pipeline.train.trainer import run_link

        return run_link(self.tracking_uri, self.experiment_id, self.parent_run_id)


def _concurrency(cfg: PipelineConfig, space: SearchSpace, console: Console) -> int:
    """Trials at once: as many training runs as the cluster's CPUs (GPUs) hold side by side with
    one CPU left for Ray Data, or fewer if asked. More would never start, or would leave Ray Data
    no CPU to read with, and the search would hang."""
    import ray

    resources = ray.cluster_resources()
    per_trial_cpu = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + TRIAL_FN_CPU
    fits = int((resources.get("CPU", 1) - 1) // per_trial_cpu)
    if cfg.scaling.use_gpu:
        per_trial_gpu = cfg.scaling.num_workers * cfg.scaling.gpus_per_worker
        fits = min(fits, int(resources.get("GPU", 0) // per_trial_gpu)) if per_trial_gpu else fits
    fits = max(1, fits)
    wanted = space.settings.max_concurrent_trials
    if wanted and wanted > fits:
        console.print(
            f"[yellow]note:[/] max_concurrent_trials={wanted} lowered to {fits}: the cluster has "
            f"{resources.get('CPU', 0):g} CPUs, each trial's workers take {per_trial_cpu:g} and "
            "Ray Data needs one more",
            highlight=False,
        )
    return min(wanted or fits, fits, space.total_trials())


def _open_parent(cfg, name: str, space: SearchSpace, manifest) -> tuple[str, str, bool]:
    from pipeline.train.trainer import open_mlflow_run

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
            CONFIG_ARTIFACT: cfg.to_yaml(),
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
    console: Console | None = None,
) -> TuneSummary:
    from pipeline.train.trainer import preflight

    console = console or Console(stderr=True)
    started = time.time()
    cfg = cfg.with_absolute_paths()
    manifest = preflight(cfg, console)
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
        console.print(
            f"search {name!r} already finished (MLflow run {parent_id}); nothing to do. "
            "Use a new --name to search again."
        )
        return _summary_from_mlflow(cfg, summary_base)

    try:
        summary = _search(cfg, space, manifest, summary_base, console)
    except BaseException:
        _fail_parent(cfg, parent_id)
        raise
    summary.seconds = time.time() - started
    return summary


def _search(cfg, space: SearchSpace, manifest, summary_base: dict, console: Console):
    import ray
    from ray import tune

    from pipeline.train.ray_runtime import init_ray

    name, parent_id = summary_base["name"], summary_base["parent_run_id"]
    wanted = space.settings.max_concurrent_trials or 1
    init_ray(cfg, concurrent_runs=wanted, extra_cpus=wanted * TRIAL_FN_CPU)
    concurrency = _concurrency(cfg, space, console)
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
    display = _display_callback(console, space, cfg.train.epochs)
    run_config = tune.RunConfig(
        name=name,
        storage_path=storage.path,
        storage_filesystem=storage.fs,
        callbacks=[_release_callback(), display],
        verbose=0,
        failure_config=tune.FailureConfig(max_failures=max(cfg.run.max_failures, 0)),
    )
    experiment_path = os.path.join(storage.path, name)
    restoring = tune.Tuner.can_restore(experiment_path, storage_filesystem=storage.fs)
    if restoring:
        console.print(f"resuming search {name!r} from {storage.uri.rstrip('/')}/{name}")
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
    console.print(
        f"searching {len(space.params)} field(s) of {cfg.model.name} on {manifest.name}: "
        f"{space.total_trials()} trial(s), {concurrency} at a time, "
        f"{cfg.scaling.num_workers} worker(s) each, {space.settings.scheduler} scheduler; "
        f"search {name!r}"
    )
    with display.live:
        try:
            grid = tuner.fit()
        except (ray.exceptions.RayError, tune.TuneError) as exc:
            raise TuneError(f"search {name!r} failed: {exc}") from exc
    # Ctrl-C (SIGINT) makes Tune save its state and return early: trials unfinished, or not
    # yet sampled (only a time budget may legitimately end a search short of its samples).
    trials = grid._experiment_analysis.trials
    unfinished = sum(t.status not in ("TERMINATED", "ERROR") for t in trials)
    unsampled = space.total_trials() - len(trials)
    if unfinished or (unsampled > 0 and not space.settings.time_budget_s):
        raise TuneError(
            f"search {name!r} was interrupted with {unfinished + max(unsampled, 0)} trial(s) "
            f"unfinished; its state is saved in {storage.uri.rstrip('/')}/{name}: run the same "
            "command (same --name) to resume it"
        )
    return _finish(cfg, space, grid, summary_base, console)


def _fail_parent(cfg: PipelineConfig, parent_id: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(cfg.tracking.resolved_uri()).set_terminated(parent_id, status="FAILED")


# ---------------------------------------------------------------------------------------------
# After the search: states, the table, the plot, the best model


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
                params={p.path: result.config.get(p.path) for p in space.params},
                run_id=child.info.run_id if child else None,
                test_acc=child.data.metrics.get("test_acc") if child else None,
                error=str(result.error).strip().splitlines()[-1] if result.error else None,
            )
        )
    sign = 1 if space.mode == "max" else -1
    rows.sort(key=lambda r: (r.best is None, -sign * (r.best or 0.0)))
    return rows


def _finish(cfg, space: SearchSpace, grid, summary_base: dict, console: Console) -> TuneSummary:
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
        console.print("[yellow]no trial completed its full budget: no model was registered[/]")
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


def _summary_from_mlflow(cfg: PipelineConfig, summary_base: dict) -> TuneSummary:
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
