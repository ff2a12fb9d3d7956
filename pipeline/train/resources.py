"""What a training run needs from a Ray cluster, checked against what the cluster has, before
anything is started.

A run needs `num_workers x (cpus_per_worker, gpus_per_worker)` for its Train workers, each on one
node, plus `scaling.data_cpus` free CPUs for Ray Data's read and decode tasks. On a fixed-size
cluster that cannot hold it, the run would wait forever (Ray Data's "Cluster resources are not
enough to run any task" goes to a log file the user never sees): this refuses it instead, naming
the numbers and the fix. On an autoscaling cluster it says what will be requested.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from pipeline.config import PipelineConfig
from pipeline.errors import TrainingError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Needs:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    data_cpus: float
    extra_cpus: float = 0.0  # other actors of the same job (Tune's trial functions)

    @classmethod
    def of(cls, cfg: PipelineConfig, extra_cpus: float = 0.0) -> Needs:
        s = cfg.scaling
        return cls(
            s.num_workers,
            s.cpus_per_worker,
            s.gpus_per_worker if s.use_gpu else 0.0,
            s.data_cpus,
            extra_cpus,
        )

    @property
    def cpus(self) -> float:
        return self.workers * self.cpus_per_worker + self.data_cpus + self.extra_cpus

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker

    def explain_cpus(self) -> str:
        extra = f" + {self.extra_cpus:g} for the search" if self.extra_cpus else ""
        return (
            f"{self.cpus:g} CPUs: {self.workers} worker(s) x {self.cpus_per_worker:g} + "
            f"{self.data_cpus:g} for data (scaling.data_cpus){extra}"
        )


@dataclass(frozen=True)
class Cluster:
    cpus: float
    gpus: float
    largest_node_cpus: float
    largest_node_gpus: float

    @classmethod
    def now(cls) -> Cluster:
        import ray

        total = ray.cluster_resources()
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        return cls(
            cpus=float(total.get("CPU", 0)),
            gpus=float(total.get("GPU", 0)),
            largest_node_cpus=max((float(n.get("CPU", 0)) for n in nodes), default=0.0),
            largest_node_gpus=max((float(n.get("GPU", 0)) for n in nodes), default=0.0),
        )


def problems(needs: Needs, cluster: Cluster) -> list[str]:
    """What the cluster lacks for one run, each with its numbers; empty when it fits."""
    found = []
    if needs.cpus > cluster.cpus:
        found.append(f"needs {needs.explain_cpus()}; the cluster has {cluster.cpus:g}")
    if needs.cpus_per_worker > cluster.largest_node_cpus:
        found.append(
            f"each worker needs {needs.cpus_per_worker:g} CPUs on one node; the largest node "
            f"has {cluster.largest_node_cpus:g}"
        )
    if needs.gpus > cluster.gpus:
        found.append(
            f"needs {needs.gpus:g} GPUs: {needs.workers} worker(s) x {needs.gpus_per_worker:g}; "
            f"the cluster has {cluster.gpus:g}"
        )
    if needs.gpus_per_worker > cluster.largest_node_gpus and needs.gpus_per_worker > 0:
        found.append(
            f"each worker needs {needs.gpus_per_worker:g} GPUs on one node; the largest node "
            f"has {cluster.largest_node_gpus:g}"
        )
    return found


def runs_that_fit(needs: Needs, cluster: Cluster) -> int:
    """How many runs of `needs` the cluster holds side by side (Tune's concurrency), with the
    data CPUs left once: the runs' Ray Data tasks share them."""
    per_run = needs.workers * needs.cpus_per_worker + needs.extra_cpus
    fits = int((cluster.cpus - needs.data_cpus) // per_run) if per_run else 0
    if needs.gpus:
        fits = min(fits, int(cluster.gpus // needs.gpus))
    return max(fits, 0)


FIXES = (
    "use fewer scaling.num_workers or less scaling.cpus_per_worker / gpus_per_worker, give the "
    "cluster more (`ray start --num-cpus N` on each node, or more nodes), or set "
    "scaling.autoscaling: true on a cluster that grows"
)


def check_cluster(cfg: PipelineConfig, extra_cpus: float = 0.0) -> Needs:
    """Refuse (TrainingError) a run the connected cluster cannot hold; on an autoscaling cluster
    log what will be requested instead. Call after `ray.init`, before any trainer starts."""
    needs = Needs.of(cfg, extra_cpus)
    cluster = Cluster.now()
    missing = problems(needs, cluster)
    if not missing:
        return needs
    if cfg.scaling.autoscaling:
        log.warning(
            "the cluster is smaller than this run (%s); the autoscaler will be asked for "
            "%s and %g GPUs",
            "; ".join(missing),
            math.ceil(needs.cpus),
            needs.gpus,
        )
        return needs
    raise TrainingError(
        f"this run does not fit the Ray cluster: {'; '.join(missing)}. Fix: {FIXES}"
    )
