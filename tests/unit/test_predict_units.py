"""`pipeline predict`'s pure parts: top-k order, the --out checks, the staged Parquet file, and
what `pipeline submit predict` sends (tests/integration/test_predict.py runs it for real)."""

from __future__ import annotations

import shlex

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage as st
from pipeline.cli.jobs import predict_arguments, predict_caveats
from pipeline.cluster import JOB_SCRIPTS, JobSpec
from pipeline.errors import ConfigError, StorageError, UsageError
from pipeline.serving.batch import (
    META_KEY,
    PredictOptions,
    StagedParquet,
    check_out,
    output_schema,
    top_k,
)


def test_top_k_is_sorted_best_first_and_ties_keep_class_order():
    probs = np.array([[0.1, 0.4, 0.1, 0.4], [0.7, 0.1, 0.1, 0.1]])
    idx, top = top_k(probs, 3)
    assert idx.tolist() == [[1, 3, 0], [0, 1, 2]]
    assert top.tolist() == [[0.4, 0.4, 0.1], [0.7, 0.1, 0.1]]
    assert (idx[:, 0] == probs.argmax(axis=1)).all()  # the first is the label


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [("batch_size", 0, "--batch-size"), ("concurrency", 0, "--concurrency"),
     ("top_k", 0, "--top-k"), ("device", "tpu", "--device 'tpu'")],
)  # fmt: skip
def test_bad_options_are_user_errors(field, value, expected):
    with pytest.raises(UsageError, match=expected):
        PredictOptions(data="d", out="o", **{field: value}).check()


def _table(n: int = 3) -> pa.Table:
    return pa.Table.from_pydict(
        {
            "path": [f"p{i}" for i in range(n)],
            "label": ["a"] * n,
            "confidence": [0.5] * n,
            "top_k_labels": [["a", "b"]] * n,
            "top_k_probabilities": [[0.5, 0.5]] * n,
            "model": ["m"] * n,
            "version": ["1"] * n,
        },
        schema=_schema(),
    )


def _schema() -> pa.Schema:
    return output_schema("path").with_metadata({META_KEY: b"{}"})


def test_the_output_appears_only_when_committed(tmp_path):
    loc = st.resolve(str(tmp_path / "sub" / "out.parquet"))
    staged = StagedParquet(loc, _schema())
    staged.write(_table())
    assert not (tmp_path / "sub" / "out.parquet").exists()
    staged.commit()
    assert pq.read_table(loc.path).num_rows == 3
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["out.parquet"]


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    out = tmp_path / "out.parquet"
    with StagedParquet(st.resolve(str(out)), _schema()) as staged:
        staged.write(_table(2))
    with pytest.raises(RuntimeError), StagedParquet(st.resolve(str(out)), _schema()) as staged:
        staged.write(_table(5))
        raise RuntimeError("an image failed")
    assert pq.read_table(out).num_rows == 2  # the old file, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]


def test_out_checks_refuse_what_they_would_replace(tmp_path):
    check_out(st.resolve(str(tmp_path / "new.parquet")), overwrite=False)  # nothing there: fine
    with pytest.raises(StorageError, match="is a folder"):
        check_out(st.resolve(str(tmp_path)), overwrite=True)
    ours = tmp_path / "ours.parquet"
    with StagedParquet(st.resolve(str(ours)), _schema()) as staged:
        staged.write(_table())
    with pytest.raises(StorageError, match="--overwrite"):
        check_out(st.resolve(str(ours)), overwrite=False)
    check_out(st.resolve(str(ours)), overwrite=True)
    theirs = tmp_path / "theirs.parquet"
    pq.write_table(pa.table({"x": [1]}), theirs)
    notes = tmp_path / "notes.txt"
    notes.write_text("not parquet")
    for other in (theirs, notes):
        with pytest.raises(StorageError, match="not predictions written by"):
            check_out(st.resolve(str(other)), overwrite=True)


def test_submit_predict_runs_the_job_script_with_the_arguments():
    args = predict_arguments(["models:/m@champion", "--data", "s3://b/d", "--out=s3://b/p.pq"])
    spec = JobSpec("predict", args)
    assert JOB_SCRIPTS["predict"] == "jobs/predict.py"
    assert shlex.split(spec.entrypoint()) == [
        "python", "jobs/predict.py", "models:/m@champion", "--data", "s3://b/d",
        "--out=s3://b/p.pq",
    ]  # fmt: skip
    assert predict_caveats(args) == []
    notes = predict_caveats(["m", "--data", "/abs/d", "--out", "out.parquet"])
    assert len(notes) == 1 and "--out 'out.parquet'" in notes[0]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [([], "model URI first"), (["--data", "d", "--out", "o"], "model URI first"),
     (["models:/m/1", "--out", "o"], "needs --data"),
     (["models:/m/1"], "needs --data and --out")],
)  # fmt: skip
def test_submit_predict_needs_a_model_data_and_out(extra, expected):
    with pytest.raises(ConfigError, match=expected):
        predict_arguments(extra)
