"""`pipeline.data.stream`: one Ray Data execution reads several epochs of photographs, each in
its own file order, and `EpochBatches` hands them out an epoch at a time (no Ray needed here:
the plan and the reads are plain functions)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pipeline import storage as st
from pipeline.config import CropConfig
from pipeline.data import stream
from pipeline.data.ingest import DecodeCrop, EpochBatches, epoch_shard_order
from pipeline.data.photos import ImportOptions
from pipeline.data.sources import WriteOptions, import_image_folder
from pipeline.errors import DatasetError
from tests.photos import make_photo_tree

pytestmark = pytest.mark.quick

CROP = CropConfig(size=16)


def shards(n: int) -> list[stream.Shard]:
    return [stream.Shard(st.resolve(f"/data/train/part-{i:05d}.parquet"), 10 + i) for i in range(n)]


def planned(source: stream.PhotoShards, execution: int) -> list[str]:
    context = SimpleNamespace(_execution_idx=execution)
    tasks = source.get_read_tasks(source.tasks_per_execution, data_context=context)
    return [t.metadata.input_files[0] for t in tasks]


def test_one_execution_plans_every_epoch_each_in_its_own_order_and_the_next_the_epochs_after():
    files = shards(6)
    uris = [s.loc.uri for s in files]
    source = stream.PhotoShards(files, DecodeCrop(3, CROP, True), batch_size=4, seed=7, epochs=4)
    assert source.epochs_per_execution == 4 and source.tasks_per_execution == 24
    first, second = planned(source, 0), planned(source, 1)
    for execution, plan in ((0, first), (1, second)):
        epochs = [plan[i * 6 : (i + 1) * 6] for i in range(4)]
        assert epochs == [epoch_shard_order(uris, 7, 4 * execution + e) for e in range(4)]
        assert all(sorted(e) == uris for e in epochs)  # each epoch reads every shard once
    assert len({tuple(first[i * 6 : (i + 1) * 6]) for i in range(4)}) > 1
    assert first != second
    assert planned(source, 0) == first  # the same seed and run: the same plan
    # The planned rows and bytes are those of the uint8 crops the tasks will hand on.
    tasks = source.get_read_tasks(24, data_context=SimpleNamespace(_execution_idx=0))
    by_uri = {s.loc.uri: s.rows for s in files}
    assert [t.metadata.num_rows for t in tasks] == [by_uri[u] for u in first]
    assert tasks[0].metadata.size_bytes == tasks[0].metadata.num_rows * (16 * 16 * 3 + 8)
    assert source.estimate_inmemory_data_size() == 4 * sum(by_uri.values()) * (16 * 16 * 3 + 8)


def test_a_large_dataset_plans_fewer_epochs_per_execution(monkeypatch):
    monkeypatch.setattr(stream, "MAX_TASKS", 13)
    files = shards(6)
    source = stream.PhotoShards(files, DecodeCrop(3, CROP, True), batch_size=4, seed=1, epochs=9)
    assert source.epochs_per_execution == 2
    uris = [s.loc.uri for s in files]
    assert planned(source, 3) == epoch_shard_order(uris, 1, 6) + epoch_shard_order(uris, 1, 7)
    monkeypatch.setattr(stream, "MAX_TASKS", 4)  # fewer than the shards: still one epoch
    one = stream.PhotoShards(files, DecodeCrop(3, CROP, True), batch_size=4, epochs=9)
    assert one.epochs_per_execution == 1 and len(planned(one, 5)) == 6


def test_evaluation_reads_one_pass_in_manifest_order_every_time():
    files = shards(5)
    source = stream.PhotoShards(
        files, DecodeCrop(3, CROP, False), batch_size=4, epochs=9, shuffle=False
    )
    uris = [s.loc.uri for s in files]
    assert planned(source, 0) == planned(source, 3) == uris


def test_no_shards_is_refused():
    with pytest.raises(ValueError, match="at least one shard"):
        stream.PhotoShards([], DecodeCrop(3, CROP, True), batch_size=4)


def test_a_read_task_decodes_and_crops_its_shard_in_blocks_of_the_batch_size(tmp_path):
    from ray.data.block import BlockAccessor

    make_photo_tree(tmp_path / "src", per_class=4)
    out = tmp_path / "ds"
    m = import_image_folder(
        tmp_path / "src",
        WriteOptions(out=str(out), encoding="jpeg"),
        val_fraction=0,
        test_fraction=0,
        images=ImportOptions(workers=1),
    )
    info = m.split("train").shards[0]
    shard = stream.Shard(st.resolve(str(out)).join(info.path), info.rows)
    blocks = list(stream.read_crops(shard, DecodeCrop(3, CROP, True), 3))
    sizes = [BlockAccessor.for_block(b).num_rows() for b in blocks]
    assert sum(sizes) == info.rows and all(n == 3 for n in sizes[:-1])
    batch = BlockAccessor.for_block(blocks[0]).to_numpy()
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (3, 16, 16, 3)
    assert set(batch) == {"image", "label"}
    missing = stream.Shard(st.resolve(str(out / "train" / "gone.parquet")), 1)
    with pytest.raises(DatasetError, match=r"gone\.parquet: shard is missing"):
        list(stream.read_crops(missing, DecodeCrop(3, CROP, True), 3))


def test_epoch_batches_hands_out_epochs_from_one_iterator_and_starts_the_next_run_when_done():
    runs: list[int] = []

    def iterate():  # a dataset of 7 batches per run; each run a new execution
        runs.append(len(runs))
        run = runs[-1]
        return (f"{run}:{i}" for i in range(7))

    batches = EpochBatches(iterate)
    assert list(batches.take(3)) == ["0:0", "0:1", "0:2"]
    assert list(batches.take(3)) == ["0:3", "0:4", "0:5"]
    assert runs == [0]  # no new execution between epochs
    assert list(batches.take(3)) == ["0:6", "1:0", "1:1"]  # run 0 used up mid-epoch
    assert runs == [0, 1]
    stopped = list(batches.take(0))
    assert stopped == []
    batches.close()
    assert list(batches.take(1)) == ["2:0"]  # closed: the next take starts afresh


def test_epoch_batches_of_an_empty_dataset_fail_instead_of_spinning():
    batches = EpochBatches(lambda: iter(()))
    with pytest.raises(ValueError, match="no batch"):
        list(batches.take(2))
