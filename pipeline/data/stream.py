"""Photographs through Ray Data as one stream of epochs.

A Ray Dataset read once per epoch starts a new execution every epoch: the streaming executor,
its first read tasks, their first decoded blocks. The ingest benchmark measured that at 1.6-2.0 s
before an epoch's first batch, against 0.16 s for a torch DataLoader whose worker processes
persist; on 2,000 images that was 40% of an epoch (README, "Performance"). Here one execution
reads several epochs, each in its own file order, and the consumer takes one epoch's batches at a
time from one iterator. The next epoch's reads therefore run while the current epoch trains.

`PhotoShards` is a Ray Data datasource. A read task reads its shards in turn and decodes and
crops them (`DecodeCrop`), yielding `batch_size`-row uint8 blocks (a batch may span two shards).
For training, a task draws each block's rows at random from a window of `SHUFFLE_BATCHES` blocks'
worth of encoded images, seeded by (seed, epoch, task): the local shuffle happens before
decoding, on bytes, and every block's rows follow from the seed. (A local shuffle buffer on the
worker, `iter_torch_batches(local_shuffle_buffer_size=...)`, copied every decoded crop again and
mixed rows by the order in which the tasks' blocks happened to arrive; it cost the ingest
benchmark 5% of its images/s.)
It plans `tasks_per_epoch` read tasks per epoch from the manifest alone: no Parquet footers are
fetched and no files are listed or sampled, so a plan costs nothing per file on S3. Epoch `e`'s
file order is `epoch_shard_order(seed, e)`; task `i` of `g` reads shards `i, i + g, ...` of it,
and the `g` tasks run side by side, so rows arrive in roughly that order. By default `g` is the
cluster's CPUs when an execution is planned, which is where and when it starts (the training
workers' nodes have joined by then): one long task per core and epoch, not one per shard.
Each task boundary leaves a core idle ~0.15 s (Ray Data notices a finished task on its next
0.1 s poll, then leases a worker for the next): with one task per 8 MB shard (~0.5 s of
decoding) the ingest benchmark's tasks kept 1.6 of 2 cores busy, with one per core and epoch
1.8-1.9 (README, "Performance"). Each task hands on a block per batch as it crops it
(`photo_dataset` lowers the dataset's `target_max_block_size` to just under a batch).
Execution `i` of the dataset reads epochs `[i * k, (i + 1) * k)`; `k` is every epoch of the run
if that many epochs of shards number at most `MAX_TASKS`.

`pipeline.data.ingest.EpochBatches` is the consumer's side. `take(n)` hands out the next `n`
batches of the one iterator, and starts the next execution when the current one runs out. An
epoch is therefore the next `n` batches of the stream, not exactly one pass of the file order. A
training worker takes its equal share of full batches per epoch, so the few rows an epoch leaves
over begin the next one. Over a run every image is read once per epoch.

Like `pipeline.data.ingest`, this module imports no torch: Ray Data's processes unpickle it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray.data import Datasource, ReadTask
from ray.data.block import BlockAccessor, BlockMetadata

from pipeline import ray_compat
from pipeline import storage as st
from pipeline.data.ingest import DecodeCrop, cluster_cpus, epoch_shard_order
from pipeline.data.shards import read_shard

# At most this many read tasks in one execution. A plan is built on the driver (or in the
# split coordinator) before the execution starts, and a task is a few KB there.
MAX_TASKS = 4096

# Training reads shuffle rows within this many blocks' worth of encoded images per read task.
SHUFFLE_BATCHES = 4

# Every process that runs a photo stream imports this module (it unpickles the datasource).
ray_compat.refresh_data_limits_sooner()


@dataclass(frozen=True)
class Shard:
    loc: st.Location
    rows: int


def read_crops(
    shards: Sequence[Shard], decode: DecodeCrop, rows: int, shuffle_seed: Any = None
) -> Iterator[Any]:
    """One read task: its shards' images in turn, decoded and cropped `rows` at a time, one block
    each; only the last block may be shorter. With `shuffle_seed`, the rows are shuffled within
    a window of `SHUFFLE_BATCHES` blocks' worth of encoded images (`_take`). A shard
    that is missing or not Parquet is named (`read_shard`), as is an image that does not decode
    (`DecodeCrop`)."""
    pending: list[tuple[bytes, int, str]] = []
    rng = None if shuffle_seed is None else np.random.default_rng(shuffle_seed)
    window = SHUFFLE_BATCHES * rows if rng is not None else 0
    for shard in shards:
        table = read_shard(shard.loc)
        pending += zip(
            table.column("image").to_pylist(),
            table.column("label").to_pylist(),
            table.column("id").to_pylist(),
            strict=True,
        )
        while len(pending) >= window + rows:
            yield _crops(decode, _take(pending, rows, rng))
    while pending:
        yield _crops(decode, _take(pending, min(rows, len(pending)), rng))


def _take(pending: list, n: int, rng: np.random.Generator | None) -> list:
    """Removes and returns the first `n` rows, or `n` rows drawn at random (a block's draw
    rebuilds the list of at most a window and a shard of rows: nothing beside the decoding)."""
    if rng is None:
        out = pending[:n]
        del pending[:n]
        return out
    drawn = rng.choice(len(pending), n, replace=False)
    out = [pending[i] for i in drawn]
    taken = set(drawn.tolist())
    pending[:] = [r for i, r in enumerate(pending) if i not in taken]
    return out


def _crops(decode: DecodeCrop, rows: list[tuple[bytes, int, str]]) -> Any:
    batch = {
        "image": [r[0] for r in rows],
        "label": np.asarray([r[1] for r in rows], dtype=np.int64),
        "id": np.asarray([r[2] for r in rows], dtype=object),
    }
    return BlockAccessor.batch_to_block(decode(batch))


class PhotoShards(Datasource):
    """A split's shards as uint8 crops, `epochs` epochs per run of the dataset, `tasks_per_epoch`
    read tasks each (default: the cluster's CPUs when a run is planned; see the module
    docstring). `shuffle=False` (evaluation): one epoch per execution, in manifest order."""

    def __init__(
        self,
        shards: Sequence[Shard],
        decode: DecodeCrop,
        *,
        batch_size: int,
        seed: int = 0,
        epochs: int = 1,
        shuffle: bool = True,
        tasks_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        if not shards:
            raise ValueError("PhotoShards needs at least one shard")
        self.shards = list(shards)
        self.decode = decode
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._tasks_per_epoch = tasks_per_epoch
        # From the shards, not the tasks: every execution must plan the same number of epochs,
        # and the number of tasks follows the cluster, which may grow between executions.
        fit = max(1, MAX_TASKS // len(self.shards))
        self.epochs_per_execution = min(max(1, epochs), fit) if shuffle else 1
        size = decode.crop.size
        self._row_bytes = size * size * decode.channels + 8  # uint8 crop + int64 label

    @property
    def tasks_per_epoch(self) -> int:
        """As given, or the cluster's CPUs now: an execution is planned where and when it starts
        (in a Train worker or split coordinator, once the training workers' nodes have joined;
        an autoscaling cluster's GPU nodes may not exist when the dataset is created)."""
        wanted = self._tasks_per_epoch or cluster_cpus()
        return min(max(1, wanted), len(self.shards))

    @property
    def tasks_per_execution(self) -> int:
        return self.epochs_per_execution * self.tasks_per_epoch

    @property
    def batch_bytes(self) -> int:
        """The size of one full block of crops."""
        return self.batch_size * self._row_bytes

    def epochs_of(self, execution: int) -> range:
        k = self.epochs_per_execution
        return range(execution * k, (execution + 1) * k)

    def order(self, epoch: int) -> list[Shard]:
        if not self.shuffle:
            return self.shards
        return epoch_shard_order(self.shards, self.seed, epoch)

    def tasks_of(self, epoch: int, g: int) -> list[list[Shard]]:
        """The shards of each of `g` read tasks of `epoch`: task `i` reads every `g`-th shard of
        the epoch's order from the `i`-th on."""
        order = self.order(epoch)
        return [order[i::g] for i in range(g)]

    def estimate_inmemory_data_size(self) -> int:
        rows = sum(s.rows for s in self.shards)
        return rows * self._row_bytes * self.epochs_per_execution

    def get_read_tasks(
        self,
        parallelism: int,
        per_task_row_limit: int | None = None,
        data_context: Any = None,
    ) -> list[ReadTask]:
        execution = ray_compat.execution_index(data_context)
        g = self.tasks_per_epoch
        tasks = []
        for epoch in self.epochs_of(execution):
            for i, shards in enumerate(self.tasks_of(epoch, g)):
                rows = sum(s.rows for s in shards)
                meta = BlockMetadata(
                    num_rows=rows,
                    size_bytes=rows * self._row_bytes,
                    input_files=[s.loc.uri for s in shards],
                    exec_stats=None,
                )
                seed = (self.seed, epoch, i) if self.shuffle else None
                read = functools.partial(read_crops, shards, self.decode, self.batch_size, seed)
                tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        return tasks

    def get_name(self) -> str:
        return "PhotoShards"
