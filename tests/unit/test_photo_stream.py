"""`pipeline.data.stream`: one Ray Data execution reads several epochs of photographs, each in
its own file order, and `EpochBatches` hands them out an epoch at a time (no Ray needed here:
the plan and the reads are plain functions)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
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
    """The shards of execution `execution`'s tasks, in plan order (one per task by default)."""
    context = SimpleNamespace(_execution_idx=execution)
    tasks = source.get_read_tasks(source.tasks_per_execution, data_context=context)
    return [uri for t in tasks for uri in t.metadata.input_files]


def test_one_execution_plans_every_epoch_each_in_its_own_order_and_the_next_the_epochs_after():
    files = shards(6)
    uris = [s.loc.uri for s in files]
    source = stream.PhotoShards(
        files, DecodeCrop(3, CROP, True), batch_size=4, seed=7, epochs=4, tasks_per_epoch=6
    )
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
    source = stream.PhotoShards(
        files, DecodeCrop(3, CROP, True), batch_size=4, seed=1, epochs=9, tasks_per_epoch=6
    )
    assert source.epochs_per_execution == 2
    uris = [s.loc.uri for s in files]
    assert planned(source, 3) == epoch_shard_order(uris, 1, 6) + epoch_shard_order(uris, 1, 7)
    monkeypatch.setattr(stream, "MAX_TASKS", 4)  # fewer than the shards: still one epoch
    one = stream.PhotoShards(files, DecodeCrop(3, CROP, True), batch_size=4, epochs=9)
    assert one.epochs_per_execution == 1 and sorted(planned(one, 5)) == sorted(uris)


def test_an_epoch_is_read_by_one_task_per_core_each_taking_every_gth_shard_of_its_order():
    files = shards(7)
    uris = [s.loc.uri for s in files]
    source = stream.PhotoShards(
        files, DecodeCrop(3, CROP, True), batch_size=4, seed=2, epochs=3, tasks_per_epoch=3
    )
    assert source.epochs_per_execution == 3 and source.tasks_per_execution == 9
    tasks = source.get_read_tasks(9, data_context=SimpleNamespace(_execution_idx=1))
    assert len(tasks) == 9
    by_uri = {s.loc.uri: s.rows for s in files}
    for e in range(3):
        order = epoch_shard_order(uris, 2, 3 + e)
        epoch = tasks[3 * e : 3 * e + 3]
        assert [list(t.metadata.input_files) for t in epoch] == [order[i::3] for i in range(3)]
        for t in epoch:
            assert t.metadata.num_rows == sum(by_uri[u] for u in t.metadata.input_files)
    # More tasks than shards: one per shard.
    many = stream.PhotoShards(files, DecodeCrop(3, CROP, True), batch_size=4, tasks_per_epoch=64)
    assert many.tasks_per_epoch == 7


def test_by_default_each_execution_plans_a_task_per_cpu_of_the_cluster_as_it_is_then(monkeypatch):
    # An autoscaling cluster's GPU nodes join after the dataset is made: the tasks of an
    # execution follow the CPUs when it is planned, and the epochs it plans do not move.
    files = shards(12)
    uris = [s.loc.uri for s in files]
    cpus = [2]
    monkeypatch.setattr(stream, "cluster_cpus", lambda: cpus[0])
    source = stream.PhotoShards(files, DecodeCrop(3, CROP, True), batch_size=4, seed=3, epochs=6)
    context = SimpleNamespace(_execution_idx=0)
    first = source.get_read_tasks(1, data_context=context)
    assert len(first) == 6 * 2 and source.epochs_per_execution == 6
    cpus[0] = 5
    context._execution_idx = 1
    second = source.get_read_tasks(1, data_context=context)
    assert len(second) == 6 * 5
    epoch = [list(t.metadata.input_files) for t in second[:5]]
    assert epoch == [epoch_shard_order(uris, 3, 6)[i::5] for i in range(5)]  # epoch 6 of 12
    assert source.batch_bytes == 4 * (16 * 16 * 3 + 8)


def test_evaluation_reads_one_pass_in_manifest_order_every_time():
    files = shards(5)
    source = stream.PhotoShards(
        files, DecodeCrop(3, CROP, False), batch_size=4, epochs=9, shuffle=False, tasks_per_epoch=5
    )
    uris = [s.loc.uri for s in files]
    assert planned(source, 0) == planned(source, 3) == uris


def test_no_shards_is_refused():
    with pytest.raises(ValueError, match="at least one shard"):
        stream.PhotoShards([], DecodeCrop(3, CROP, True), batch_size=4)


def test_a_read_task_decodes_and_crops_its_shards_in_full_batches_across_shard_ends(tmp_path):
    from ray.data.block import BlockAccessor

    make_photo_tree(tmp_path / "src", per_class=4)
    out = tmp_path / "ds"
    m = import_image_folder(
        tmp_path / "src",
        WriteOptions(out=str(out), encoding="jpeg", shard_rows=3),
        val_fraction=0,
        test_fraction=0,
        images=ImportOptions(workers=1),
    )
    root = st.resolve(str(out))
    task = [stream.Shard(root.join(s.path), s.rows) for s in m.split("train").shards]
    rows = sum(s.rows for s in task)
    assert len(task) >= 3 and rows % 5
    crops = stream.read_crops(task, DecodeCrop(3, CROP, True), 5)
    blocks = [BlockAccessor.for_block(b) for b in crops]
    sizes = [b.num_rows() for b in blocks]
    assert sizes == [5] * (rows // 5) + [rows % 5]  # batches span shards; only the last is short
    batches = [b.to_numpy() for b in blocks]
    assert batches[0]["image"].dtype == np.uint8 and batches[0]["image"].shape == (5, 16, 16, 3)
    assert set(batches[0]) == {"image", "label"}
    # Every row once, labels in the shards' order.
    want = [label for s in task for label in pq.read_table(s.loc.path)["label"].to_pylist()]
    assert np.concatenate([b["label"] for b in batches]).tolist() == want
    missing = stream.Shard(root.join("train/gone.parquet"), 1)
    with pytest.raises(DatasetError, match=r"gone\.parquet: shard is missing"):
        list(stream.read_crops([task[0], missing], DecodeCrop(3, CROP, True), 3))


def test_training_reads_shuffle_rows_within_a_seeded_window_before_decoding(tmp_path):
    from ray.data.block import BlockAccessor

    make_photo_tree(tmp_path / "src", per_class=8)
    m = import_image_folder(
        tmp_path / "src",
        WriteOptions(out=str(tmp_path / "ds"), encoding="jpeg", shard_rows=4),
        val_fraction=0,
        test_fraction=0,
        images=ImportOptions(workers=1),
    )
    root = st.resolve(str(tmp_path / "ds"))
    task = [stream.Shard(root.join(s.path), s.rows) for s in m.split("train").shards]
    rows = sum(s.rows for s in task)
    centre = DecodeCrop(3, CROP, train=False)  # the same crop of an image every time: its identity

    def read(seed) -> list[list[bytes]]:
        blocks = [
            BlockAccessor.for_block(b).to_numpy() for b in stream.read_crops(task, centre, 2, seed)
        ]
        return [[img.tobytes() for img in b["image"]] for b in blocks]

    plain, epoch0, again, epoch1 = read(None), read((0, 0, 0)), read((0, 0, 0)), read((0, 1, 0))
    assert [len(b) for b in epoch0] == [2] * (rows // 2) + ([rows % 2] if rows % 2 else [])
    flat = [[img for b in blocks for img in b] for blocks in (plain, epoch0, epoch1)]
    assert sorted(flat[1]) == sorted(flat[0]) == sorted(flat[2])  # every row once
    assert epoch0 == again and flat[1] != flat[0] and flat[1] != flat[2]  # seeded, per epoch
    # A row moves at most a window ahead: the first block is drawn once a window and a block
    # are read, here after 3 shards of 4 rows.
    window = stream.SHUFFLE_BATCHES * 2
    assert set(epoch0[0]) <= set(flat[0][: window + 4])


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


def test_a_process_that_unpickles_a_photo_stream_rereads_ray_data_limits_within_a_quarter_second(
    tmp_path,
):
    # A Ray Data execution runs on one CPU until it first re-reads its limits (Ray: every 1 s).
    # The processes that run the stream's executions unpickle its datasource, which imports
    # `pipeline.data.stream`; that shortens the interval there.
    import subprocess
    import sys

    import ray.cloudpickle as cloudpickle

    source = stream.PhotoShards(shards(2), DecodeCrop(3, CROP, True), batch_size=4)
    blob = tmp_path / "source.pkl"
    blob.write_bytes(cloudpickle.dumps(source))
    interval = "from ray.data._internal.execution.resource_manager import ResourceManager as R\n"
    probe = (
        f"{interval}print(R.GLOBAL_LIMITS_UPDATE_INTERVAL_S)\n"
        f"import ray.cloudpickle as c; c.loads(open({str(blob)!r}, 'rb').read())\n"
        "print(R.GLOBAL_LIMITS_UPDATE_INTERVAL_S)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    before, after = map(float, out.stdout.split())
    assert before == 1 and after == stream.ray_compat.DATA_LIMITS_REFRESH_S == 0.25
