"""`pipeline tune`: hyperparameter search with Ray Tune, every trial a full training run.

| module | what |
|---|---|
| `space` | the search space file: settings, distributions, validation against the config schema |
| `search` | the trial function, concurrency, searcher and scheduler, `run_tune`, progress events |
| `results` | after the search: trial states, table and plot on the parent run, the best model |
"""

from pipeline.tune.results import TrialRow, TuneSummary
from pipeline.tune.search import run_tune
from pipeline.tune.space import (
    SearchSettings,
    SearchSpace,
    load_search_space,
    parse_search_space,
    trial_config,
)

__all__ = [
    "SearchSettings",
    "SearchSpace",
    "TrialRow",
    "TuneSummary",
    "load_search_space",
    "parse_search_space",
    "run_tune",
    "trial_config",
]
