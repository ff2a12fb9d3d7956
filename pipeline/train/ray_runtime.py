"""Starting or joining Ray for a training run, importable without torch.

`init_ray` connects to the cluster in scaling.ray_address / RAY_ADDRESS or starts a local Ray sized
for the run, with the settings a small machine needs (see the comments inside).

`start_local_ray` begins a local Ray on a background thread once the config and the dataset
check out, so its dozen daemons and prestarted workers come up while the driver imports torch and
MLflow, checks the model and the tracking server and opens the MLflow run (the first step comes
about 1.3 s earlier on 2 cores). The next `init_ray` waits for it. The thread stays parked for
the life of the process: Ray starts its daemons with PR_SET_PDEATHSIG, so they would die with the
thread that started them.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
from typing import Any

from pipeline.config import PipelineConfig

_early: EarlyStart | None = None


class EarlyStart:
    """A local `ray.init` running on a parked background thread."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self._done = threading.Event()
        self._error: BaseException | None = None
        self.started = False  # this thread's ray.init ran (a Ray already up is not ours)
        self._thread = threading.Thread(
            target=self._run, args=(cfg,), name="pipeline-ray-start", daemon=True
        )

    def _run(self, cfg: PipelineConfig) -> None:
        try:
            self.started = _init_ray(cfg)
        except BaseException as exc:
            self._error = exc
            self._done.set()
            return
        self._done.set()
        threading.Event().wait()  # park: Ray's daemons live as long as this thread

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the start finished (True) or `timeout` passed (False); re-raise a failed
        start's error here."""
        if not self._done.wait(timeout):
            return False
        if self._error is not None:
            raise self._error
        return True


def start_local_ray(cfg: PipelineConfig) -> EarlyStart | None:
    """Begin starting the local Ray for `cfg` in the background; None (nothing started) when the
    run joins a cluster (scaling.ray_address / RAY_ADDRESS) or a start is already under way."""
    global _early
    if cfg.scaling.ray_address or os.environ.get("RAY_ADDRESS") or _early is not None:
        return None
    ray = sys.modules.get("ray")  # not imported: not started (the import is what runs early)
    if ray is not None and ray.is_initialized():  # a Ray this process already has is used
        return None
    # ray.init sets this SIGTERM handler only when called on the main thread, and warns otherwise.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    logging.getLogger("ray._private.worker").addFilter(_NOT_MAIN_THREAD_WARNING)  # no-op if present
    early = _early = EarlyStart(cfg)
    early._thread.start()
    return early


def stop_early_ray(timeout: float = 120.0) -> None:
    """After an error before training: let a background start finish, then stop that Ray, so a
    failed command leaves no daemons starting behind it. A Ray the start found already running
    (a caller's, a test session's) is not ours to stop."""
    global _early
    early, _early = _early, None
    if early is None:
        return
    try:
        finished = early.wait(timeout)
    except BaseException:
        return
    if finished and early.started:
        import ray

        ray.shutdown()


class _NotMainThreadWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


_NOT_MAIN_THREAD_WARNING = _NotMainThreadWarning()


def init_ray(cfg: PipelineConfig, concurrent_runs: int = 1, extra_cpus: float = 0.0) -> None:
    """Connect to the cluster in scaling.ray_address / RAY_ADDRESS, or start a local Ray sized
    for `concurrent_runs` training runs of this config side by side (Tune trials), plus
    `extra_cpus` held by other actors (Tune's trial functions)."""
    global _early
    if _early is not None:  # `start_local_ray` began it: use that start (or raise its error)
        early, _early = _early, None
        early.wait()
    _init_ray(cfg, concurrent_runs, extra_cpus)


def _init_ray(cfg: PipelineConfig, concurrent_runs: int = 1, extra_cpus: float = 0.0) -> bool:
    """`init_ray`'s work; False when Ray was already initialised in this process (nothing
    done), True when this call connected or started it."""
    import ray
    import ray.data

    if ray.is_initialized():
        return False
    address = cfg.scaling.ray_address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {
        "log_to_driver": False,  # the live display replaces the workers' log stream
        "logging_level": logging.WARNING,
        "include_dashboard": False,
        "configure_logging": True,
    }
    # A notice at every start that token auth is on (it stays on): not news to a user.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
    # Train V2's controller polls the workers every 2 s by default, and a worker's report blocks
    # while its previous one is still unread (a queue of one): epochs shorter than the interval
    # then take the interval (0.5 s of training per 2 s on digits). Train propagates this
    # variable from the driver to the controller, on a local Ray and on a cluster.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if address:
        ray.init(address=address, **kwargs)
    else:
        workers = concurrent_runs * cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
        # Ray Data's read and map tasks need a whole free CPU slot beside the training workers.
        held = math.ceil(workers + extra_cpus)
        data = math.ceil(cfg.scaling.data_cpus)
        num_cpus = cfg.scaling.num_cpus or max(os.cpu_count() or 1, held + data)
        # Train workers, Ray Data tasks and the coordinating actors start together; the local
        # raylet's default start-up concurrency (= CPUs) warns about it on every run.
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(4 * num_cpus))
        # Starting a worker group's processes takes well over Ray Train's 60 s default when a
        # few trials start at once on two busy cores; a timeout only retries the same start.
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
        # Start-up is CPU-bound on a small machine: every Ray process costs about a CPU-second
        # before it does anything, so skip the ones a single-node run has no use for. The
        # preemption watcher reacts to a node being drained; this node is the whole cluster.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray Data's Parquet reader V2 starts 4 FooterReader actors per read to learn what the
        # manifest already says (files, rows): ~7 s on the way to the first step for our few
        # shards. V1 reads the footers in its read task. The environment carries the choice to
        # Tune's trial processes, which build their own datasets.
        os.environ.setdefault("RAY_DATA_USE_DATASOURCE_V2", "0")
        ray.init(num_cpus=num_cpus, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Read as Ray reads it (ray_constants.env_bool): "1"/"true" mean V2.
    ctx.use_datasource_v2 = os.environ.get("RAY_DATA_USE_DATASOURCE_V2", "0").lower() in (
        "1",
        "true",
    )
    # V1 logs its read-size estimates at INFO on the driver, under the live display.
    logging.getLogger("ray.data._internal.datasource.parquet_datasource").setLevel(logging.WARNING)
    return True
