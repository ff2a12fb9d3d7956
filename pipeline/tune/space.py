"""The search space file of `pipeline tune`: which config fields a search varies, and how.

A search space file (YAML) names config fields and a distribution for each:

    metric: val_acc            # a per-epoch metric; mode follows (...loss: min, else max)
    num_samples: 8
    space:
      train.lr: {loguniform: [0.01, 0.5]}
      train.label_smoothing: {uniform: [0.0, 0.3]}
      train.batch_size: {choice: [32, 64, 128]}
      model.dynamic.num_kernels: {randint: [2, 6]}   # upper bound excluded

The file is checked against the config schema before anything starts: an unknown field, a
distribution with bad bounds, or a value the config would refuse is an error naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.config import PipelineConfig, deep_merge, format_validation_error
from pipeline.errors import ConfigError
from pipeline.tags import EPOCH_METRICS

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
# Fields a search must not vary: where runs are stored and logged, how they are resourced, and
# the epoch budget (ASHA's time axis).
FIXED_SECTIONS = ("run", "tracking", "registry", "storage", "scaling")
FIXED_FIELDS = ("train.epochs", "data.uri", "data.prepare")


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
