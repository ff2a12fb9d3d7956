"""The registry lock: a lease held as a registered-model tag, so that promotions, rollbacks and
nightly runs of one model never interleave, across processes and machines."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import RegistryError
from pipeline.registry.versions import mlflow_errors, registered_model
from pipeline.tags import PROMOTION_LOCK_TAG

log = logging.getLogger(__name__)


@dataclass
class LockSettings:
    ttl_s: float = 120.0  # a lease not renewed for this long is free (its holder died)
    timeout_s: float = 600.0  # give up waiting for another promotion after this long
    settle_s: float = 2.0  # wait after writing the lease before trusting it (see PromotionLock)
    poll_s: float = 0.5

    def __post_init__(self) -> None:
        if self.ttl_s <= 2 * self.settle_s:  # a lease must outlive its own acquisition
            raise ValueError(f"ttl_s ({self.ttl_s}) must exceed 2 x settle_s ({self.settle_s})")


class PromotionLock:
    """Mutual exclusion for one registered model's aliases, across processes and machines.

    MLflow has no compare-and-swap, so the lease is a registered-model tag written with Fischer's
    timed mutual-exclusion protocol: read the tag; if it is free, write our token, then wait
    `settle_s` and read it again; it is ours only if our token is still there. That is safe as
    long as every writer's read-to-write takes less than `settle_s / 2`, which we measure and
    enforce (a slower attempt backs off).

    Expiry never compares two machines' clocks: the holder rewrites the lease (a new `beat`)
    every ttl/3, and a waiter counts a lease as abandoned only after it has seen the very same
    lease, unchanged, for the lease's ttl on its own monotonic clock. The holder counts the lease
    as lost when it could not renew it for a ttl (an MLflow outage), and re-checks it
    (`ensure_held`) right before moving an alias. A malformed lease tag is treated as abandoned,
    with a warning. With a SQLite store an flock beside the database also serialises local
    processes; with a PostgreSQL store an advisory lock is the primary mutex.
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
        self._db: Any = None  # a PostgreSQL connection holding the advisory lock
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._beat = 0
        self._renewed_at = 0.0  # monotonic time of our last successful write
        self._seen: tuple[str, float] | None = None  # (another's lease, when we first saw it)
        self._warned = False

    # -- the lease tag ---------------------------------------------------------------------------
    def _read(self) -> tuple[str | None, dict[str, Any] | None]:
        """(the raw tag, the lease) ; a malformed tag gives (raw, None)."""
        with mlflow_errors(f"registered model {self.name!r}"):
            raw = registered_model(self.client, self.name).tags.get(self.tag)
        if not raw:
            return None, None
        try:
            lease = json.loads(raw)
            if isinstance(lease, dict) and isinstance(lease.get("token"), str):
                float(lease.get("ttl_s", self.settings.ttl_s))
                return raw, lease
        except (ValueError, TypeError):
            pass
        if not self._warned:
            self._warned = True
            log.warning(
                "registered model %r: the lock tag %r holds %r, not a lease; treating it as "
                "abandoned",
                self.name,
                self.tag,
                raw[:80],
            )
        return raw, None

    def _write(self) -> None:
        self._beat += 1
        lease = {
            "token": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "beat": self._beat,
            "ttl_s": self.settings.ttl_s,
            "expires": time.time() + self.settings.ttl_s,  # for people reading the tag only
        }
        with mlflow_errors(f"registered model {self.name!r}"):
            self.client.set_registered_model_tag(self.name, self.tag, json.dumps(lease))
        self._renewed_at = time.monotonic()

    def _free(self, raw: str | None, lease: dict[str, Any] | None) -> bool:
        """Absent, malformed, or seen unchanged for its whole ttl on our own clock."""
        if raw is None or lease is None:
            return True
        now = time.monotonic()
        if self._seen is None or self._seen[0] != raw:
            self._seen = (raw, now)  # a new lease or a renewal: its ttl starts now, for us
            return False
        return now - self._seen[1] >= float(lease.get("ttl_s", self.settings.ttl_s))

    def _ours(self, lease: dict[str, Any] | None) -> bool:
        return lease is not None and lease.get("token") == self.token

    def _expired_for_us(self) -> bool:
        """We could not renew for a whole ttl: others may have taken the lease since."""
        return time.monotonic() - self._renewed_at > self.settings.ttl_s

    # -- acquire / release -----------------------------------------------------------------------
    def __enter__(self) -> PromotionLock:
        deadline = time.monotonic() + self.settings.timeout_s
        self._lock_file(deadline)
        try:
            self._lock_database(deadline)
            self._acquire(deadline)
        except BaseException:
            self._unlock_database()
            self._unlock_file()
            raise
        self._heartbeat = threading.Thread(target=self._renew, daemon=True)
        self._heartbeat.start()
        return self

    def _acquire(self, deadline: float) -> None:
        s = self.settings
        while True:
            started = time.monotonic()
            raw, lease = self._read()
            if self._free(raw, lease) or self._ours(lease):
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
                if quick and self._ours(self._read()[1]):
                    return
                if not quick:  # we may have overwritten a lease taken after our read: undo it
                    self._release_tag()
            if time.monotonic() > deadline:
                raise RegistryError(self._busy_message(lease))
            time.sleep(s.poll_s * (1 + random.random()))  # jitter: two waiters don't lock-step

    def _busy_message(self, lease: dict[str, Any] | None) -> str:
        holder = (
            f"held by {lease.get('host')} pid {lease.get('pid')}, renewed every "
            f"{float(lease.get('ttl_s', self.settings.ttl_s)) / 3:g}s"
            if lease
            else "contended"
        )
        return (
            f"registered model {self.name!r}: another {self.purpose} holds the lock "
            f"({holder}); gave up after {self.settings.timeout_s:g}s. If that process is gone, "
            f"the lease expires by itself, or delete the model's tag {self.tag!r}"
        )

    def ensure_held(self) -> None:
        """Raise unless the lease is still ours (it may have lapsed under a stalled process or
        an MLflow outage longer than the lease)."""
        if self._lost.is_set() or self._expired_for_us() or not self._ours(self._read()[1]):
            raise RegistryError(
                f"registered model {self.name!r}: lost the {self.purpose} lock (not renewed "
                f"within the {self.settings.ttl_s:g}s lease: MLflow unreachable, or the process "
                "stalled); nothing was changed, run it again"
            )

    def _renew(self) -> None:
        while not self._stop.wait(self.settings.ttl_s / 3):
            try:
                if not self._ours(self._read()[1]):
                    self._lost.set()
                    return
                self._write()
            except Exception:  # a failed renewal is retried; after a whole ttl the lease is lost
                if self._expired_for_us():
                    self._lost.set()
                    return

    def _release_tag(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            _, lease = self._read()
            if self._ours(lease):
                self.client.delete_registered_model_tag(self.name, self.tag)
        except (MlflowException, RegistryError):
            pass  # the lease expires by itself

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        self._release_tag()
        self._unlock_database()
        self._unlock_file()

    # -- the advisory lock (PostgreSQL stores) -------------------------------------------------
    def _lock_database(self, deadline: float) -> None:
        """With a PostgreSQL tracking store, `pg_try_advisory_lock` on a key derived from the
        model and the lock's purpose, held on one connection for as long as the lock is."""
        uri = self.client.tracking_uri
        if uri.partition("://")[0].partition("+")[0] != "postgresql":
            return
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        from pipeline.storage import mask_credentials

        digest = hashlib.sha256(f"pipeline:{self.tag}:{self.name}".encode()).digest()
        key = int.from_bytes(digest[:8], "big", signed=True)
        from pipeline.servers import postgres_backend_uri

        engine = sqlalchemy.create_engine(postgres_backend_uri(uri), poolclass=NullPool)
        try:
            self._db = engine.connect()
        except sqlalchemy.exc.DBAPIError as exc:
            engine.dispose()
            raise RegistryError(
                f"{mask_credentials(uri)}: cannot connect for the {self.purpose} lock "
                f"({' '.join(str(exc.orig).split())})"
            ) from None
        self._db_key = key
        while not self._db.execute(
            sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}
        ).scalar():
            if time.monotonic() > deadline:
                self._unlock_database()
                raise RegistryError(self._busy_message(None))
            time.sleep(self.settings.poll_s * (1 + random.random()))

    def _unlock_database(self) -> None:
        if self._db is None:
            return
        import sqlalchemy

        try:
            self._db.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self._db_key})
        except sqlalchemy.exc.DBAPIError:
            pass  # closing the session releases it too
        finally:
            engine = self._db.engine
            self._db.close()
            engine.dispose()
            self._db = None

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
