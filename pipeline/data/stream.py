"""Photographs through Ray Data as one stream of epochs.

A Ray Dataset read once per epoch starts a new execution every epoch: the streaming executor,
its first read tasks, their first decoded blocks. The ingest benchmark measured that at 1.6-2.0 s
before an epoch's first batch, against 0.16 s for a torch DataLoader whose worker processes
persist; on 2,000 images that was 40% of an epoch (README, "Performance"). Here one execution
reads several epochs, each in its own file order, and the consumer takes one epoch's batches at a
time from one iterator. The next epoch's reads therefore run while the current epoch trains.

`PhotoShards` is a Ray Data datasource. It reads a split's shards and decodes and crops them in
the read task (`DecodeCrop`), yielding `batch_size`-row uint8 blocks. It plans one read task per
(epoch, shard) from the manifest alone: no Parquet footers are fetched and no files are listed or
sampled, so a plan costs nothing per file on S3. Execution `i` of the dataset reads epochs
`[i * k, (i + 1) * k)`, each in `epoch_shard_order(seed, epoch)`; `k` is every epoch of the run
if that is at most `MAX_TASKS` read tasks. With ImageNet's ~16,000 8 MB shards, `k` is 1, and one
start per epoch costs about 3% of an epoch per GPU.

`pipeline.data.ingest.EpochBatches` is the consumer's side. `take(n)` hands out the next `n`
batches of the one iterator, and starts the next execution when the current one runs out. An
epoch is therefore the next `n` batches of the stream, not exactly one pass of the file order. A
training worker takes its equal share of full batches per epoch, so the few rows an epoch leaves
over begin the next one; the local shuffle buffer already mixes rows across that boundary. Over
a run every image is read once per epoch.

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

from pipeline import storage as st
from pipeline.data.ingest import DecodeCrop, epoch_shard_order
from pipeline.data.shards import read_shard
from pipeline.ray_compat import execution_index

# At most this many read tasks in one execution. A plan is built on the driver (or in the
# split coordinator) before the execution starts, and a task is a few KB there.
MAX_TASKS = 4096


@dataclass(frozen=True)
class Shard:
    loc: st.Location
    rows: int


def read_crops(shard: Shard, decode: DecodeCrop, rows: int) -> Iterator[Any]:
    """One read task: the shard's images decoded and cropped, `rows` at a time, one block each.
    A shard that is missing or not Parquet is named (`read_shard`), as is an image that does not
    decode (`DecodeCrop`)."""
    table = read_shard(shard.loc).select(["image", "label", "id"]).combine_chunks()
    for start in range(0, table.num_rows, rows):
        part = table.slice(start, rows)
        batch = {
            "image": part.column("image").to_pylist(),
            "label": part.column("label").to_numpy(),
            "id": np.asarray(part.column("id").to_pylist(), dtype=object),
        }
        yield BlockAccessor.batch_to_block(decode(batch))


class PhotoShards(Datasource):
    """A split's shards as uint8 crops, `epochs` epochs per run of the dataset (see the module
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
    ) -> None:
        super().__init__()
        if not shards:
            raise ValueError("PhotoShards needs at least one shard")
        self.shards = list(shards)
        self.decode = decode
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        fit = max(1, MAX_TASKS // len(self.shards))
        self.epochs_per_execution = min(max(1, epochs), fit) if shuffle else 1
        size = decode.crop.size
        self._row_bytes = size * size * decode.channels + 8  # uint8 crop + int64 label

    @property
    def tasks_per_execution(self) -> int:
        return self.epochs_per_execution * len(self.shards)

    def epochs_of(self, execution: int) -> range:
        k = self.epochs_per_execution
        return range(execution * k, (execution + 1) * k)

    def order(self, epoch: int) -> list[Shard]:
        if not self.shuffle:
            return self.shards
        return epoch_shard_order(self.shards, self.seed, epoch)

    def estimate_inmemory_data_size(self) -> int:
        rows = sum(s.rows for s in self.shards)
        return rows * self._row_bytes * self.epochs_per_execution

    def get_read_tasks(
        self,
        parallelism: int,
        per_task_row_limit: int | None = None,
        data_context: Any = None,
    ) -> list[ReadTask]:
        execution = execution_index(data_context)
        tasks = []
        for epoch in self.epochs_of(execution):
            for shard in self.order(epoch):
                meta = BlockMetadata(
                    num_rows=shard.rows,
                    size_bytes=shard.rows * self._row_bytes,
                    input_files=[shard.loc.uri],
                    exec_stats=None,
                )
                read = functools.partial(read_crops, shard, self.decode, self.batch_size)
                tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        return tasks

    def get_name(self) -> str:
        return "PhotoShards"
