"""Nightly's decisions that need no servers: what is new, and how tonight's model starts."""

from __future__ import annotations

from pipeline.config import load_config
from pipeline.data.shards import (
    ImageSpec,
    Manifest,
    Normalization,
    ShardInfo,
    SplitInfo,
    dataset_digest,
)
from pipeline.nightly import DataChange, NightlyReport, diff_data, training_config


def manifest(shards: dict[str, list[tuple[str, str, int]]]) -> Manifest:
    splits = {
        split: SplitInfo(
            rows=sum(r for _, _, r in items),
            class_counts=[sum(r for _, _, r in items)],
            shards=[ShardInfo(path=p, rows=r, bytes=r, sha256=sha) for p, sha, r in items],
        )
        for split, items in shards.items()
    }
    return Manifest(
        name="d",
        created_at="2026-11-28",
        source="test",
        classes=["a"],
        image=ImageSpec(encoding="raw", height=8, width=8, channels=1),
        splits=splits,
        normalization=Normalization(mean=[0.5], std=[0.2]),
        digest=dataset_digest(splits),
    )


OLD = {
    "train": [("train/part-00000.parquet", "aa", 10)],
    "test": [("test/part-00000.parquet", "bb", 5)],
}


def test_no_change_when_digest_and_shards_match():
    m = manifest(OLD)
    change = diff_data(
        m, "uri", m.digest, {"train/part-00000.parquet": "aa", "test/part-00000.parquet": "bb"}
    )
    assert not change.changed and change.new_shards == [] and change.removed_shards == []
    assert change.rows == 15


def test_new_and_removed_shards_by_hash():
    m = manifest(
        {
            "train": [
                ("train/part-00000.parquet", "aa", 10),
                ("train/part-00001.parquet", "cc", 7),
            ],
            "test": [("test/part-00009.parquet", "dd", 5)],
        }
    )
    change = diff_data(
        m, "uri", "old-digest", {"train/part-00000.parquet": "aa", "test/part-00000.parquet": "bb"}
    )
    assert change.changed
    assert (
        change.new_shards == ["test/part-00009.parquet", "train/part-00001.parquet"]
        and change.new_rows == 12
    )
    assert change.removed_shards == ["test/part-00000.parquet"]


def test_a_renamed_shard_with_the_same_bytes_is_not_new():
    m = manifest(
        {
            "train": [("train/part-renamed.parquet", "aa", 10)],
            "test": [("test/part-00000.parquet", "bb", 5)],
        }
    )
    change = diff_data(
        m, "uri", "old", {"train/part-00000.parquet": "aa", "test/part-00000.parquet": "bb"}
    )
    assert change.new_shards == [] and change.removed_shards == []


def test_without_the_champions_shard_list_every_shard_counts_as_new():
    m = manifest(OLD)
    change = diff_data(m, "uri", "other", None)
    assert change.changed and not change.shard_list_known
    assert (
        change.new_shards == ["test/part-00000.parquet", "train/part-00000.parquet"]
        and change.new_rows == 15
    )
    assert not diff_data(m, "uri", m.digest, None).new_shards
    assert diff_data(m, "uri", None, None).changed  # no champion at all


def test_training_config_fine_tunes_the_champion_or_starts_afresh():
    cfg = load_config(
        None,
        [
            "registry.model_name=m",
            "train.epochs=40",
            "train.lr=0.1",
            "nightly.epochs=5",
            "nightly.lr=0.01",
        ],
    )
    tuned = training_config(cfg, "3", "nightly-x-train")
    assert tuned.model.weights == "models:/m/3"
    assert (tuned.train.epochs, tuned.train.lr) == (5, 0.01)
    assert tuned.run.name == "nightly-x-train"
    fresh = training_config(cfg, None, "r")  # no champion yet
    assert fresh.model.weights is None and (fresh.train.epochs, fresh.train.lr) == (40, 0.1)
    scratch = training_config(
        load_config(None, ["registry.model_name=m", "nightly.init=scratch"]), "3", "r"
    )
    assert scratch.model.weights is None


def test_report_markdown_names_the_data_and_the_decision():
    report = NightlyReport(
        date="2026-11-28",
        model_name="m",
        decision="refused",
        reason="the candidate is worse",
        champion_before="1",
        champion_after="1",
        init="models:/m/1",
        data=DataChange(
            uri="s3://b/d",
            digest="f" * 64,
            champion_digest="e" * 64,
            new_shards=["train/part-00001.parquet"],
            new_rows=7,
            rows=22,
        ),
        candidate_version="2",
        metrics={"test_acc": 0.9},
    )
    text = report.to_markdown()
    assert "# Nightly 2026-11-28: refused" in text
    assert "train/part-00001.parquet" in text and "7 rows of 22" in text and "s3://b/d" in text
    assert "champion before: v1, after: v1" in text and "models:/m/1" in text
