"""Everything the command line draws: consoles, tables, the live training and search displays,
and the log handler that shows the domain code's log records. The only module that imports rich.

Domain code never prints: it logs (`logging.getLogger("pipeline....")`) and reports progress as
events (`pipeline.events`); this module turns both into terminal output.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline.events import (
    EpochEnd,
    EventSink,
    Phase,
    StepProgress,
    TrainingStarted,
    TrialUpdate,
    WriteProgress,
)
from pipeline.storage import mask_credentials


def make_console(stderr: bool = False) -> Console:
    """A rich console. Off a terminal (a log file, CI, `| tee`) rich wraps at 80 columns, which
    breaks run ids, URIs and table rows across lines: use a wide fixed width there instead,
    unless COLUMNS says otherwise."""
    stream = sys.stderr if stderr else sys.stdout
    on_terminal = hasattr(stream, "isatty") and stream.isatty()
    width = None if on_terminal or os.environ.get("COLUMNS") else 160
    return Console(stderr=stderr, width=width)


out = make_console()
err = make_console(stderr=True)


def error_line(message: str) -> None:
    """A user error: one `error:` line on stderr (the caller exits 2), passwords in URIs
    masked, several lines of a message joined into one."""
    text = " ".join(mask_credentials(message).split("\n"))
    err.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)


def note(message: str, style: str | None = None) -> None:
    message = escape(mask_credentials(message))
    err.print(
        message if style is None else f"[{style}]{message}[/]", highlight=False, soft_wrap=True
    )


def plain(text: str, *, stderr: bool = False) -> None:
    """Text printed as is: no markup, no highlighting, no wrapping (ids, URIs, JSON)."""
    (err if stderr else out).print(text, markup=False, highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------
# Log records from the domain code


class _ConsoleHandler(logging.Handler):
    """The pipeline's log records on stderr: warnings in yellow, errors in red, info plain."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not kill the command
            message = str(record.msg)
        if record.levelno >= logging.ERROR:
            note(f"error: {message}", "red")
        elif record.levelno >= logging.WARNING:
            note(f"warning: {message}", "yellow")
        else:
            note(message)


_HANDLER = _ConsoleHandler(level=logging.INFO)


def show_pipeline_logs() -> None:
    """Send the `pipeline` loggers' INFO and above to stderr (once per process)."""
    logger = logging.getLogger("pipeline")
    if _HANDLER not in logger.handlers:
        logger.addHandler(_HANDLER)
    logger.setLevel(logging.INFO)
    logger.propagate = False


# ---------------------------------------------------------------------------------------------
# Live displays


class TrainingDisplay:
    """Epoch lines plus a progress bar for one training run. An `EventSink`: the trainer calls it
    on the driver's thread with the events rank 0 sends through its progress queue."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or err
        self.progress: Any = None
        self.epochs: Any = None
        self.steps: Any = None

    def __call__(self, event: Any) -> None:
        if isinstance(event, TrainingStarted):
            self._start(event)
        elif self.progress is None:
            return
        elif isinstance(event, StepProgress):
            rate = event.step / max(event.elapsed, 1e-9)
            self.progress.update(
                self.steps,
                total=event.steps,
                completed=event.step,
                description=f"epoch {event.epoch + 1}",
                status=f"loss {event.loss:.3f}  {rate:.1f} steps/s",
            )
        elif isinstance(event, EpochEnd):
            self.progress.update(self.epochs, completed=event.epoch + 1)
            self.console.print(_epoch_line(event), highlight=False)
        elif isinstance(event, Phase):
            self.progress.update(self.steps, status=event.text)

    def _start(self, event: TrainingStarted) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.close()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            # Every redraw costs driver CPU, which on a small machine is taken from the workers:
            # an epoch bar needs no more than two a second (rich's default is ten).
            refresh_per_second=2,
        )
        self.epochs = self.progress.add_task(
            "epochs", total=event.epochs, completed=event.start_epoch, status=""
        )
        self.steps = self.progress.add_task("steps", total=None, status="starting workers")
        self.progress.start()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __enter__(self) -> TrainingDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _epoch_line(e: EpochEnd) -> str:
    return (
        f"epoch {e.epoch + 1:>3}/{e.epochs}  "
        f"train loss {e.train_loss:.4f} acc {e.train_acc:.4f} | "
        f"val loss {e.val_loss:.4f} acc {e.val_acc:.4f} "
        f"top5 {e.val_top5:.4f} | {e.images_per_s:,.0f} img/s  "
        f"{e.epoch_time_s:.1f}s  lr {e.lr:.4f}"
    )


class SearchDisplay:
    """A search's status line (running / stopped / finished / errored trials, best so far) under
    one line per finished trial. An `EventSink` for `TrialUpdate` events."""

    def __init__(self, console: Console | None = None) -> None:
        from rich.live import Live

        self.console = console or err
        self.live = Live(console=self.console, transient=True, refresh_per_second=4)
        self.last: TrialUpdate | None = None

    def __call__(self, event: Any) -> None:
        if not isinstance(event, TrialUpdate):
            return
        self.last = event
        if event.line:
            self.console.print(event.line, highlight=False, markup=False)
        self.live.update(event.status)

    def __enter__(self) -> SearchDisplay:
        self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.stop()


class WriteProgressBar:
    """A transient bar for `WriteProgress` events (dataset writes and imports); draws only on a
    terminal, so logs and CI output stay clean."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or err
        self.progress: Any = None
        self.task: Any = None

    def __call__(self, event: Any) -> None:
        if not isinstance(event, WriteProgress) or not self.console.is_terminal:
            return
        if self.progress is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.task = self.progress.add_task(event.description, total=event.total)
            self.progress.start()
        self.progress.update(
            self.task, description=event.description, completed=event.done, total=event.total
        )

    def __enter__(self) -> WriteProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()


def no_display(_event: Any) -> None:
    """An `EventSink` that draws nothing (scripts, `--json`)."""


__all__ = ["EventSink"]  # re-exported for the command modules' annotations


# ---------------------------------------------------------------------------------------------
# Tables


def print_manifest(m: Any, uri: str) -> None:
    out.print(f"[bold]{escape(m.name)}[/]  {escape(uri)}")
    out.print(f"created {m.created_at}  source: {escape(str(m.source))}", highlight=False)
    out.print(
        f"images {m.image.describe()}, {m.num_classes} classes, digest {m.digest}",
        highlight=False,
    )
    for split, info in m.splits.items():
        if info.sizes is not None:
            z = info.sizes
            out.print(
                f"  {split}: heights {z.min_height}-{z.max_height} (median {z.median_height}), "
                f"widths {z.min_width}-{z.max_width} (median {z.median_width})",
                highlight=False,
            )
    out.print(f"normalisation mean {m.normalization.mean} std {m.normalization.std}")
    counts = Table("class", *m.splits.keys(), title="rows per split and class")
    for k, name in enumerate(m.classes):
        counts.add_row(escape(name), *(str(i.class_counts[k]) for i in m.splits.values()))
    counts.add_row("[bold]total", *(f"[bold]{i.rows}" for i in m.splits.values()))
    out.print(counts)
    shards = Table("shard", "rows", "bytes", "sha256", title="shards")
    for info in m.splits.values():
        for s in info.shards:
            shards.add_row(s.path, str(s.rows), f"{s.bytes:,}", s.sha256[:16])
    out.print(shards)


def print_problems(uri: str, problems: list[str]) -> None:
    for p in problems:
        err.print(f"[red]problem:[/] {escape(p)}", highlight=False, soft_wrap=True)
    err.print(f"{escape(uri)}: {len(problems)} problem(s) found", highlight=False)


def print_training_summary(summary: Any) -> None:
    m = summary.metrics
    table = Table(title=f"run {summary.run_name}", show_header=False)
    for key in ("test_acc", "test_top5", "test_loss", "best_val_acc", "best_epoch"):
        if key in m:
            table.add_row(key, f"{m[key]:.4f}" if key != "best_epoch" else str(int(m[key])))
    table.add_row("MLflow run", escape(summary.run_url))
    if summary.model_version:
        table.add_row("model", f"models:/{summary.registered_name}/{summary.model_version}")
    table.add_row("time", f"{summary.seconds:.0f} s")
    out.print(table)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_search_summary(summary: Any) -> None:
    table = Table(title=f"search {summary.name}")
    for col in ("rank", "trial", "state", "epochs", f"best {summary.metric}", "test_acc"):
        table.add_column(col)
    params = list(summary.trials[0].params) if summary.trials else []
    for p in params:
        table.add_column(p)
    for i, row in enumerate(summary.trials, 1):
        table.add_row(
            str(i),
            row.trial_id,
            row.state,
            str(row.epochs),
            "-" if row.best is None else f"{row.best:.4f}",
            "-" if row.test_acc is None else f"{row.test_acc:.4f}",
            *[escape(_fmt(row.params.get(p))) for p in params],
        )
    out.print(table)
    if summary.best is not None:
        chosen = ", ".join(f"{k}={_fmt(v)}" for k, v in summary.best.params.items())
        plain(
            f"best trial {summary.best.trial_id}: best {summary.metric} "
            f"{summary.best.best:.4f} ({chosen})"
        )
    if summary.model_version:
        plain(f"registered models:/{summary.registered_name}/{summary.model_version}")
    plain(
        f"{summary.epochs_total} epochs over {len(summary.trials)} trial(s) in "
        f"{summary.seconds:.0f} s; MLflow parent run: {summary.run_url}"
    )


def print_evaluation(model: str, data: str, split: str, result: dict[str, Any]) -> None:
    plain(
        f"{model} on {data} [{split}]: acc {result['acc']:.4f}  top5 {result['top5']:.4f}  "
        f"loss {result['loss']:.4f}  ({result['count']} images)"
    )
    table = Table("class", "accuracy", title="per class")
    for name, acc in result["per_class_accuracy"].items():
        table.add_row(escape(name), f"{acc:.4f}")
    out.print(table)


def print_decision(decision: Any, name: str, split: str) -> None:
    cand, champ = decision.candidate, decision.champion
    colour = "green" if decision.promote else "yellow"
    out.print(f"[bold {colour}]{decision.outcome}[/]: {escape(name)} version {cand.version}")
    plain(f"  {decision.reason}")
    table = Table("", f"candidate v{cand.version}", f"champion v{champ.version}" if champ else "")
    table.add_row("accuracy", f"{cand.acc:.4f}", f"{champ.acc:.4f}" if champ else "-")
    table.add_row("loss", f"{cand.loss:.4f}", f"{champ.loss:.4f}" if champ else "-")
    worst = min(cand.per_class, key=cand.per_class.get)
    table.add_row(f"worst class ({escape(worst)})", f"{cand.per_class[worst]:.4f}", "")
    out.print(table)
    plain(f"  evaluated on {decision.data_uri} [{split}], {cand.count} images")


def print_best_runs(rows: list[dict[str, Any]], metric: str) -> None:
    table = Table("#", metric, "run", "model", "test_acc", "registered", title="best runs")
    for i, row in enumerate(rows, 1):
        versions = ", ".join(
            f"{v['name']}/{v['version']}"
            + (f" ({', '.join(v['aliases'])})" if v["aliases"] else "")
            for v in row["versions"]
        )
        test_acc = row["metrics"].get("test_acc")
        table.add_row(
            str(i),
            f"{row['value']:.4f}",
            escape(f"{row['run_name']} {row['run_id'][:8]}"),
            escape(row["model"]),
            f"{test_acc:.4f}" if test_acc is not None else "-",
            escape(versions) or "-",
        )
    out.print(table)


def print_versions(rows: list[dict[str, Any]], name: str) -> None:
    table = Table("version", "aliases", "test_acc", "best_val_acc", "created", "tags", title=name)
    for row in rows:
        m = row["metrics"]
        shown = {k: v for k, v in row["tags"].items() if not k.startswith("promotion.")}
        table.add_row(
            row["version"],
            ", ".join(row["aliases"]) or "-",
            f"{m['test_acc']:.4f}" if "test_acc" in m else "-",
            f"{m['best_val_acc']:.4f}" if "best_val_acc" in m else "-",
            row["created"],
            escape(" ".join(f"{k}={v[:12]}" for k, v in sorted(shown.items()))),
        )
    out.print(table)


def print_jobs(jobs: list[Any], address: str) -> None:
    table = Table(title=f"jobs on {escape(address)}")
    table.add_column("id", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("entrypoint", overflow="fold")
    table.add_column("start time", no_wrap=True)
    for j in jobs:
        started = f"{j.start_time.astimezone():%Y-%m-%d %H:%M:%S}" if j.start_time else "-"
        table.add_row(j.submission_id, j.status, escape(j.entrypoint), started)
    out.print(table)


def print_job_end(job_id: str, status: str, reason: str | None) -> None:
    if status == "SUCCEEDED":
        err.print(f"job {job_id} [bold green]SUCCEEDED[/]", highlight=False)
        return
    err.print(
        f"job {job_id} [bold red]{status}[/]" + (f": {escape(reason)}" if reason else ""),
        highlight=False,
        soft_wrap=True,
    )


def model_table(rows: list[dict[str, Any]]) -> Table:
    """`describe_models` rows: parameters in millions, multiply-adds in billions."""
    sizes = sorted({row.get("input_size", "") for row in rows} - {""})
    table = Table(title=f"Models at {', '.join(sizes)}" if sizes else "Models")
    table.add_column("model")
    table.add_column("family")
    table.add_column("params (M)", justify="right")
    table.add_column("GMACs", justify="right")
    for row in rows:
        table.add_row(
            row["name"], row["family"], f"{row['params'] / 1e6:.2f}", f"{row['macs'] / 1e9:.3f}"
        )
    return table


def print_predict_summary(s: Any) -> None:
    """`pipeline predict`'s result: one line, and the skipped images when there were any."""
    version = f" version {s.version}" if s.version else ""
    plain(
        f"wrote {s.out}: {s.rows} prediction(s) of {s.model}{version} (top {s.top_k}) for "
        f"{s.data} in {s.seconds:.1f}s ({s.images_per_s:.1f} images/s, {s.concurrency} "
        f"{s.device} worker(s), batch {s.batch_size})"
    )
    if s.skipped:
        note(
            f"warning: skipped {s.skipped} unusable image(s) (--skip-bad): "
            + "; ".join(s.skipped_examples),
            "yellow",
        )
