"""The pipeline's one configuration object.

`PipelineConfig` is loaded from YAML, overridden by `--set a.b=c` pairs, and validated as a whole
before any cluster work starts: every problem is reported at once with its field path. Workers get
it as a plain dict (`to_dict`) and MLflow gets it flattened (`flatten`).

The only environment variables read are the standard ones, and only here: MLFLOW_TRACKING_URI,
RAY_ADDRESS, AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, AWS_REGION / AWS_DEFAULT_REGION.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(_Section):
    """How `s3://` URIs are reached. Credentials always come from the boto3 chain."""

    endpoint_url: str | None = None  # MinIO / moto / any S3-compatible store; None = AWS
    region: str | None = None
    connect_timeout_s: float = Field(5.0, gt=0)
    request_timeout_s: float = Field(30.0, gt=0)
    max_attempts: int = Field(3, ge=1, le=10)

    def resolved(self) -> StorageConfig:
        """Fill unset fields from the standard AWS environment variables."""
        env = os.environ
        return self.model_copy(
            update={
                "endpoint_url": self.endpoint_url
                or env.get("AWS_ENDPOINT_URL_S3")
                or env.get("AWS_ENDPOINT_URL"),
                "region": self.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            }
        )


class AugmentConfig(_Section):
    """Per-sample training augmentation, applied after `data.resize` (so in the pixels the network
    sees): a random shift of up to `random_crop_padding` pixels (a padded random crop), and with
    `rotate_degrees` / `scale` a random affine map (torchvision's RandomAffine) around the centre;
    the background that moves in is black (0)."""

    random_crop_padding: int = Field(1, ge=0, le=32)  # pixels; 0 disables the shifted crop
    rotate_degrees: float = Field(0.0, ge=0, le=180)  # random rotation in [-d, d] degrees
    scale: float = Field(0.0, ge=0, lt=1)  # random zoom in [1 - scale, 1 + scale]
    hflip: bool = False  # digits must not be mirrored; natural images usually can
    vflip: bool = False

    @property
    def affine(self) -> bool:
        return self.rotate_degrees > 0 or self.scale > 0


class CropConfig(_Section):
    """The torchvision reference recipe for photographs (mixed-size datasets need it): training
    RandomResizedCrop(size, scale, ratio) + horizontal flip, optionally TrivialAugmentWide or
    RandAugment; evaluation Resize(size / eval_crop_ratio) + CenterCrop(size). Ray Data decodes
    and crops to uint8; the worker converts to float, normalises and augments on its device."""

    size: int = Field(224, ge=8, le=1024)  # the network's input side, in pixels
    scale: tuple[float, float] = (0.08, 1.0)  # crop area as a fraction of the image's
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio (width / height) range
    hflip: bool = True
    auto_augment: Literal["none", "trivialaugment", "randaugment"] = "none"
    eval_crop_ratio: float = Field(0.875, gt=0, le=1)  # 224 / 256, torchvision's

    @field_validator("scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError("expected [low, high] with 0 < low <= high <= 1")
        return value

    @field_validator("ratio")
    @classmethod
    def _ratio_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError("expected [low, high] aspect ratios with 0 < low <= high")
        return value


class DataConfig(_Section):
    uri: str = "data/digits"  # dataset root holding manifest.json (local path or s3://)
    prepare: Literal["digits"] | None = "digits"  # create the bundled dataset when uri is empty
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    # Resize every image (bilinear) to this side, or [height, width], before augmentation, in
    # training, evaluation and serving alike: the model package records it. Upsampling small
    # images lets shifts and rotations move them by fractions of an original pixel.
    resize: tuple[int, int] | None = None  # YAML: 16 or [16, 24]; read back as (height, width)
    augment: AugmentConfig = AugmentConfig()
    # Keep each worker's decoded train shard in its memory after the first epoch, and reshuffle
    # and augment it there: Ray Data re-executes its pipeline every epoch, which costs ~2 s on
    # 2 cores and dominates small datasets. "auto": when a worker's share is under cache_max_mb.
    cache: Literal["auto", "always", "never"] = "auto"
    cache_max_mb: float = Field(1024.0, gt=0)
    # Photographs and any mixed-size dataset: random resized crops for training, centre crops for
    # evaluation (see CropConfig). Fixed-size datasets leave it unset and keep resize + augment.
    crop: CropConfig | None = None

    @field_validator("resize", mode="before")
    @classmethod
    def _resize_pair(cls, value: Any) -> Any:
        if value is None:
            return None
        pair = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
        if (
            not isinstance(pair, list | tuple)
            or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            or not all(1 <= v <= 4096 for v in pair)
        ):
            raise ValueError("expected a side in pixels (1-4096) or [height, width]")
        return tuple(pair)

    @model_validator(mode="after")
    def _crop_or_resize(self) -> DataConfig:
        if self.crop is not None and self.resize is not None:
            raise ValueError(
                "data.crop and data.resize both set the input size: use data.crop.size alone"
            )
        if self.crop is not None and self.cache == "always":
            raise ValueError(
                "data.cache=always with data.crop: photographs are cropped afresh every epoch "
                "from their encoded bytes, never cached; leave data.cache at auto"
            )
        return self

    def absolute(self) -> DataConfig:
        return self.model_copy(update={"uri": _absolute_uri(self.uri)})


def _absolute_uri(uri: str) -> str:
    """Workers run in other directories: make local paths absolute, leave s3:// alone."""
    if "://" in uri:
        return uri
    return str(Path(uri).expanduser().resolve())


class DynamicConvConfig(_Section):
    num_kernels: int = Field(4, ge=1, le=16)
    reduction: int = Field(4, ge=1)
    temperature_start: float = Field(30.0, gt=0)
    temperature_end: float = Field(1.0, gt=0)
    temperature_epochs: int = Field(10, ge=0)
    replace_1x1: bool = False


class ModelConfig(_Section):
    name: str = "cifar_resnet20"
    num_classes: int | None = Field(None, ge=2)  # None: from the dataset manifest
    in_channels: int | None = Field(None, ge=1)  # None: from the dataset manifest
    small_input: bool | None = None  # ImageNet-style nets: 3x3 stem, no max-pool; None = auto
    shortcut: Literal["A", "B"] = "A"  # CIFAR nets only
    zero_init_residual: bool = False
    dropout: float = Field(0.0, ge=0, lt=1)
    dynamic: DynamicConvConfig = DynamicConvConfig()
    # Transfer learning: a torchvision-format state dict file or a models:/ / runs:/ URI.
    weights: str | None = None
    freeze_backbone: bool = False
    backbone_lr_scale: float = Field(1.0, ge=0, le=1)


class TrainConfig(_Section):
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(128, ge=1)  # global: split over scaling.num_workers
    # Gradient accumulation: each worker's share of batch_size is a micro-batch, and the optimizer
    # steps once every accumulate_steps micro-batches (DDP all-reduces on the last one only), so
    # one step sees batch_size * accumulate_steps samples. 1: a step per batch.
    accumulate_steps: int = Field(1, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.2, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["onecycle", "cosine", "step", "constant"] = "onecycle"
    warmup_epochs: float = Field(0.0, ge=0)  # cosine: linear warm-up; onecycle: pct_start*epochs
    step_size: int = Field(30, ge=1)  # step schedule
    gamma: float = Field(0.1, gt=0, le=1)  # step schedule
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    mixup_alpha: float = Field(0.0, ge=0)
    cutmix_alpha: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(None, gt=0)  # max global L2 norm
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = True
    compile: bool = False
    # BatchNorm statistics over the global batch (SyncBatchNorm), not each worker's share: for
    # small per-GPU batches. GPU workers only (torch's SyncBatchNorm runs on CUDA).
    sync_bn: bool = False
    ema_decay: float | None = Field(None, gt=0, lt=1)
    seed: int = 0
    threads_per_worker: int | None = Field(None, ge=1)  # torch intra-op threads; None = cpus


class ScalingConfig(_Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    # torch.distributed backend; None: nccl on GPU workers, gloo on CPU workers.
    backend: Literal["nccl", "gloo"] | None = None
    # How long a collective (gradient all-reduce, metric reduce, report barrier) may wait for
    # the slowest worker before the run fails (the process group's timeout; Ray's default).
    timeout_s: int = Field(1800, ge=10)
    # How Ray places the workers' bundles on nodes: PACK fills a node first (fast collectives),
    # SPREAD puts them on as many nodes as it can (one node's loss takes fewer workers with it);
    # the STRICT_ forms wait until that is possible instead of falling back.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    ray_address: str | None = None  # None: RAY_ADDRESS, else a local Ray
    num_cpus: int | None = Field(None, ge=1)  # local Ray only
    # CPUs left free beside the workers for Ray Data's read and decode tasks: with none, reads
    # never start and the run waits forever. Photographs want several per GPU worker.
    data_cpus: float = Field(1.0, ge=1)
    # An autoscaling cluster grows to what a run asks for: the resource check then says what
    # will be requested instead of refusing a run that does not fit the nodes up now.
    autoscaling: bool = False

    @model_validator(mode="after")
    def _gpu_checks(self) -> ScalingConfig:
        gpus = self.gpus_per_worker
        if self.use_gpu and gpus == 0:
            raise ValueError(
                "scaling.gpus_per_worker=0 with scaling.use_gpu=true gives the workers no GPU "
                "(and picks NCCL with none); set scaling.gpus_per_worker=1, or use_gpu=false"
            )
        if self.use_gpu and gpus < 1 and self.num_workers > 1:
            raise ValueError(
                f"scaling.gpus_per_worker={gpus:g} with {self.num_workers} workers packs two "
                "ranks onto one GPU, which NCCL refuses ('Duplicate GPU detected'); use "
                "scaling.gpus_per_worker=1 (one worker per GPU)"
            )
        if gpus > 1 and gpus != int(gpus):
            raise ValueError(
                f"scaling.gpus_per_worker={gpus:g}: more than one GPU must be a whole number"
            )
        if self.backend == "nccl" and not self.use_gpu:
            raise ValueError(
                "scaling.backend=nccl needs GPU workers (scaling.use_gpu=true); CPU workers use "
                "gloo (leave scaling.backend unset)"
            )
        return self

    def resolved_backend(self) -> str:
        return self.backend or ("nccl" if self.use_gpu else "gloo")


class RunConfig(_Section):
    name: str | None = None  # same name again resumes; None: <experiment>-<timestamp>
    storage_path: str = "runs"  # checkpoints: local dir or s3://
    num_to_keep: int = Field(2, ge=1)
    # How rank 0's epoch checkpoint reaches run.storage_path: "sync" uploads inside
    # ray.train.report (the next epoch waits for it; the checkpoint is committed when it
    # returns); "async" returns once written locally and uploads from a Ray thread, so the
    # upload overlaps the next epoch (a crash during it resumes from the previous checkpoint).
    checkpoint_upload: Literal["sync", "async"] = "sync"
    max_failures: int = Field(0, ge=-1)  # -1: retry forever
    # No progress from the workers (no step, epoch or phase) for this long: say what Ray is
    # waiting for (again every as long), and after `stall_timeout_s` stop the run as FAILED.
    stall_warn_s: float = Field(120.0, gt=0)
    stall_timeout_s: float | None = Field(1800.0, gt=0)  # None: warn only, never stop


class TrackingConfig(_Section):
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "digits"
    log_model: bool = True
    timeout_s: float = Field(10.0, gt=0)  # how long to wait for a tracking server at start-up

    def resolved_uri(self, project_dir: Path | None = None) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        base = (project_dir or Path.cwd()).resolve()
        return f"sqlite:///{base / 'mlflow.db'}"


class RegistryConfig(_Section):
    model_name: str | None = "digits-resnet"  # None: do not register
    promote: bool = True
    min_improvement: float = Field(0.0, ge=0)  # accuracy points (0-1 scale) over the champion
    class_floor: float = Field(0.0, ge=0, le=1)  # no class's accuracy may fall below this


NightlyOutcome = Literal["failed", "promoted", "refused", "no-new-data", "trained", "skipped"]


class NightlyConfig(_Section):
    """`pipeline nightly`: how tonight's model starts when there is a champion."""

    init: Literal["champion", "scratch"] = "champion"  # fine-tune the champion, or start afresh
    epochs: int | None = Field(None, ge=1)  # fine-tuning epochs; None: train.epochs
    lr: float | None = Field(None, gt=0)  # fine-tuning peak learning rate; None: train.lr
    # Webhooks (Slack-compatible: a JSON body with `text`) told about a night's outcome; also
    # PIPELINE_NOTIFY_URLS (comma-separated). Webhook URLs are secrets: never logged or shown.
    notify: list[str] = Field(default_factory=list)
    notify_on: list[NightlyOutcome] = Field(default_factory=lambda: ["failed"])
    notify_timeout_s: float = Field(10.0, gt=0, le=120)  # per webhook; a failed send is logged

    @field_validator("notify")
    @classmethod
    def _webhooks(cls, urls: list[str]) -> list[str]:
        for i, url in enumerate(urls):
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"notify[{i}]: expected an http(s):// webhook URL")
        return urls

    def webhooks(self) -> list[str]:
        """The configured webhooks, then PIPELINE_NOTIFY_URLS's."""
        extra = os.environ.get("PIPELINE_NOTIFY_URLS", "")
        return [*self.notify, *(u.strip() for u in extra.split(",") if u.strip())]


class PipelineConfig(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    run: RunConfig = RunConfig()
    tracking: TrackingConfig = TrackingConfig()
    registry: RegistryConfig = RegistryConfig()
    nightly: NightlyConfig = NightlyConfig()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineConfig:
        if self.train.batch_size < self.scaling.num_workers:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) is smaller than "
                f"scaling.num_workers ({self.scaling.num_workers}): every worker needs at least "
                "one sample per step; raise the batch size or use fewer workers"
            )
        if self.train.precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError(
                "train.precision=fp16 needs scaling.use_gpu=true (fp16 autocast with a grad "
                "scaler is a GPU feature); use bf16 on CPU"
            )
        if self.train.sync_bn and not self.scaling.use_gpu and self.scaling.num_workers > 1:
            raise ValueError(
                "train.sync_bn needs GPU workers (scaling.use_gpu=true): torch's SyncBatchNorm "
                "runs on CUDA only; turn it off for CPU workers"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def with_absolute_paths(self) -> PipelineConfig:
        """Paths made absolute and env-derived settings fixed as the driver sees them, so that
        workers in other directories and processes see the same thing."""
        tracking = self.tracking.model_copy(update={"tracking_uri": self.tracking.resolved_uri()})
        run = self.run.model_copy(update={"storage_path": _absolute_uri(self.run.storage_path)})
        return self.model_copy(
            update={
                "data": self.data.absolute(),
                "run": run,
                "tracking": tracking,
                "storage": self.storage.resolved(),
            }
        )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        """A short hash of the resolved config: equal configs give equal digests."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; used for MLflow params."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """["a.b=1", "c=x"] -> {"a": {"b": 1}, "c": "x"}; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, for example train.lr=0.05")
        key, raw = pair.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {pair!r}: the key {key!r} has an empty part")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair!r}: {part!r} is set to a value and a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return tree


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} invalid setting(s):"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(config)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see README 'Configuration')"
        given = e.get("input")
        shown = (
            "" if e["type"] == "extra_forbidden" or isinstance(given, dict) else f" (got {given!r})"
        )
        lines.append(f"  - {where}: {msg}{shown}")
    return "\n".join(lines)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """Load YAML (or the defaults), apply `--set` overrides, validate everything at once."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    if overrides:
        raw = deep_merge(raw, parse_overrides(overrides))
        source += " + --set"
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
