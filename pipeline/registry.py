"""The MLflow model registry: register versions, promote by re-evaluation, roll back, query.

Aliases only (stages are deprecated): `champion` is what services load, `previous-champion` the
version it replaced. `promote` re-evaluates the candidate and the champion on the same held-out
data now (logged numbers may come from other data or code) and moves `champion` only when the
candidate wins by the configured margin with no class under the configured floor. Alias writes are
last-writer-wins, so promotions and rollbacks of one model are serialised by `PromotionLock`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig, StorageConfig
from pipeline.errors import RegistryError
from pipeline.tags import (
    CHAMPION,
    COMPARISON_DIR,
    CONFIG_DIGEST_TAG,
    DATASET_DIGEST_TAG,
    DECISION_PREFIX,
    MODEL_META_FILE,
    PREVIOUS_CHAMPION,
    PROMOTION_LOCK_TAG,
    ROLLED_BACK_TAG,
    RUN_NAME_TAG,
    SUMMARY_METRICS,
)

_EPS = 1e-9  # accuracies are ratios of counts: differences below this are float noise


def version_tags(run: Any) -> dict[str, str]:
    """Tags that say where a version came from: data, code, config and how well it did."""
    tags = run.data.tags
    params = run.data.params
    out = {
        "dataset_digest": tags.get(DATASET_DIGEST_TAG, ""),
        "git_commit": tags.get("git_commit", "unknown"),
        "config_digest": tags.get(CONFIG_DIGEST_TAG, ""),
        "run_name": tags.get(RUN_NAME_TAG, ""),
        "model": params.get("model.name", ""),
    }
    for key in ("test_acc", "test_top5", "test_loss", "best_val_acc"):
        if key in run.data.metrics:
            out[key] = f"{run.data.metrics[key]:.6f}"
    return {k: v for k, v in out.items() if v}


def register_run_model(cfg: PipelineConfig, run_id: str):
    """Register the run's logged model `model` as a new version of `registry.model_name`."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = cfg.tracking.resolved_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    return mlflow.register_model(
        logged_model_uri(client, run, "model"), cfg.registry.model_name, tags=version_tags(run)
    )


def logged_model_uri(client, run, name: str) -> str:
    """`models:/<model id>` of the model `name` that `run` logged (MLflow 3 keeps logged models
    outside the run's artifacts; registering `runs:/<id>/<name>` only warns and resolves to
    this), or `runs:/<id>/<name>` for a run that logged none of that name."""
    outputs = run.outputs.model_outputs if run.outputs else []
    for output in outputs:
        model = client.get_logged_model(output.model_id)
        if model.name == name:
            return model.model_uri
    return f"runs:/{run.info.run_id}/{name}"


# ---------------------------------------------------------------------------------------------
# Connecting, and MLflow errors as user errors


def connect(tracking_uri: str, timeout_s: float = 10.0):
    """An MlflowClient for `tracking_uri`, after a bounded reachability check.

    MLflow's own HTTP retries take about four minutes to give up on a dead server; checking
    /health first turns that into a clear error naming the URI within `timeout_s`. The URI also
    becomes MLflow's global one, which `models:/` downloads use.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import check_tracking_server

    check_tracking_server(tracking_uri, timeout_s)
    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri)


@contextlib.contextmanager
def mlflow_errors(what: str) -> Iterator[None]:
    """Re-raise MLflow's exceptions as RegistryError prefixed with `what` (a model, a URI)."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise RegistryError(f"{what}: {exc.message}") from None


def registered_model(client, name: str):
    """The registered model `name`, or an error listing the names that do exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"registered model {name!r}: {exc.message}") from None
    known = sorted(m.name for m in client.search_registered_models(max_results=50))
    listing = ", ".join(known) if known else "none"
    raise RegistryError(
        f"no registered model {name!r} at {client.tracking_uri} (registered models: {listing}); "
        "check the name, or the tracking URI (--tracking-uri / MLFLOW_TRACKING_URI)"
    )


def resolve_version(client, name: str, ref: str | None = None):
    """A ModelVersion of `name` by number ("3"), alias ("champion") or, with None, the newest."""
    from mlflow.exceptions import MlflowException

    model = registered_model(client, name)
    if ref is None:
        versions = client.search_model_versions(f"name = '{_quote(name)}'")
        if not versions:
            raise RegistryError(f"registered model {name!r} has no versions yet")
        return max(versions, key=lambda v: int(v.version))
    try:
        if ref.isdigit():
            return client.get_model_version(name, ref)
        return client.get_model_version_by_alias(name, ref)
    except MlflowException:
        aliases = ", ".join(f"{a}->v{v}" for a, v in sorted(model.aliases.items())) or "none"
        raise RegistryError(
            f"registered model {name!r} has no version or alias {ref!r} (aliases: {aliases}); "
            f"`pipeline models registered {name}` lists them"
        ) from None


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def aliases_of(client, name: str) -> dict[str, str]:
    """alias -> version (as str: the SQL store says int, the REST store str). Read from the
    registered model: search_model_versions leaves aliases empty in MLflow 3."""
    return {a: str(v) for a, v in registered_model(client, name).aliases.items()}


def download_version(client, name: str, version: str, dst: str | Path) -> Path:
    """Download `models:/name/version` into `dst`; returns the local model directory."""
    import mlflow

    with mlflow_errors(f"models:/{name}/{version}"):
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}",
            dst_path=str(dst),
            tracking_uri=client.tracking_uri,
        )
    return Path(local)


# ---------------------------------------------------------------------------------------------
# Promotion: the decision (pure), the evaluations it compares, and the record it leaves


@dataclass
class Evaluation:
    """A version's scores on the held-out data, recomputed by `evaluation.evaluate_model`."""

    version: str
    acc: float
    loss: float
    count: int
    per_class: dict[str, float]


@dataclass
class PromotionDecision:
    name: str
    candidate: Evaluation
    champion: Evaluation | None
    promote: bool
    reason: str
    data_uri: str
    split: str
    data_digest: str
    min_improvement: float
    class_floor: float
    dry_run: bool = False
    acted: bool = False  # the aliases were moved (never on a dry run)
    decided_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def outcome(self) -> str:
        if not self.promote:
            return "refused"
        return "would promote" if self.dry_run else "promoted"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "outcome": self.outcome}

    def to_markdown(self) -> str:
        champ = self.champion
        rows = [
            "| | candidate | champion |",
            "|---|---|---|",
            f"| version | {self.candidate.version} | {champ.version if champ else '-'} |",
            f"| accuracy | {self.candidate.acc:.4f} | {f'{champ.acc:.4f}' if champ else '-'} |",
            f"| loss | {self.candidate.loss:.4f} | {f'{champ.loss:.4f}' if champ else '-'} |",
        ]
        for cls, acc in self.candidate.per_class.items():
            other = f"{champ.per_class.get(cls, float('nan')):.4f}" if champ else "-"
            rows.append(f"| class {cls} | {acc:.4f} | {other} |")
        return "\n".join(
            [
                f"# Promotion of {self.name} version {self.candidate.version}: {self.outcome}",
                "",
                f"{self.reason}",
                "",
                f"Data: {self.data_uri} [{self.split}], digest {self.data_digest[:16]}; "
                f"margin {self.min_improvement:g}, class floor {self.class_floor:g}; "
                f"{self.decided_at}",
                "",
                *rows,
                "",
            ]
        )


def decide(
    candidate: Evaluation,
    champion: Evaluation | None,
    min_improvement: float,
    class_floor: float,
) -> tuple[bool, str]:
    """(promote?, reason). The candidate must be strictly better than the champion by at least
    `min_improvement` (so equal scores never churn the alias), and no class may be under
    `class_floor`; the floor also applies to the first version."""
    low = {c: a for c, a in candidate.per_class.items() if a + _EPS < class_floor}
    if low:
        listed = ", ".join(f"{c!r} {a:.4f}" for c, a in sorted(low.items()))
        return False, f"class accuracy below the floor {class_floor:g}: {listed}"
    if champion is None:
        return True, f"no champion yet: version {candidate.version} becomes the first"
    if candidate.version == champion.version:
        return False, f"version {candidate.version} is already the champion"
    delta = candidate.acc - champion.acc
    scores = (
        f"accuracy {candidate.acc:.4f} vs champion v{champion.version} {champion.acc:.4f} "
        f"({delta:+.4f})"
    )
    if delta <= _EPS:
        return False, f"not better than the champion: {scores}"
    if delta + _EPS < min_improvement:
        return False, f"better by less than the margin {min_improvement:g}: {scores}"
    return True, f"better by at least the margin {min_improvement:g}: {scores}"


def _evaluate(model_dir: Path, version: str, data_uri: str, split: str, storage) -> Evaluation:
    from pipeline.evaluation import evaluate_model

    result = evaluate_model(str(model_dir), data_uri, split, storage)
    return Evaluation(
        version=version,
        acc=float(result["acc"]),
        loss=float(result["loss"]),
        count=int(result["count"]),
        per_class={k: float(v) for k, v in result["per_class_accuracy"].items()},
    )


def _dataset_uri(model_dir: Path, name: str, version: str) -> str:
    from pipeline.model_package import _find

    meta = json.loads(_find(model_dir, MODEL_META_FILE).read_text())
    uri = (meta.get("dataset") or {}).get("uri")
    if not uri:
        raise RegistryError(
            f"models:/{name}/{version}: its {MODEL_META_FILE} records no dataset URI; pass --data"
        )
    return uri


class _Evaluator:
    """Evaluates versions on one dataset split, each at most once (versions are immutable)."""

    def __init__(self, client, name: str, data_uri: str | None, split: str, storage, tmp: Path):
        self.client, self.name, self.tmp = client, name, tmp
        self.data_uri, self.split, self.storage = data_uri, split, storage
        self._done: dict[str, Evaluation] = {}

    def __call__(self, version: str) -> Evaluation:
        if version not in self._done:
            local = download_version(self.client, self.name, version, self.tmp / f"v{version}")
            if self.data_uri is None:  # the candidate (evaluated first) names the data
                self.data_uri = _dataset_uri(local, self.name, version)
            self._done[version] = _evaluate(local, version, self.data_uri, self.split, self.storage)
        return self._done[version]


def promote(
    client,
    name: str,
    *,
    candidate: str | None = None,
    data_uri: str | None = None,
    split: str = "test",
    min_improvement: float = 0.0,
    class_floor: float = 0.0,
    dry_run: bool = False,
    storage: StorageConfig | None = None,
    lock: LockSettings | None = None,
) -> PromotionDecision:
    """Move `champion` to `candidate` (default: the newest version) if it beats the champion.

    Both are evaluated now on the same data: `data_uri`, else the dataset the candidate was
    trained on (its pipeline_model.json), split `split`. Outside a dry run the decision is taken
    under `PromotionLock`, with the champion re-read there, and recorded as version tags on the
    candidate and a comparison artifact in its run; a refusal moves no alias.
    """
    from pipeline.data.shards import read_manifest

    cand = resolve_version(client, name, candidate)
    version = str(cand.version)
    if cand.tags.get(ROLLED_BACK_TAG):
        raise RegistryError(
            f"{name} version {version} was rolled back ({cand.tags[ROLLED_BACK_TAG]}); "
            f"delete its tag {ROLLED_BACK_TAG!r} to make it a candidate again"
        )
    with tempfile.TemporaryDirectory(prefix="promote-") as tmp:
        evaluate = _Evaluator(client, name, data_uri, split, storage, Path(tmp))
        cand_eval = evaluate(version)  # outside the lock: a version never changes
        digest = read_manifest(evaluate.data_uri, storage).digest
        champion = aliases_of(client, name).get(CHAMPION)
        if champion is not None and champion != version:
            evaluate(champion)  # usually the champion the lock will find: keep the lock short

        def decision(champion: str | None) -> PromotionDecision:
            champ_eval = evaluate(champion) if champion is not None else None
            ok, reason = decide(cand_eval, champ_eval, min_improvement, class_floor)
            return PromotionDecision(
                name=name,
                candidate=cand_eval,
                champion=champ_eval,
                promote=ok,
                reason=reason,
                data_uri=evaluate.data_uri,
                split=split,
                data_digest=digest,
                min_improvement=min_improvement,
                class_floor=class_floor,
                dry_run=dry_run,
            )

        if dry_run:
            return decision(champion)
        with PromotionLock(client, name, lock or LockSettings()) as held:
            # Another promotion may have moved the champion since we looked: decide again.
            result = decision(aliases_of(client, name).get(CHAMPION))
            if result.promote:
                held.ensure_held()
                _move_champion(client, name, version, result.champion)
                result.acted = True
            if result.champion is None or result.champion.version != version:
                _record(
                    client, version, cand.run_id, result
                )  # (re-promoting the champion records nothing)
    return result


def _move_champion(client, name: str, version: str, old: Evaluation | None) -> None:
    with mlflow_errors(f"registered model {name!r}"):
        if old is not None:  # previous-champion first: `champion` is never left without history
            client.set_registered_model_alias(name, PREVIOUS_CHAMPION, old.version)
        client.set_registered_model_alias(name, CHAMPION, version)
        now = aliases_of(client, name).get(CHAMPION)
    if now != version:
        raise RegistryError(
            f"registered model {name!r}: champion is v{now} right after setting it to v{version}; "
            "something moves aliases without `pipeline promote` (it ignores the promotion lock)"
        )


def _record(client, version: str, run_id: str | None, decision: PromotionDecision) -> None:
    """Version tags for the decision, and the comparison as JSON + Markdown in the run."""
    champ = decision.champion
    tags = {
        "decision": decision.outcome,
        "reason": decision.reason[:4000],
        "candidate_acc": f"{decision.candidate.acc:.6f}",
        "champion_acc": f"{champ.acc:.6f}" if champ else "",
        "champion_version": champ.version if champ else "",
        "data_uri": decision.data_uri,
        "data_digest": decision.data_digest,
        "split": decision.split,
        "decided_at": decision.decided_at,
    }
    stamp = decision.decided_at.replace(":", "").replace("+0000", "Z") + "-" + uuid.uuid4().hex[:6]
    with mlflow_errors(f"models:/{decision.name}/{version}"):
        for key, value in tags.items():
            client.set_model_version_tag(decision.name, version, DECISION_PREFIX + key, value)
        if run_id:
            base = f"{COMPARISON_DIR}/{stamp}-v{version}"
            client.log_dict(run_id, decision.to_dict(), f"{base}.json")
            client.log_text(run_id, decision.to_markdown(), f"{base}.md")


def rollback(client, name: str, lock: LockSettings | None = None) -> tuple[str, str]:
    """Move `champion` back to `previous-champion`; returns (from_version, to_version).

    The replaced version is tagged `pipeline.rolled_back`, so a nightly `promote` does not put it
    straight back; `previous-champion` is removed (there is no older history to point at).
    """
    with PromotionLock(client, name, lock or LockSettings()) as held:
        aliases = aliases_of(client, name)
        previous, current = aliases.get(PREVIOUS_CHAMPION), aliases.get(CHAMPION)
        if previous is None:
            raise RegistryError(
                f"registered model {name!r} has no {PREVIOUS_CHAMPION!r} alias to roll back to "
                f"(champion: {f'v{current}' if current else 'none'})"
            )
        held.ensure_held()
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        with mlflow_errors(f"registered model {name!r}"):
            client.set_registered_model_alias(name, CHAMPION, previous)
            client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
            if current is not None and current != previous:
                client.set_model_version_tag(
                    name, current, ROLLED_BACK_TAG, f"{stamp}: champion returned to v{previous}"
                )
    return current or "", previous


# ---------------------------------------------------------------------------------------------
# The promotion lock


@dataclass
class LockSettings:
    ttl_s: float = 120.0  # a lease not renewed for this long is free (its holder died)
    timeout_s: float = 600.0  # give up waiting for another promotion after this long
    settle_s: float = 2.0  # wait after writing the lease before trusting it (see PromotionLock)
    poll_s: float = 0.5


class PromotionLock:
    """Mutual exclusion for one registered model's aliases, across processes and machines.

    MLflow has no compare-and-swap, so the lease is a registered-model tag written with Fischer's
    timed mutual-exclusion protocol: read the tag; if it is free (absent or expired), write our
    token, then wait `settle_s` and read it again; it is ours only if our token is still there.
    That is safe as long as every writer's read-to-write takes less than `settle_s / 2`, which we
    measure and enforce (a slower attempt backs off). A heartbeat renews the lease every ttl/3
    so long evaluations keep it; the holder re-checks it (`ensure_held`) right before moving an
    alias. With a SQLite store an flock beside the database also serialises local processes,
    and keeps SQLite's single writer from being hammered.
    """

    tag = PROMOTION_LOCK_TAG  # the registered-model tag that holds the lease
    purpose = (
        "promotion or rollback"  # what the lock serialises, for messages and the lock file's name
    )

    def __init__(self, client, name: str, settings: LockSettings | None = None) -> None:
        self.client, self.name = client, name
        self.settings = settings or LockSettings()
        self.token = uuid.uuid4().hex
        self._file: Any = None
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # -- the lease tag ---------------------------------------------------------------------------
    def _read(self) -> dict[str, Any] | None:
        with mlflow_errors(f"registered model {self.name!r}"):
            raw = registered_model(self.client, self.name).tags.get(self.tag)
        try:
            return json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return None  # unreadable: treat as free, the settle check still arbitrates

    def _write(self) -> None:
        lease = {
            "token": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "expires": time.time() + self.settings.ttl_s,
        }
        with mlflow_errors(f"registered model {self.name!r}"):
            self.client.set_registered_model_tag(self.name, self.tag, json.dumps(lease))

    @staticmethod
    def _free(lease: dict[str, Any] | None) -> bool:
        return lease is None or float(lease.get("expires", 0)) < time.time()

    def _ours(self, lease: dict[str, Any] | None) -> bool:
        return lease is not None and lease.get("token") == self.token and not self._free(lease)

    # -- acquire / release -----------------------------------------------------------------------
    def __enter__(self) -> PromotionLock:
        deadline = time.monotonic() + self.settings.timeout_s
        self._lock_file(deadline)
        try:
            self._acquire(deadline)
        except BaseException:
            self._unlock_file()
            raise
        self._heartbeat = threading.Thread(target=self._renew, daemon=True)
        self._heartbeat.start()
        return self

    def _acquire(self, deadline: float) -> None:
        s = self.settings
        while True:
            started = time.monotonic()
            lease = self._read()
            if self._free(lease) or self._ours(lease):
                try:
                    self._write()
                except RegistryError:
                    # Two first writers of the tag race on the store's unique key (SQLite:
                    # IntegrityError); the loser backs off and reads again like any waiter.
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(s.poll_s * (1 + random.random()))
                    continue
                quick = time.monotonic() - started < s.settle_s / 2
                time.sleep(s.settle_s)
                if quick and self._ours(self._read()):
                    return
                if not quick:  # we may have overwritten a lease taken after our read: undo it
                    self._release_tag()
            if time.monotonic() > deadline:
                raise RegistryError(self._busy_message(lease))
            time.sleep(s.poll_s * (1 + random.random()))  # jitter: two waiters don't lock-step

    def _busy_message(self, lease: dict[str, Any] | None) -> str:
        holder = (
            f"held by {lease.get('host')} pid {lease.get('pid')} until "
            f"{datetime.fromtimestamp(float(lease.get('expires', 0)), UTC).isoformat()}"
            if lease
            else "contended"
        )
        return (
            f"registered model {self.name!r}: another {self.purpose} holds the lock "
            f"({holder}); gave up after {self.settings.timeout_s:g}s. If that process is gone, "
            f"the lease expires by itself, or delete the model's tag {self.tag!r}"
        )

    def ensure_held(self) -> None:
        """Raise unless the lease is still ours (it may have expired under a stalled process)."""
        if self._lost.is_set() or not self._ours(self._read()):
            raise RegistryError(
                f"registered model {self.name!r}: lost the {self.purpose} lock (the process "
                f"stalled longer than the {self.settings.ttl_s:g}s lease?); nothing was changed, "
                "run it again"
            )

    def _renew(self) -> None:
        while not self._stop.wait(self.settings.ttl_s / 3):
            try:
                if not self._ours(self._read()):
                    self._lost.set()
                    return
                self._write()
            except Exception:  # a failed renewal is retried; ensure_held catches an expiry
                continue

    def _release_tag(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            lease = self._read()
            if lease is not None and lease.get("token") == self.token:
                self.client.delete_registered_model_tag(self.name, self.tag)
        except (MlflowException, RegistryError):
            pass  # the lease expires by itself

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        self._release_tag()
        self._unlock_file()

    # -- the local file lock (SQLite stores) -----------------------------------------------------
    def _lock_file(self, deadline: float) -> None:
        uri = self.client.tracking_uri
        if not uri.startswith("sqlite:///"):
            return
        db = Path(uri.removeprefix("sqlite:///")).expanduser()
        lock_path = db.parent / f".{db.name}.{self.purpose.split()[0]}.lock"
        self._file = open(lock_path, "a")  # noqa: SIM115
        while True:
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._unlock_file()
                    raise RegistryError(self._busy_message(None)) from None
                time.sleep(self.settings.poll_s)

    def _unlock_file(self) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the flock
            self._file = None


# ---------------------------------------------------------------------------------------------
# Queries


def best_runs(
    client,
    experiment: str,
    metric: str = "best_val_acc",
    filter_string: str = "",
    top: int = 5,
    ascending: bool | None = None,
) -> list[dict[str, Any]]:
    """The `top` runs of `experiment` by `metric` (descending; ascending for *loss* metrics
    unless told), each with its registered versions and their aliases."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = sorted(e.name for e in client.search_experiments(max_results=50))
        raise RegistryError(
            f"no experiment {experiment!r} at {client.tracking_uri} (experiments: "
            f"{', '.join(known) or 'none'}); pass --experiment"
        )
    if ascending is None:
        ascending = "loss" in metric
    # Runs without the metric would sort first or last depending on the store: filter them out.
    has_metric = f"metrics.`{metric}` {'< 1e308' if ascending else '> -1e308'}"
    where = f"{has_metric} and {filter_string}" if filter_string.strip() else has_metric
    with mlflow_errors(f"experiment {experiment!r}, filter {filter_string!r}"):
        runs = client.search_runs(
            [exp.experiment_id],
            where,
            order_by=[f"metrics.`{metric}` {'ASC' if ascending else 'DESC'}"],
            max_results=top,
        )
    alias_cache: dict[str, dict[str, list[str]]] = {}
    return [
        {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "metric": metric,
            "value": run.data.metrics[metric],
            "model": run.data.params.get("model.name", ""),
            "metrics": {k: run.data.metrics[k] for k in SUMMARY_METRICS if k in run.data.metrics},
            "started": _iso(run.info.start_time),
            "versions": _run_versions(client, run.info.run_id, alias_cache),
        }
        for run in runs
    ]


def _run_versions(client, run_id: str, cache: dict[str, dict[str, list[str]]]) -> list[dict]:
    out = []
    for v in client.search_model_versions(f"run_id = '{run_id}'"):
        if v.name not in cache:
            by_version: dict[str, list[str]] = {}
            for alias, version in aliases_of(client, v.name).items():
                by_version.setdefault(version, []).append(alias)
            cache[v.name] = by_version
        out.append(
            {
                "name": v.name,
                "version": str(v.version),
                "aliases": sorted(cache[v.name].get(str(v.version), [])),
            }
        )
    return sorted(out, key=lambda d: (d["name"], int(d["version"])))


def registered_versions(client, name: str, limit: int = 50) -> list[dict[str, Any]]:
    """Newest first: each version's aliases, run, summary metrics and tags."""
    from mlflow.exceptions import MlflowException

    by_version: dict[str, list[str]] = {}
    for alias, version in aliases_of(client, name).items():
        by_version.setdefault(version, []).append(alias)
    versions = sorted(
        client.search_model_versions(f"name = '{_quote(name)}'"),
        key=lambda v: int(v.version),
        reverse=True,
    )[:limit]
    rows = []
    for v in versions:
        try:
            metrics = client.get_run(v.run_id).data.metrics if v.run_id else {}
        except MlflowException:  # the run was deleted; the version stays usable
            metrics = {}
        rows.append(
            {
                "version": str(v.version),
                "aliases": sorted(by_version.get(str(v.version), [])),
                "run_id": v.run_id,
                "created": _iso(v.creation_timestamp),
                "status": v.status,
                "metrics": {k: metrics[k] for k in SUMMARY_METRICS if k in metrics},
                "tags": dict(v.tags),
            }
        )
    return rows


def _iso(millis: int | None) -> str:
    if not millis:
        return ""
    return datetime.fromtimestamp(millis / 1000, UTC).isoformat(timespec="seconds")
