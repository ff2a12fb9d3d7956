"""The registry lock: a lease held as a registered-model tag, so that promotions, rollbacks and
nightly runs of one model never interleave, across processes and machines."""

from __future__ import annotations

import fcntl
import json
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.errors import RegistryError
from pipeline.registry.versions import mlflow_errors, registered_model
from pipeline.tags import PROMOTION_LOCK_TAG


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
