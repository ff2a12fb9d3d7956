"""Registration, promotion, rollback and queries against a real `mlflow server` subprocess.

Versions differ in quality by a wide, known margin on the digits test split: weak (untrained,
~10%) and medium (6 SGD steps, ~50%) are small models trained in-process (no Ray) and logged as a
training run logs them; strong is the session's model trained by `pipeline train` (conftest's
`trained_model`, ~90%), a run in another experiment of the same server.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import PipelineConfig, load_config
from pipeline.data.shards import Manifest
from pipeline.data.sources import WriteOptions, prepare_digits
from pipeline.data.transform import iter_split
from pipeline.errors import RegistryError
from pipeline.evaluation import evaluate_model
from pipeline.model_package import log_pipeline_model
from pipeline.registry import (
    LockSettings,
    PromotionLock,
    best_runs,
    connect,
    promote,
    register_run_model,
    registered_versions,
    rollback,
)
from pipeline.tags import CHAMPION, PREVIOUS_CHAMPION, PROMOTION_LOCK_TAG, ROLLED_BACK_TAG
from pipeline.tracking import log_params_flat, standard_tags, start_or_resume_run
from pipeline.train.loop import model_for
from tests.conftest import mlflow_uris_kept

pytestmark = pytest.mark.slow

PIPELINE = str(Path(sys.executable).parent / "pipeline")
# A generous wait: the other promotion evaluates its candidate while holding the lock, which took
# over 60 s once on a loaded 2-core machine (CI).
FAST_LOCK = LockSettings(settle_s=0.3, poll_s=0.1, timeout_s=240)
EXPERIMENT = f"registry-tests-{uuid.uuid4().hex[:6]}"  # the session's server is shared
STEPS = {"weak": 0, "medium": 6}  # strong: the session's trained_model


# --- helpers shared with test_serving -----------------------------------------------------------


def digits_config(
    data_uri: str,
    tracking_uri: str,
    model_name: str = "digits-resnet",
    experiment: str = "digits",
    *overrides: str,
) -> PipelineConfig:
    return load_config(
        None,
        [
            f"data.uri={data_uri}",
            f"tracking.tracking_uri={tracking_uri}",
            f"tracking.experiment={experiment}",
            f"registry.model_name={model_name}",
            *overrides,
        ],
    )


def train_digits(cfg: PipelineConfig, manifest: Manifest, steps: int) -> torch.nn.Module:
    """cifar_resnet20 after `steps` SGD steps of 64 images (deterministic for a seed)."""
    torch.manual_seed(0)
    model = model_for(cfg, manifest)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    done = 0
    while done < steps:
        for x, y in iter_split(
            cfg.data.uri, manifest, "train", batch_size=64, resize=cfg.data.resize
        ):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    return model.eval()


def log_run(
    cfg: PipelineConfig, manifest: Manifest, model: torch.nn.Module, run_name: str, **metrics
) -> str:
    """An MLflow run shaped like a training run's (tags, params, metrics, model); its id."""
    tags = {
        **standard_tags(),
        "pipeline.run_name": run_name,
        "pipeline.dataset_digest": manifest.digest,
        "pipeline.config_digest": cfg.digest(),
    }
    # As training opens its run (no set_experiment: that is process-wide state, env var included).
    run_id = start_or_resume_run(
        cfg.tracking.tracking_uri, cfg.tracking.experiment, run_name=run_name, tags=tags
    )
    try:
        log_params_flat(cfg.to_dict())
        mlflow.log_metrics(metrics)
        log_pipeline_model(model, cfg, manifest)
        mlflow.set_tag("pipeline.completed", "true")
    finally:
        mlflow.end_run()
    return run_id


def register(cfg: PipelineConfig, run_id: str, name: str) -> str:
    """Register the run's model/ as a new version of `name`, as training does."""
    named = cfg.model_copy(
        update={"registry": cfg.registry.model_copy(update={"model_name": name})}
    )
    return register_run_model(named, run_id).version


def fresh_name() -> str:
    return f"digits-{uuid.uuid4().hex[:8]}"


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(mlflow_server, tmp_path_factory):
    """MLflow pointed at the test server for this module (in-process and subprocesses)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        with mlflow_uris_kept():
            yield mlflow_server


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[str, Manifest]:
    out = tmp_path_factory.mktemp("data") / "digits"
    return str(out), prepare_digits(WriteOptions(out=str(out)))


@pytest.fixture(scope="module")
def runs(env, digits, trained_model) -> dict[str, str]:
    """weak / medium / strong run ids. The weak run logs a flattering test_acc of 0.99: promotion
    must recompute scores, never trust logged numbers."""
    uri, manifest = digits
    cfg = digits_config(uri, env.uri, experiment=EXPERIMENT)
    out = {}
    for quality, steps in STEPS.items():
        model = train_digits(cfg, manifest, steps)
        logged = 0.99 if quality == "weak" else _accuracy(model, cfg, manifest)
        out[quality] = log_run(cfg, manifest, model, quality, test_acc=logged, best_val_acc=logged)
    out["strong"] = trained_model.run_id
    return out


def _accuracy(model, cfg, manifest) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in iter_split(cfg.data.uri, manifest, "test"):
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


@pytest.fixture
def client(env):
    return connect(env.uri)


@pytest.fixture
def cfg(env, digits) -> PipelineConfig:
    return digits_config(digits[0], env.uri, experiment=EXPERIMENT)


def registered(cfg, runs, *qualities: str) -> tuple[str, dict[str, str]]:
    """A fresh registered model with versions 1, 2, ... from the given runs, in order."""
    name = fresh_name()
    return name, {q: register(cfg, runs[q], name) for q in qualities}


def aliases(client, name: str) -> dict[str, str]:
    return dict(client.get_registered_model(name).aliases)


# --- registration -------------------------------------------------------------------------------


def test_every_version_is_tagged_with_data_code_config_and_metrics(
    client, cfg, runs, trained_model
):
    from pipeline.data.shards import read_manifest

    name, versions = registered(cfg, runs, "strong")
    version = client.get_model_version(name, versions["strong"])
    tags = version.tags
    run_tags = client.get_run(runs["strong"]).data.tags
    assert tags["dataset_digest"] == read_manifest(trained_model.data_uri).digest
    assert len(tags["git_commit"]) == 40
    assert tags["config_digest"] == run_tags["pipeline.config_digest"]
    assert float(tags["test_acc"]) > 0.8 and tags["model"] == "cifar_resnet20"
    assert version.run_id == runs["strong"]


# --- promotion ----------------------------------------------------------------------------------


def test_first_version_becomes_champion(client, cfg, runs):
    name, v = registered(cfg, runs, "weak")
    decision = promote(client, name, lock=FAST_LOCK)
    assert decision.promote and decision.acted and decision.champion is None
    assert aliases(client, name) == {CHAMPION: v["weak"]}


def test_better_candidate_is_promoted_on_scores_recomputed_now(
    client, cfg, runs, digits, trained_model
):
    name, v = registered(cfg, runs, "weak", "strong")
    promote(client, name, candidate=v["weak"], lock=FAST_LOCK)
    decision = promote(client, name, lock=FAST_LOCK)  # default candidate: the newest version

    assert decision.promote and decision.candidate.version == v["strong"]
    assert aliases(client, name) == {CHAMPION: v["strong"], PREVIOUS_CHAMPION: v["weak"]}
    # Recomputed, not read from the run: the weak run logged test_acc 0.99.
    weak_now = evaluate_model(f"models:/{name}/{v['weak']}", digits[0])["acc"]
    assert decision.champion.acc == pytest.approx(weak_now) and weak_now < 0.3
    # Both re-evaluated on the candidate's training data (the default --data), not the weak
    # run's: the strong run is trained_model, trained on the session's digits.
    assert decision.candidate.acc > weak_now + 0.5
    assert decision.data_uri == trained_model.data_uri

    tags = client.get_model_version(name, v["strong"]).tags
    assert tags["promotion.decision"] == "promoted"
    assert tags["promotion.champion_version"] == v["weak"]
    assert float(tags["promotion.candidate_acc"]) == pytest.approx(decision.candidate.acc, abs=1e-6)
    assert float(tags["promotion.champion_acc"]) == pytest.approx(weak_now, abs=1e-6)
    comparison = _comparison(client, runs["strong"], v["strong"])
    assert comparison["outcome"] == "promoted" and comparison["reason"] == decision.reason
    assert comparison["champion"]["per_class"].keys() == comparison["candidate"]["per_class"].keys()


def _comparison(client, run_id: str, version: str) -> dict:
    """The newest promotion comparison (JSON) logged to the run for `version`."""
    files = sorted(
        a.path
        for a in client.list_artifacts(run_id, "promotion")
        if a.path.endswith(f"-v{version}.json")
    )
    assert files, "no comparison artifact"
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=files[-1])
    return json.loads(Path(local).read_text())


def test_worse_candidate_is_refused_and_aliases_are_untouched(client, cfg, runs):
    name, v = registered(cfg, runs, "medium", "strong", "weak")
    promote(client, name, candidate=v["medium"], lock=FAST_LOCK)
    promote(client, name, candidate=v["strong"], lock=FAST_LOCK)
    before = aliases(client, name)

    decision = promote(client, name, candidate=v["weak"], lock=FAST_LOCK)
    assert not decision.promote and not decision.acted
    assert "not better than the champion" in decision.reason
    assert (
        aliases(client, name)
        == before
        == {
            CHAMPION: v["strong"],
            PREVIOUS_CHAMPION: v["medium"],
        }
    )
    tags = client.get_model_version(name, v["weak"]).tags
    assert tags["promotion.decision"] == "refused" and tags["promotion.reason"] == decision.reason
    assert (
        PROMOTION_LOCK_TAG not in client.get_registered_model(name).tags
    )  # the lease was released


def test_margin_and_class_floor_can_refuse_a_better_candidate(client, cfg, runs):
    name, v = registered(cfg, runs, "medium", "strong")
    promote(client, name, candidate=v["medium"], lock=FAST_LOCK)

    margin = promote(client, name, min_improvement=0.9, lock=FAST_LOCK)
    assert not margin.promote and "less than the margin 0.9" in margin.reason
    floor = promote(client, name, class_floor=0.999, lock=FAST_LOCK)
    assert not floor.promote and "below the floor 0.999" in floor.reason
    assert aliases(client, name) == {CHAMPION: v["medium"]}

    ok = promote(client, name, min_improvement=0.1, class_floor=0.3, lock=FAST_LOCK)
    assert ok.promote and aliases(client, name)[CHAMPION] == v["strong"]


def test_dry_run_decides_without_acting(client, cfg, runs):
    name, v = registered(cfg, runs, "weak", "strong")
    promote(client, name, candidate=v["weak"], lock=FAST_LOCK)
    decision = promote(client, name, dry_run=True)
    assert decision.promote and decision.outcome == "would promote" and not decision.acted
    assert aliases(client, name) == {CHAMPION: v["weak"]}
    assert "promotion.decision" not in client.get_model_version(name, v["strong"]).tags


def test_rollback_returns_to_previous_champion_and_keeps_it_out(client, cfg, runs):
    name, v = registered(cfg, runs, "medium", "strong")
    promote(client, name, candidate=v["medium"], lock=FAST_LOCK)
    promote(client, name, candidate=v["strong"], lock=FAST_LOCK)

    assert rollback(client, name, FAST_LOCK) == (v["strong"], v["medium"])
    assert aliases(client, name) == {CHAMPION: v["medium"]}
    assert ROLLED_BACK_TAG in client.get_model_version(name, v["strong"]).tags
    # A nightly promote of the newest version must not put the rolled-back one straight back.
    with pytest.raises(RegistryError, match="was rolled back"):
        promote(client, name, lock=FAST_LOCK)
    with pytest.raises(RegistryError, match="no 'previous-champion' alias"):
        rollback(client, name, FAST_LOCK)
    assert aliases(client, name) == {CHAMPION: v["medium"]}


# --- concurrency ----------------------------------------------------------------------------------


def _race(env, name: str, v: dict[str, str], *, without_lock: bool) -> dict[str, dict]:
    """Two promotions as separate processes, medium and strong against a weak champion. Both
    evaluate, then reach the alias write; the medium one holds its write until the strong one
    has written, and the strong one holds its write until the medium one has decided and reached
    its own (or 15 s passed: with the lock, the other one waits for the lock instead).
    Unserialised, both decide against the weak champion and the
    worse one writes last. Returns each process's decision and the champion writes it made."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results, strong_wrote, medium_at_write = (
        ctx.Barrier(2), ctx.Queue(), ctx.Event(), ctx.Event()
    )  # fmt: skip
    procs = [
        ctx.Process(
            target=_promote_in_child,
            args=(
                env.uri,
                name,
                v[q],
                q,
                (strong_wrote, medium_at_write),
                barrier,
                results,
                without_lock,
            ),
        )
        for q in ("medium", "strong")
    ]
    for p in procs:
        p.start()
    outcomes = {}
    for _ in procs:
        role, decision, writes = results.get(timeout=480)
        outcomes[role] = {"decision": decision, "writes": writes}
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return outcomes


def test_two_concurrent_promotions_end_on_the_better_model(env, client, cfg, runs):
    """Two nightly jobs at once: the promotion lock serialises them, so the champion ends on the
    better model whatever the timing (the control test below shows this race loses without it)."""
    name, v = registered(cfg, runs, "weak", "medium", "strong")
    promote(client, name, candidate=v["weak"], lock=FAST_LOCK)
    outcomes = _race(env, name, v, without_lock=False)
    medium, strong = outcomes["medium"]["decision"], outcomes["strong"]["decision"]

    assert aliases(client, name)[CHAMPION] == v["strong"]
    assert strong["acted"] and outcomes["strong"]["writes"] == [v["strong"]]
    # The hook really sat on the alias write: every process that acted went through it.
    assert bool(outcomes["medium"]["writes"]) == medium["acted"]
    # Serialised: whoever went second compared against what the first had just made champion.
    if medium["acted"]:
        assert strong["champion"]["version"] == v["medium"]
    else:
        assert medium["champion"]["version"] == v["strong"]


def test_without_the_lock_the_same_race_ends_on_the_worse_model(env, client, cfg, runs):
    """Control for the test above: with PromotionLock replaced by a no-op, the same two
    processes both decide against the weak champion and the worse one writes last. If this
    stops failing the race (a renamed lock, a moved alias write), the test above proves nothing."""
    name, v = registered(cfg, runs, "weak", "medium", "strong")
    promote(client, name, candidate=v["weak"], lock=FAST_LOCK)
    outcomes = _race(env, name, v, without_lock=True)
    for role in ("medium", "strong"):
        assert outcomes[role]["decision"]["champion"]["version"] == v["weak"], role
        assert outcomes[role]["decision"]["acted"], role
    assert aliases(client, name)[CHAMPION] == v["medium"]


def _promote_in_child(uri, name, version, role, events, barrier, results, no_lock) -> None:
    import contextlib

    import pipeline.registry.promotion as registry  # where promote() finds the lock

    writes: list[str] = []
    original = MlflowClient.set_registered_model_alias

    strong_wrote, medium_at_write = events

    def hooked_write(self, model_name, alias, alias_version):
        if alias == CHAMPION and role == "medium":
            medium_at_write.set()  # it has decided: the strong one may write now
            strong_wrote.wait(15)
        if alias == CHAMPION and role == "strong":
            medium_at_write.wait(15)
        original(self, model_name, alias, alias_version)
        if alias == CHAMPION:
            writes.append(str(alias_version))
            if role == "strong":
                strong_wrote.set()

    MlflowClient.set_registered_model_alias = hooked_write
    if no_lock:

        class NoLock:
            def ensure_held(self) -> None:
                pass

        assert hasattr(registry, "PromotionLock")
        registry.PromotionLock = lambda *a, **k: contextlib.nullcontext(NoLock())
    client = connect(uri)
    barrier.wait(120)
    decision = promote(client, name, candidate=version, lock=FAST_LOCK).to_dict()
    results.put((role, decision, writes))


def _hold_lock(uri: str, name: str, log: str, hold_s: float) -> None:
    client = connect(uri)
    with PromotionLock(client, name, LockSettings(settle_s=0.3, poll_s=0.05, timeout_s=60)):
        start = time.time()
        time.sleep(hold_s)
        with open(log, "a") as f:
            f.write(f"{start} {time.time()}\n")


def test_promotion_lock_is_mutually_exclusive_across_processes(env, cfg, runs, tmp_path):
    name, _ = registered(cfg, runs, "weak")
    log = tmp_path / "intervals.txt"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hold_lock, args=(env.uri, name, str(log), 1.0)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    intervals = sorted(tuple(map(float, line.split())) for line in log.read_text().splitlines())
    assert len(intervals) == 3
    for (_, end), (start, _) in itertools.pairwise(intervals):
        assert start >= end, f"two holders at once: {intervals}"


def test_a_stale_lease_is_taken_over_and_a_live_one_times_out(client, cfg, runs):
    name, _ = registered(cfg, runs, "weak")
    # Not renewed, declaring a 1 s lease: a waiter takes it once it has seen it unchanged for 1 s.
    dead = {"token": "dead", "host": "gone", "pid": 1, "beat": 7, "ttl_s": 1.0}
    client.set_registered_model_tag(name, PROMOTION_LOCK_TAG, json.dumps(dead))
    with PromotionLock(client, name, FAST_LOCK):
        live = json.loads(client.get_registered_model(name).tags[PROMOTION_LOCK_TAG])
        assert live["token"] != "dead"
        impatient = LockSettings(settle_s=0.3, poll_s=0.1, timeout_s=1.0)
        with (
            pytest.raises(RegistryError, match="holds the lock"),
            PromotionLock(client, name, impatient),
        ):
            pass
    assert PROMOTION_LOCK_TAG not in client.get_registered_model(name).tags


def test_a_renewed_lease_holds_whatever_its_holders_clock_says(client, cfg, runs):
    """Another machine whose clock is an hour behind keeps renewing its lease: its `expires`
    looks long past here, yet the lease is live and must not be taken."""
    name, _ = registered(cfg, runs, "weak")
    stop = threading.Event()

    def holder_elsewhere() -> None:
        beat = 0
        while not stop.is_set():
            beat += 1
            lease = {"token": "other", "host": "far", "pid": 9, "beat": beat, "ttl_s": 2.0}
            lease["expires"] = time.time() - 3600 + 2.0  # its clock is an hour behind ours
            client.set_registered_model_tag(name, PROMOTION_LOCK_TAG, json.dumps(lease))
            stop.wait(0.2)

    thread = threading.Thread(target=holder_elsewhere, daemon=True)
    thread.start()
    try:
        time.sleep(0.3)
        with (
            pytest.raises(RegistryError, match="holds the lock"),
            PromotionLock(client, name, LockSettings(settle_s=0.3, poll_s=0.1, timeout_s=4.0)),
        ):
            pass
    finally:
        stop.set()
        thread.join()
    # Its holder gone, the same lease is free one ttl later.
    with PromotionLock(client, name, LockSettings(settle_s=1.0, poll_s=0.1, timeout_s=60.0)):
        assert json.loads(client.get_registered_model(name).tags[PROMOTION_LOCK_TAG])["token"] != (
            "other"
        )


@pytest.mark.parametrize("garbage", ["not json", '"a string"', "[1, 2]", '{"token": 5}'])
def test_a_malformed_lease_tag_is_taken_over_with_a_warning(client, cfg, runs, garbage, caplog):
    name, _ = registered(cfg, runs, "weak")
    client.set_registered_model_tag(name, PROMOTION_LOCK_TAG, garbage)
    with caplog.at_level("WARNING"), PromotionLock(client, name, FAST_LOCK):
        pass
    assert "not a lease" in caplog.text
    assert PROMOTION_LOCK_TAG not in client.get_registered_model(name).tags


def test_a_lease_not_renewed_for_its_ttl_is_lost(client, cfg, runs, monkeypatch):
    """MLflow unreachable for longer than the lease: the holder must not act on it any more."""
    name, _ = registered(cfg, runs, "weak")
    settings = LockSettings(ttl_s=3.0, settle_s=0.5, poll_s=0.1, timeout_s=60.0)
    with PromotionLock(client, name, settings) as held:
        held.ensure_held()

        def outage(*args, **kwargs):
            raise RegistryError("MLflow is down")

        monkeypatch.setattr(held, "_write", outage)
        time.sleep(4.0)
        with pytest.raises(RegistryError, match="lost the promotion or rollback lock"):
            held.ensure_held()
        monkeypatch.undo()


# --- queries ------------------------------------------------------------------------------------


def test_best_lists_runs_by_metric_with_their_versions(client, cfg, runs):
    name, v = registered(cfg, runs, "medium", "strong")
    promote(client, name, candidate=v["medium"], lock=FAST_LOCK)
    # This module's experiment holds the weak and medium runs (strong is trained_model's).
    rows = best_runs(client, cfg.tracking.experiment, "best_val_acc", top=2)
    assert [r["run_id"] for r in rows] == [runs["weak"], runs["medium"]]  # weak logged 0.99
    medium = next(r for r in rows if r["run_id"] == runs["medium"])
    assert {"name": name, "version": v["medium"], "aliases": [CHAMPION]} in medium["versions"]

    filtered = best_runs(
        client, cfg.tracking.experiment, filter_string="params.`model.name` = 'cifar_resnet20'"
    )
    assert len(filtered) == 2
    assert (
        best_runs(client, cfg.tracking.experiment, filter_string="params.`model.name` = 'x'") == []
    )
    lowest = best_runs(client, cfg.tracking.experiment, "test_acc", top=1, ascending=True)
    assert lowest[0]["run_id"] == runs["medium"]


def test_registered_versions_show_aliases_metrics_and_tags(client, cfg, runs):
    name, v = registered(cfg, runs, "medium", "strong")
    promote(client, name, candidate=v["medium"], lock=FAST_LOCK)
    promote(client, name, candidate=v["strong"], lock=FAST_LOCK)
    rows = registered_versions(client, name)
    assert [r["version"] for r in rows] == [v["strong"], v["medium"]]
    assert rows[0]["aliases"] == [CHAMPION] and rows[1]["aliases"] == [PREVIOUS_CHAMPION]
    assert rows[0]["metrics"]["test_acc"] > 0.8
    assert rows[0]["tags"]["promotion.decision"] == "promoted"


# --- the CLI ------------------------------------------------------------------------------------


def cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result


def test_cli_promote_rollback_best_and_registered(env, cfg, runs):
    name, v = registered(cfg, runs, "weak", "strong")
    assert cli("promote", name, "--candidate", v["weak"]).exit_code == 0

    dry = cli("promote", name, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["outcome"] == "would promote"

    done = cli("promote", name, "--min-improvement", "0.2")
    assert done.exit_code == 0 and "promoted" in done.stdout and f"v{v['weak']}" in done.stdout

    shown = cli("models", "registered", name, "--json")
    assert [r["aliases"] for r in json.loads(shown.stdout)] == [[CHAMPION], [PREVIOUS_CHAMPION]]

    best = cli("best", "--experiment", cfg.tracking.experiment, "--top", "1", "--json")
    assert [r["run_id"] for r in json.loads(best.stdout)] == [runs["weak"]]

    back = cli("rollback", name)
    assert back.exit_code == 0 and f"champion v{v['strong']} -> v{v['weak']}" in back.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["promote", "no-such-model"], "no registered model 'no-such-model'"),
        (["promote", "{name}", "--candidate", "99"], "no version or alias '99'"),
        (["promote", "{name}", "--data", "/no/such/data"], "/no/such/data"),
        (["rollback", "{name}"], "no 'previous-champion' alias"),
        (["models", "registered", "no-such-model"], "no registered model 'no-such-model'"),
        (["best", "--experiment", "no-such-exp"], "no experiment 'no-such-exp'"),
        (["best", "--experiment", EXPERIMENT, "--filter", "params.x == = 'y'"], "filter"),
    ],
    ids=[
        "unknown-model",
        "unknown-version",
        "missing-data",
        "no-previous",
        "registered",
        "exp",
        "filter",
    ],
)
def test_cli_user_errors_are_one_clear_line_and_change_nothing(env, cfg, runs, args, expected):
    name, v = registered(cfg, runs, "weak")
    promote(connect(env.uri), name, lock=FAST_LOCK)
    result = cli(*[a.format(name=name) for a in args])
    assert result.exit_code == 2, result.output
    assert "error:" in result.stderr and expected in result.stderr.replace("\n", " ")
    assert aliases(MlflowClient(env.uri), name) == {CHAMPION: v["weak"]}


def test_unreachable_server_fails_fast_naming_the_uri(env):
    from tests.conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run(
        [PIPELINE, "promote", "any", "--tracking-uri", dead, "--set", "tracking.timeout_s=2"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MLFLOW_TRACKING_URI": ""},
    )
    assert result.returncode == 2 and dead in result.stderr and "Traceback" not in result.stderr


def _tampered_copy(digits, tmp_path: Path, labels) -> tuple[str, str]:
    """A copy of the digits whose first test shard was rewritten with `labels(old) -> new`, the
    manifest untouched (as if edited in place by someone); (dataset, shard file)."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    src, manifest = digits
    dst = tmp_path / "tampered"
    shutil.copytree(src, dst)
    shard = dst / manifest.split("test").shards[0].path
    table = pq.read_table(shard)
    new = pa.array(labels(table.column("label").to_numpy()), type=pa.int64())
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", new), shard)
    return str(dst), str(shard)


@pytest.mark.parametrize(
    "labels", [lambda y: y * 0, lambda y: y + 100], ids=["all-zero", "out-of-range"]
)
def test_the_gate_refuses_data_that_does_not_match_its_manifest(
    env, cfg, runs, digits, tmp_path, labels
):
    name, v = registered(cfg, runs, "weak", "strong")
    promote(connect(env.uri), name, candidate=v["weak"], lock=FAST_LOCK)
    data, shard = _tampered_copy(digits, tmp_path, labels)
    for args in (
        ["promote", name, "--candidate", v["strong"], "--data", data, "--dry-run"],
        ["evaluate", "--model", f"models:/{name}/{v['strong']}", "--data", data],
    ):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
        assert shard in result.stderr and "does not match its manifest" in result.stderr
        assert "Traceback" not in result.output
    assert aliases(MlflowClient(env.uri), name) == {CHAMPION: v["weak"]}


def test_the_class_floor_ignores_classes_without_held_out_rows(monkeypatch):
    import pipeline.evaluation
    from pipeline.registry import decide
    from pipeline.registry.promotion import _evaluate

    scored = {  # class "b" has no row in the held-out split
        "acc": 0.9,
        "loss": 0.3,
        "count": 10,
        "per_class_accuracy": {"a": 0.9, "b": 0.0},
        "confusion": [[9, 1], [0, 0]],
    }
    monkeypatch.setattr(pipeline.evaluation, "evaluate_model", lambda *a, **k: scored)
    candidate = _evaluate(Path("unused"), "2", "data", "test", None)
    assert candidate.per_class == {"a": 0.9}
    assert decide(candidate, None, 0.0, class_floor=0.5)[0]


def test_every_version_has_a_model_card_that_follows_its_promotion(env, cfg, runs):
    name, v = registered(cfg, runs, "strong")
    client = MlflowClient(env.uri)
    mv = client.get_model_version(name, v["strong"])
    assert mv.tags["model_card"] == f"model_cards/{name}-v{v['strong']}.md"
    shown = cli("models", "registered", name, "--version", v["strong"])
    assert shown.exit_code == 0, shown.output
    card = shown.stdout
    assert card.startswith(f"# {name} version {v['strong']}")
    run = client.get_run(runs["strong"])
    for expected in (
        "## Data",
        run.data.tags["pipeline.dataset_digest"],
        "## Training recipe",
        "model.name: cifar_resnet20",
        "## Input",
        "## Lineage",
        runs["strong"],
        "not yet through the promotion gate",
    ):
        assert expected in card, expected
    promote(connect(env.uri), name, candidate=v["strong"], lock=FAST_LOCK)
    card = cli("models", "registered", name, "--version", "champion").stdout
    assert "Aliases: champion" in card and "- decision: promoted" in card
