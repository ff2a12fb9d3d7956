"""The function Ray Train runs on each worker, and what it is given, in a module that imports
nothing heavy.

Train V2's controller actor unpickles the training function and its `LoopConfig` along with the
trainer, and unpickling imports their modules. `pipeline.train.loop` imports torch, torchvision
and the model zoo (about 3 CPU-seconds); the controller never runs the loop, so it should not pay
for it on the way to the first training step. The workers import the loop here, on first call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline import storage as st

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig, StorageConfig
    from pipeline.data.shards import Manifest
    from pipeline.train.callbacks import LoopCallback


@dataclass(frozen=True)
class DatasetHandle:
    """A dataset resolved once at the start of a run: its filesystem and root path, and its
    checked manifest. Everything after the pre-flight check reads shards through it."""

    root: st.Location
    manifest: Manifest

    @classmethod
    def resolve(
        cls, uri: str, manifest: Manifest, storage: StorageConfig | None = None
    ) -> DatasetHandle:
        return cls(st.resolve(uri, storage), manifest)

    @property
    def uri(self) -> str:
        return self.root.uri

    def split_paths(self, split: str) -> list[str]:
        """Paths of a split's shards inside `root.fs` (for Ray Data or pyarrow)."""
        return [self.root.join(p).path for p in self.manifest.shard_paths(split)]


@dataclass
class LoopConfig:
    """Everything one training run's workers get (picklable; Ray ships it to each worker)."""

    config: PipelineConfig
    dataset: DatasetHandle
    mlflow_run_id: str | None = None  # the run `open_mlflow_run` made; a checkpoint's wins
    progress: Any = None  # a ray.util.queue.Queue that rank 0 feeds for the live display
    cache: bool = False  # workers keep their decoded shards (see trainer.cache_in_workers)
    started_at: float = field(default_factory=time.time)  # when the command started
    startup: dict[str, float] = field(default_factory=dict)  # driver-side start-up timeline
    callbacks: list[LoopCallback] = field(default_factory=list)  # see pipeline.train.callbacks

    @property
    def manifest(self) -> Manifest:
        return self.dataset.manifest


def train_loop_per_worker(loop_config: LoopConfig) -> None:
    from pipeline.train.loop import train_loop_per_worker as run_loop

    run_loop(loop_config)
