"""A pulled model folder: what `pipeline pull` writes, and its verification before any load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.errors import IntegrityError
from pipeline.tags import PULL_META_FILE

FORMATS = ("torchscript", "onnx", "pt2", "state_dict", "mlflow")
TORCHSCRIPT_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"
PT2_FILE = "model.pt2"  # torch.export's ExportedProgram (torch.export.save)


def _files(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.name != PULL_META_FILE
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_pulled(path: str | Path) -> dict[str, Any]:
    """Check every file listed in DEST/pipeline_pull.json against its sha256; the record."""
    path = Path(path)
    meta_file = path / PULL_META_FILE
    try:
        record = json.loads(meta_file.read_text())
        files: dict[str, str] = record["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{meta_file}: unreadable pull record ({exc}); pull again") from None
    root = path.resolve()
    for rel, expected in files.items():
        target = (path / rel).resolve()
        if not target.is_relative_to(root):
            raise IntegrityError(f"{meta_file}: file {rel!r} points outside {path}; pull again")
        if not target.is_file():
            raise IntegrityError(f"{path / rel}: missing (listed in {PULL_META_FILE}); pull again")
        actual = sha256_file(target)
        if actual != expected:
            raise IntegrityError(
                f"{path / rel}: sha256 {actual[:16]}… does not match {expected[:16]}… recorded "
                f"in {PULL_META_FILE}; the file was changed or corrupted, pull it again"
            )
    return record
