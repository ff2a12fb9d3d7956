"""Model cards: one Markdown page per registered version, saying what it is and where it came from.

The card is assembled from what MLflow already holds about the version and its training run: the
data (URI and digest), the recipe (model and training params), the test metrics with per-class
accuracy, the input the model expects (image size, channels, resize, normalisation), its lineage
(run, git commit, config digest, the model it was fine-tuned from) and the last promotion
decision. It is written to the run's artifacts (`model_cards/<name>-v<N>.md`, named by the
version tag `model_card`) when the version is registered and again after each promotion decision,
shown by `pipeline models registered NAME --version N`, and pulled with the model.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from pipeline.tags import DECISION_PREFIX, MANIFEST_ARTIFACT, SUMMARY_METRICS

CARD_TAG = "model_card"  # version tag: the card's path in the run's artifacts
CARD_FILE = "model_card.md"  # its name in a pulled folder
RECIPE_PARAMS = (
    "model.name",
    "model.weights",
    "data.resize",
    "data.crop.size",
    "data.crop.auto_augment",
    "train.epochs",
    "train.batch_size",
    "train.optimizer",
    "train.lr",
    "train.schedule",
    "train.weight_decay",
    "train.label_smoothing",
    "train.mixup_alpha",
    "train.cutmix_alpha",
    "train.precision",
    "train.seed",
    "scaling.num_workers",
)


def model_card(client, name: str, version: str) -> str:
    """The card of `models:/name/version`, as Markdown."""
    mv = client.get_model_version(name, version)
    aliases = [a for a, v in client.get_registered_model(name).aliases.items() if v == version]
    run = client.get_run(mv.run_id) if mv.run_id else None
    params = run.data.params if run else {}
    metrics = run.data.metrics if run else {}
    tags = run.data.tags if run else {}
    manifest = _manifest(mv.run_id) if run else None
    lines = [f"# {name} version {version}", ""]
    if aliases:
        lines += [f"Aliases: {', '.join(aliases)}", ""]
    lines += ["## Data", ""]
    lines.append(f"- dataset: {params.get('data.uri', '?')}")
    lines.append(
        f"- digest: {mv.tags.get('dataset_digest') or tags.get('pipeline.dataset_digest', '?')}"
    )
    if manifest:
        counts = ", ".join(f"{s} {i['rows']}" for s, i in manifest.get("splits", {}).items())
        lines.append(f"- rows: {counts}; classes: {', '.join(manifest.get('classes', []))}")
    lines += ["", "## Training recipe", ""]
    lines += [f"- {k}: {params[k]}" for k in RECIPE_PARAMS if params.get(k) not in (None, "None")]
    lines += ["", "## Test metrics", ""]
    lines += [f"- {k}: {metrics[k]:.4f}" for k in SUMMARY_METRICS if k in metrics]
    per_class = _per_class(mv.run_id) if run else []
    if per_class:
        lines += ["", "| class | accuracy |", "|---|---|"]
        lines += [f"| {cls} | {acc} |" for cls, acc in per_class]
    lines += ["", "## Input", ""]
    lines += _input(manifest, params)
    lines += ["", "## Lineage", ""]
    lines.append(f"- run: {mv.run_id or '-'} ({tags.get('pipeline.run_name', '')})")
    lines.append(f"- git commit: {mv.tags.get('git_commit') or tags.get('git_commit', '?')}")
    lines.append(f"- config digest: {mv.tags.get('config_digest', '?')}")
    lines.append(f"- fine-tuned from: {params.get('model.weights') or 'nothing (from scratch)'}")
    lines.append(f"- registered from: {mv.source}")
    lines += ["", "## Promotion", ""]
    decision = {
        k.removeprefix(DECISION_PREFIX): v
        for k, v in mv.tags.items()
        if k.startswith(DECISION_PREFIX)
    }
    if decision:
        lines.append(
            f"- decision: {decision.get('decision', '?')} ({decision.get('decided_at', '')})"
        )
        lines.append(f"- reason: {decision.get('reason', '')}")
        lines.append(f"- scored on: {decision.get('data_uri', '?')} [{decision.get('split', '?')}]")
    else:
        lines.append("- not yet through the promotion gate")
    return "\n".join(lines) + "\n"


def _manifest(run_id: str) -> dict[str, Any] | None:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{MANIFEST_ARTIFACT}")
    except (MlflowException, OSError, ValueError):
        return None  # a run from before manifests were logged


def _per_class(run_id: str) -> list[tuple[str, str]]:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/per_class_accuracy.csv")
    except (MlflowException, OSError, ValueError):
        return []
    rows = list(csv.reader(io.StringIO(text)))
    header = rows[0] if rows else []
    if "class" not in header or "accuracy" not in header:
        return []
    c, a = header.index("class"), header.index("accuracy")
    return [(row[c], row[a]) for row in rows[1:] if len(row) > max(c, a)]


def _input(manifest: dict[str, Any] | None, params: dict[str, str]) -> list[str]:
    if not manifest:
        return ["- see pipeline_model.json in the model"]
    image = manifest.get("image", {})
    norm = manifest.get("normalization", {})
    c, h, w = (image.get(k, "?") for k in ("channels", "height", "width"))
    shape = f"{c} channel(s), " + ("mixed sizes" if h is None else f"{h}x{w}")
    out = [f"- images: {shape} ({image.get('encoding', '?')})"]
    resize = params.get("data.resize")
    if resize and resize != "None":
        out.append(f"- resized (bilinear) to {resize} before the network")
    crop = params.get("data.crop.size")
    if crop and crop != "None":
        ratio = params.get("data.crop.eval_crop_ratio", "?")
        out.append(
            f"- trained on random resized crops to {crop}x{crop}; evaluated and served on the "
            f"centre crop: resize the shorter side to {crop}/{ratio}, then crop {crop}x{crop}"
        )
    out.append(f"- normalised with mean {norm.get('mean')} and std {norm.get('std')}")
    return out


def write_model_card(client, name: str, version: str) -> str | None:
    """Write the card to the version's run and point the version tag `model_card` at it; the
    artifact path, or None for a version without a run."""
    mv = client.get_model_version(name, version)
    if not mv.run_id:
        return None
    path = f"model_cards/{name}-v{version}.md"
    client.log_text(mv.run_id, model_card(client, name, version), path)
    client.set_model_version_tag(name, version, CARD_TAG, path)
    return path


def stored_card(client, name: str, version: str) -> str:
    """The card as written for the version, or assembled now for one registered before cards."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mv = client.get_model_version(name, version)
    path = mv.tags.get(CARD_TAG)
    if path and mv.run_id:
        try:
            return mlflow.artifacts.load_text(f"runs:/{mv.run_id}/{path}")
        except (MlflowException, OSError):
            pass
    return model_card(client, name, version)
