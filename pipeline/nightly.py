"""`pipeline nightly`: retrain on new data, unattended, and promote only a better model.

One run, in order:
1. take the nightly lock of the registered model (two runs at once: the second is refused);
2. if a nightly run already finished today, do nothing (unless `--force`);
3. diff today's dataset against the data the current champion was trained on (manifest digest and
   shard list, by sha256); with nothing new, stop there (unless `--force`);
4. train: fine-tune from the champion (`nightly.init: champion`) or from scratch, register the
   model as a new version;
5. promote it through the registry's gate (`registry.promote`): both models re-evaluated on
   today's held-out split, `champion` moved only if the candidate wins;
6. write a report (data, what changed, metrics, decision) as artifacts of a `nightly` MLflow run.

Any failure ends the nightly run as FAILED with the error in its report and exits non-zero; the
champion is only ever moved by step 5, under the promotion lock, so a failure leaves it alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.errors import NightlyError, PipelineError, RegistryError, root_cause
from pipeline.events import EventSink
from pipeline.registry import LockSettings, PromotionLock, aliases_of, mlflow_errors
from pipeline.storage import mask_credentials, strip_credentials
from pipeline.tags import (
    CHAMPION,
    KIND_TAG,
    MANIFEST_ARTIFACT,
    NIGHTLY_CANDIDATE_TAG,
    NIGHTLY_CHAMPION_AFTER_TAG,
    NIGHTLY_CHAMPION_BEFORE_TAG,
    NIGHTLY_DATE_TAG,
    NIGHTLY_DECISION_TAG,
    NIGHTLY_FORCED_TAG,
    NIGHTLY_LOCK_TAG,
    NIGHTLY_MODEL_TAG,
    NIGHTLY_REPORT_DIR,
    NIGHTLY_TRAINING_RUN_TAG,
)

log = logging.getLogger(__name__)


class NightlyLock(PromotionLock):
    """One nightly run per registered model at a time (same lease protocol as promotions)."""

    tag = NIGHTLY_LOCK_TAG
    purpose = "nightly run"


@dataclass
class DataChange:
    uri: str
    digest: str
    champion_digest: str | None
    new_shards: list[str] = field(default_factory=list)  # paths of shards not trained on
    removed_shards: list[str] = field(default_factory=list)
    new_rows: int = 0
    rows: int = 0
    shard_list_known: bool = True  # False: the champion's run predates manifest logging

    @property
    def changed(self) -> bool:
        return self.champion_digest is None or self.digest != self.champion_digest


@dataclass
class NightlyReport:
    date: str
    model_name: str
    decision: str  # promoted | refused | no-new-data | trained (promotion off) | failed | skipped
    reason: str
    forced: bool = False
    champion_before: str | None = None
    champion_after: str | None = None
    init: str | None = None  # "models:/NAME/V" fine-tuned from, or "scratch"
    data: DataChange | None = None
    training_run_id: str | None = None
    candidate_version: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    promotion: dict[str, Any] | None = None
    nightly_run_id: str | None = None
    nightly_run_url: str | None = None  # where to read the report (the MLflow run's page)
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    seconds: float = 0.0
    error: str | None = None

    def to_markdown(self) -> str:
        d = self.data
        lines = [
            f"# Nightly {self.date}: {self.decision}",
            "",
            self.reason,
            "",
            f"- model: {self.model_name}; champion before: "
            f"{_v(self.champion_before)}, after: {_v(self.champion_after)}",
        ]
        if d is not None:
            lines += [
                f"- data: {d.uri}, digest {d.digest[:16]} "
                f"(champion trained on {d.champion_digest[:16] if d.champion_digest else 'none'})",
                f"- new shards ({len(d.new_shards)}, {d.new_rows} rows of {d.rows}): "
                + (", ".join(d.new_shards) or "none")
                + ("" if d.shard_list_known else " (champion's shard list unknown)"),
                f"- removed shards: {', '.join(d.removed_shards) or 'none'}",
            ]
        if self.init:
            lines.append(f"- trained from: {self.init}; run {self.training_run_id}")
        if self.candidate_version:
            lines.append(f"- candidate: version {self.candidate_version}")
        if self.metrics:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(self.metrics.items()))
            lines.append(f"- metrics: {shown}")
        if self.promotion:
            p = self.promotion
            champ = p.get("champion") or {}
            lines.append(
                f"- promotion: {p['outcome']}: candidate acc {p['candidate']['acc']:.4f} vs "
                f"champion {champ.get('acc', float('nan')):.4f} on {p['data_uri']} [{p['split']}]"
            )
        if self.error:
            lines += ["", "## Error", "", "```", self.error, "```"]
        lines += ["", f"started {self.started_at}, took {self.seconds:.0f} s", ""]
        return "\n".join(lines)


def _v(version: str | None) -> str:
    return f"v{version}" if version else "none"


# ---------------------------------------------------------------------------------------------
# What is new


def _champion_data(client, name: str, version: str) -> tuple[str | None, dict[str, str] | None]:
    """(dataset digest, {shard path: sha256} or None) of the data the champion trained on."""
    import mlflow
    from mlflow.exceptions import MlflowException

    with mlflow_errors(f"models:/{name}/{version}"):
        mv = client.get_model_version(name, version)
    digest = mv.tags.get("dataset_digest")
    shards = None
    if mv.run_id:
        try:
            manifest = mlflow.artifacts.load_dict(
                f"runs:/{mv.run_id}/{MANIFEST_ARTIFACT}"
            )  # logged by every training run
            digest = digest or manifest.get("digest")
            shards = {
                s["path"]: s["sha256"]
                for info in manifest["splits"].values()
                for s in info["shards"]
            }
        except (MlflowException, OSError, KeyError):
            shards = None  # an older run without the artifact: the digest alone decides
    return digest, shards


def diff_data(manifest, uri: str, champion_digest, champion_shards) -> DataChange:
    current = {s.path: (s.sha256, s.rows) for info in manifest.splits.values() for s in info.shards}
    change = DataChange(
        uri=uri,
        digest=manifest.digest,
        champion_digest=champion_digest,
        rows=sum(rows for _, rows in current.values()),
        shard_list_known=champion_shards is not None,
    )
    if champion_shards is None:
        if change.changed:  # nothing to compare with: every shard counts as new
            change.new_shards = sorted(current)
            change.new_rows = change.rows
        return change
    known = set(champion_shards.values())
    change.new_shards = sorted(k for k, (sha, _) in current.items() if sha not in known)
    change.new_rows = sum(current[k][1] for k in change.new_shards)
    today = {sha for sha, _ in current.values()}
    change.removed_shards = sorted(k for k, sha in champion_shards.items() if sha not in today)
    return change


# ---------------------------------------------------------------------------------------------
# The run


def _finished_today(client, experiment_id: str | None, name: str, date: str):
    if experiment_id is None:
        return None
    runs = client.search_runs(
        [experiment_id],
        f"tags.`{KIND_TAG}` = 'nightly' and tags.`{NIGHTLY_DATE_TAG}` = '{date}' "
        f"and tags.`pipeline.model_name` = '{name}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"registered model {name!r}: {exc.message}") from None
        try:
            client.create_registered_model(name)
        except MlflowException:
            client.get_registered_model(name)  # created by a concurrent run meanwhile


def training_config(cfg: PipelineConfig, champion: str | None, run_name: str) -> PipelineConfig:
    """The config of tonight's training run: fine-tuning from the champion, or from scratch."""
    name = cfg.registry.model_name
    train = cfg.train
    model = cfg.model
    if cfg.nightly.init == "champion" and champion is not None:
        model = model.model_copy(update={"weights": f"models:/{name}/{champion}"})
        train = train.model_copy(
            update={"epochs": cfg.nightly.epochs or train.epochs, "lr": cfg.nightly.lr or train.lr}
        )
    run = cfg.run.model_copy(update={"name": run_name})
    return cfg.model_copy(update={"model": model, "train": train, "run": run})


def run_nightly(
    cfg: PipelineConfig,
    *,
    force: bool = False,
    date: str | None = None,
    on_event: EventSink | None = None,
    lock: LockSettings | None = None,
) -> NightlyReport:
    """One night: retrain on new data, register, promote only if better, report; the outcome
    is sent to `nightly.notify`'s webhooks when it is one of `nightly.notify_on`."""
    date = date or datetime.now(UTC).date().isoformat()
    try:
        report = _run_nightly(cfg, force=force, date=date, on_event=on_event, lock=lock)
    except (NightlyError, PipelineError) as exc:
        failed = getattr(exc, "report", None) or NightlyReport(
            date, cfg.registry.model_name or "?", "failed", "the run failed before training"
        )
        failed.error = failed.error or str(exc)
        notify(cfg, failed)
        raise
    notify(cfg, report)
    return report


def notify(cfg: PipelineConfig, report: NightlyReport) -> list[str]:
    """Send the report to the webhooks if its decision is one to be told about; never raises.
    Returns the webhooks that could not be reached."""
    from pipeline import notify as webhooks

    urls = cfg.nightly.webhooks()
    if not urls or report.decision not in cfg.nightly.notify_on:
        return []
    text = f"nightly {report.date} for {report.model_name}: {report.decision}. {report.reason}"
    if report.error:
        text += f" Error: {report.error}"
    if report.nightly_run_url:
        text += f" Report: {report.nightly_run_url}"
    payload = {"text": mask_credentials(text), "report": json.loads(report_json(report))}
    return webhooks.send(urls, payload, cfg.nightly.notify_timeout_s)


def _run_nightly(
    cfg: PipelineConfig,
    *,
    force: bool,
    date: str,
    on_event: EventSink | None,
    lock: LockSettings | None,
) -> NightlyReport:
    from pipeline.registry import connect
    from pipeline.train.trainer import preflight

    started = time.time()
    cfg = cfg.with_absolute_paths()
    name = cfg.registry.model_name
    if not name:
        raise NightlyError("registry.model_name is not set: nightly registers and promotes into it")
    if not cfg.tracking.log_model:
        raise NightlyError("tracking.log_model is false: nightly needs the model to register it")
    uri = cfg.tracking.resolved_uri()
    client = connect(uri, cfg.tracking.timeout_s)
    manifest = preflight(cfg)  # data, model and server checked before anything else
    _ensure_registered_model(client, name)
    # Refuse at once when another nightly run holds the lock: waiting would only run it twice.
    settings = lock or LockSettings(timeout_s=10.0, ttl_s=300.0)
    with contextlib.ExitStack() as held:
        try:
            lock_held = held.enter_context(NightlyLock(client, name, settings))
        except RegistryError as exc:
            raise NightlyError(f"another nightly run is in progress: {exc}") from None
        return _locked(cfg, client, manifest, name, date, force, on_event, started, lock_held)


def _locked(cfg, client, manifest, name, date, force, on_event, started, lock) -> NightlyReport:
    import mlflow

    from pipeline import tracking

    uri = cfg.tracking.resolved_uri()
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    done = _finished_today(client, exp.experiment_id if exp else None, name, date)
    if done is not None and not force:
        decision = done.data.tags.get(NIGHTLY_DECISION_TAG, "?")
        log.info(
            "nightly %s for %r already ran (decision: %s, MLflow run %s); nothing to do. "
            "Use --force to run again.",
            date,
            name,
            decision,
            done.info.run_id,
        )
        return NightlyReport(
            date, name, "skipped", f"already ran today: {decision}", nightly_run_id=done.info.run_id
        )

    champion = aliases_of(client, name).get(CHAMPION)
    report = NightlyReport(date, name, "failed", "", forced=force, champion_before=champion)
    run_name = f"nightly-{date}" + (f"-{uuid.uuid4().hex[:6]}" if done is not None else "")
    report.nightly_run_id = tracking.start_or_resume_run(
        uri,
        cfg.tracking.experiment,
        run_name=run_name,
        tags={
            **tracking.standard_tags(),
            KIND_TAG: "nightly",
            NIGHTLY_DATE_TAG: date,
            NIGHTLY_MODEL_TAG: name,
            NIGHTLY_FORCED_TAG: str(force).lower(),
        },
    )
    from pipeline.tracking import run_link

    experiment_id = mlflow.get_run(report.nightly_run_id).info.experiment_id
    report.nightly_run_url = run_link(strip_credentials(uri), experiment_id, report.nightly_run_id)
    mlflow.end_run()  # training opens its own run; the report is written at the end
    try:
        _retrain(cfg, client, manifest, name, champion, report, run_name, force, on_event, lock)
    except BaseException as exc:
        report.decision = "failed"
        report.error = f"{type(exc).__name__}: {exc}"
        report.reason = "the run failed; the champion was not changed"
        _record_failure(client, report, name, started)
        if isinstance(exc, KeyboardInterrupt):
            raise
        if isinstance(exc, NightlyError):
            exc.report = report
            raise
        error = NightlyError(
            f"nightly {date} for {name!r} failed: {root_cause(exc)} (champion unchanged: "
            f"{_v(report.champion_after)}; report in MLflow run {report.nightly_run_id})"
        )
        error.report = report
        raise error from exc
    _write_report(client, report, started, status="FINISHED")
    return report


def _retrain(
    cfg, client, manifest, name, champion, report, run_name, force, on_event, lock
) -> None:
    from pipeline.registry import promote, register_training
    from pipeline.train.trainer import run_training

    digest, shards = (None, None) if champion is None else _champion_data(client, name, champion)
    report.data = diff_data(manifest, cfg.data.uri, digest, shards)
    if champion is not None and not report.data.changed and not force:
        report.decision = "no-new-data"
        report.reason = (
            f"the data at {cfg.data.uri} is what champion v{champion} was trained on "
            f"(digest {manifest.digest[:16]}); nothing to do"
        )
        report.champion_after = champion
        log.info(report.reason)
        return
    train_cfg = training_config(cfg, champion, f"{run_name}-train")
    report.init = train_cfg.model.weights or "scratch"
    log.info(
        "nightly %s: %d new shard(s) (%d rows); training from %s",
        report.date,
        len(report.data.new_shards),
        report.data.new_rows,
        report.init,
    )
    summary = register_training(train_cfg, run_training(train_cfg, on_event=on_event))
    report.training_run_id = summary.run_id
    report.candidate_version = summary.model_version
    report.metrics = {
        k: v for k, v in summary.metrics.items() if k in ("test_acc", "test_loss", "best_val_acc")
    }
    if summary.model_version is None:
        raise NightlyError("the training run registered no model version")
    try:  # a long training may have outlived the lease (MLflow down longer than its ttl)
        lock.ensure_held()
    except RegistryError as exc:
        raise NightlyError(
            f"{exc}; the trained version v{summary.model_version} stays registered"
        ) from None
    if not cfg.registry.promote:
        report.decision = "trained"
        report.reason = (
            f"registered v{summary.model_version}; registry.promote is off, champion unchanged"
        )
        report.champion_after = champion
        return
    decision = promote(
        client,
        name,
        candidate=summary.model_version,
        data_uri=cfg.data.uri,
        split=cfg.data.test_split,
        min_improvement=cfg.registry.min_improvement,
        class_floor=cfg.registry.class_floor,
        storage=cfg.storage,
    )
    report.promotion = decision.to_dict()
    report.decision = "promoted" if decision.acted else "refused"
    report.reason = decision.reason
    report.champion_after = aliases_of(client, name).get(CHAMPION)
    log.info("promotion of v%s: %s: %s", summary.model_version, decision.outcome, decision.reason)


def _record_failure(client, report: NightlyReport, name: str, started: float) -> None:
    """Write the FAILED report. With MLflow itself down this fails too: say so in a log line and
    let the caller raise the original error, which is the one the user needs."""
    try:
        report.champion_after = aliases_of(client, name).get(CHAMPION)
        _write_report(client, report, started, status="FAILED")
    except Exception as exc:  # any failure here must not hide the first one
        log.warning(
            "could not write the nightly report to MLflow run %s (%s)",
            report.nightly_run_id,
            root_cause(exc),
        )


def _write_report(client, report: NightlyReport, started: float, status: str) -> None:
    report.seconds = time.time() - started
    run_id = report.nightly_run_id
    payload = asdict(report)
    client.log_dict(run_id, payload, f"{NIGHTLY_REPORT_DIR}/report.json")
    client.log_text(run_id, report.to_markdown(), f"{NIGHTLY_REPORT_DIR}/report.md")
    client.set_tag(run_id, NIGHTLY_DECISION_TAG, report.decision)
    for key, value in {
        NIGHTLY_CHAMPION_BEFORE_TAG: report.champion_before or "",
        NIGHTLY_CHAMPION_AFTER_TAG: report.champion_after or "",
        NIGHTLY_CANDIDATE_TAG: report.candidate_version or "",
        NIGHTLY_TRAINING_RUN_TAG: report.training_run_id or "",
    }.items():
        if value:
            client.set_tag(run_id, key, value)
    if report.data is not None:
        client.log_metric(run_id, "new_shards", len(report.data.new_shards))
        client.log_metric(run_id, "new_rows", report.data.new_rows)
    for key, value in report.metrics.items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id, status=status)


def report_json(report: NightlyReport) -> str:
    return json.dumps(asdict(report), indent=2, default=str)
