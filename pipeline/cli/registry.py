"""`pipeline promote`, `rollback`, `best`, `models registered`, `pull` and `serve`: the registry
and what services take from it. Every command reaches MLflow at --tracking-uri, else the config's
tracking.tracking_uri, else MLFLOW_TRACKING_URI, else ./mlflow.db, so the same commands work
against the embedded SQLite file and a tracking server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli import display
from pipeline.cli.common import (
    ConfigOpt,
    JsonOpt,
    NameArg,
    SetOpt,
    TrackingUriOpt,
    app,
    friendly_errors,
    models_app,
    quiet_downloads,
)
from pipeline.tags import PULL_META_FILE, ROLLED_BACK_TAG


def _registry_setup(config: Path | None, overrides: list[str] | None, tracking_uri: str | None):
    """(config, MlflowClient): the config with --tracking-uri applied, and a checked client."""
    from pipeline.config import load_config
    from pipeline.registry import connect

    quiet_downloads()
    cfg = load_config(config, overrides or [])
    if tracking_uri:
        cfg.tracking.tracking_uri = tracking_uri
    return cfg, connect(cfg.tracking.resolved_uri(), cfg.tracking.timeout_s)


@app.command("promote")
@friendly_errors
def promote_command(
    name: NameArg,
    candidate: Annotated[
        str | None, typer.Option(help="Version number or alias; default: the newest version.")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option("--data", help="Held-out dataset; default: the candidate's training data."),
    ] = None,
    split: Annotated[str, typer.Option(help="Split both models are evaluated on.")] = "test",
    min_improvement: Annotated[
        float | None,
        typer.Option(min=0, help="Accuracy margin over the champion; default registry's."),
    ] = None,
    class_floor: Annotated[
        float | None,
        typer.Option(min=0, max=1, help="Lowest accuracy any class may have; default registry's."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Decide, change nothing.")] = False,
    lock_timeout: Annotated[
        float, typer.Option(min=0, help="Seconds to wait for another promotion.")
    ] = 600.0,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    tracking_uri: TrackingUriOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move `champion` to a version that beats it on the same held-out data, evaluated now."""
    from pipeline.registry import LockSettings, promote

    cfg, client = _registry_setup(config, overrides, tracking_uri)
    decision = promote(
        client,
        name,
        candidate=candidate,
        data_uri=data,
        split=split,
        min_improvement=(
            cfg.registry.min_improvement if min_improvement is None else min_improvement
        ),
        class_floor=cfg.registry.class_floor if class_floor is None else class_floor,
        dry_run=dry_run,
        storage=cfg.storage.resolved(),
        lock=LockSettings(timeout_s=lock_timeout),
    )
    if as_json:
        display.plain(json.dumps(decision.to_dict(), indent=2))
        return
    display.print_decision(decision, name, split)


@app.command("rollback")
@friendly_errors
def rollback_command(
    name: NameArg,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    tracking_uri: TrackingUriOpt = None,
) -> None:
    """Move `champion` back to `previous-champion`."""
    from pipeline.registry import rollback

    _, client = _registry_setup(config, overrides, tracking_uri)
    old, new = rollback(client, name)
    display.plain(
        f"rolled back {name}: champion v{old or '-'} -> v{new}"
        + (f" (v{old} tagged {ROLLED_BACK_TAG})" if old and old != new else "")
    )


@app.command("best")
@friendly_errors
def best_command(
    experiment: Annotated[
        str | None, typer.Option(help="Experiment; default tracking.experiment.")
    ] = None,
    metric: Annotated[str, typer.Option(help="Metric to rank by.")] = "best_val_acc",
    filter_string: Annotated[
        str, typer.Option("--filter", help="MLflow filter, e.g. \"params.model.name = 'x'\".")
    ] = "",
    top: Annotated[int, typer.Option(min=1, help="How many runs.")] = 5,
    ascending: Annotated[
        bool | None,
        typer.Option("--ascending/--descending", help="Default: ascending for *loss* metrics."),
    ] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    tracking_uri: TrackingUriOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The best runs by a metric, with their registered versions and aliases."""
    from pipeline.registry import best_runs

    cfg, client = _registry_setup(config, overrides, tracking_uri)
    rows = best_runs(
        client, experiment or cfg.tracking.experiment, metric, filter_string, top, ascending
    )
    if as_json:
        display.plain(json.dumps(rows, indent=2))
        return
    display.print_best_runs(rows, metric)


@models_app.command("registered")
@friendly_errors
def models_registered(
    name: NameArg,
    limit: Annotated[int, typer.Option(min=1, help="Newest versions shown.")] = 50,
    version: Annotated[
        str | None, typer.Option("--version", help="Show this version's model card instead.")
    ] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    tracking_uri: TrackingUriOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A registered model's versions with aliases, metrics and tags; or one version's card."""
    from pipeline.registry import registered_model, registered_versions, resolve_version

    _, client = _registry_setup(config, overrides, tracking_uri)
    registered_model(client, name)  # a clear error for an unknown name
    if version is not None:
        from pipeline.registry.card import stored_card

        found = resolve_version(client, name, version)
        display.plain(stored_card(client, name, str(found.version)))
        return
    rows = registered_versions(client, name, limit)
    if as_json:
        display.plain(json.dumps(rows, indent=2))
        return
    display.print_versions(rows, name)


@app.command("pull")
@friendly_errors
def pull_command(
    uri: Annotated[
        str, typer.Argument(help="models:/NAME@alias, models:/NAME/N or runs:/ID/model.")
    ],
    dest: Annotated[Path, typer.Option("--dest", help="Directory to create.")],
    fmt: Annotated[str, typer.Option("--format", help="torchscript, onnx, state_dict or mlflow.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --dest.")] = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    tracking_uri: TrackingUriOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Download a model, export it, check the export against the original, write it + hashes."""
    from pipeline.config import load_config
    from pipeline.serving import pull

    quiet_downloads()
    cfg = load_config(config, overrides or [])
    record = pull(
        uri,
        dest,
        fmt,
        tracking_uri=tracking_uri or cfg.tracking.resolved_uri(),
        timeout_s=cfg.tracking.timeout_s,
        overwrite=overwrite,
    )
    if as_json:
        display.plain(json.dumps(record, indent=2))
        return
    source = record["source"]
    version = f" (version {source['version']})" if source.get("version") else ""
    display.plain(f"pulled {uri}{version} as {fmt} into {dest}")
    for rel, sha in record["files"].items():
        display.plain(f"  {rel}  sha256 {sha[:16]}")
    check = record["check"]
    display.plain(
        f"  checked on {check['samples']} sample inputs: max |diff| {check['max_abs_diff']:.2g} "
        f"<= {check['tolerance']:g}; metadata in {dest / PULL_META_FILE}"
    )


@app.command("serve")
@friendly_errors
def serve_command(
    uri: Annotated[str, typer.Argument(help="models:/NAME@alias, models:/NAME/N or runs:/ID/...")],
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 5001,
    workers: Annotated[int, typer.Option(min=1)] = 1,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="Allow a non-loopback --host: the scoring server has no authentication.",
        ),
    ] = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    tracking_uri: TrackingUriOpt = None,
) -> None:
    """Serve a model's image predictor with MLflow's scoring server (POST /invocations)."""
    import os
    import tempfile

    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from pipeline.servers import is_loopback
    from pipeline.serving import predictor_uri, scoring_server_command, scoring_server_env
    from pipeline.serving.pyfunc import verified_predictor

    if not is_loopback(host) and not insecure:  # MLflow's scoring server has no authentication
        raise ConfigError(
            f"--host {host}: the scoring server has no authentication, so anyone who reaches it "
            "can use it; bind 127.0.0.1 behind an authenticating proxy, or pass --insecure"
        )
    cfg = load_config(config, overrides or [])
    tracking = tracking_uri or cfg.tracking.resolved_uri()
    model = predictor_uri(uri, tracking_uri=tracking, timeout_s=cfg.tracking.timeout_s)
    # The server runs the checked local copy (kept for its lifetime), not the store's.
    local = verified_predictor(model, Path(tempfile.mkdtemp(prefix="pipeline-serve-")), tracking)
    cmd = scoring_server_command(str(local), host, port, workers)
    display.plain(f"serving {uri} ({model}) on http://{host}:{port}/invocations", stderr=True)
    os.execve(cmd[0], cmd, scoring_server_env(tracking))


@app.command("predict")
@friendly_errors
def predict_command(
    uri: Annotated[
        str,
        typer.Argument(
            help="models:/NAME@alias, models:/NAME/N, runs:/ID/model or a pulled folder."
        ),
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="A dataset root (with manifest.json), or a folder / s3:// prefix of .png/.jpg.",
        ),
    ],
    out: Annotated[
        str, typer.Option("--out", help="Parquet file to create: a local path or s3://...")
    ],
    split: Annotated[
        str | None, typer.Option("--split", help="A dataset's split; default: every split.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch and forward pass.")] = 64,
    concurrency: Annotated[
        int, typer.Option(min=1, help="Ray Data actors, each with one CPU (or GPU).")
    ] = 2,
    top_k: Annotated[
        int, typer.Option("--top-k", min=1, help="Most probable classes kept per image.")
    ] = 5,
    device: Annotated[str, typer.Option(help="cpu, or cuda: one GPU per actor.")] = "cpu",
    skip_bad: Annotated[
        bool,
        typer.Option("--skip-bad", help="Leave out images that do not decode (counted)."),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing --out written by `pipeline predict`.")
    ] = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    tracking_uri: TrackingUriOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Predict every image of a dataset, folder or s3:// prefix on a Ray Data actor pool; write
    one Parquet file (id/path, label, confidence, top-k, model, version), all or nothing."""
    from pipeline.config import load_config
    from pipeline.serving.batch import PredictOptions, predict

    quiet_downloads()
    cfg = load_config(config, overrides or [])
    with display.WriteProgressBar() as bar:
        opts = PredictOptions(
            data=data,
            out=out,
            batch_size=batch_size,
            concurrency=concurrency,
            top_k=top_k,
            device=device,
            skip_bad=skip_bad,
            overwrite=overwrite,
            split=split,
            storage=cfg.storage.resolved(),
            on_progress=None if as_json else bar,
        )
        summary = predict(
            uri,
            opts,
            tracking_uri=tracking_uri or cfg.tracking.resolved_uri(),
            timeout_s=cfg.tracking.timeout_s,
            cfg=cfg,
        )
    if as_json:
        display.plain(json.dumps(summary.to_dict(), indent=2))
        return
    display.print_predict_summary(summary)
