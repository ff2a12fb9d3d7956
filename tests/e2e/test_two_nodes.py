"""Two Ray nodes on this machine, one training worker on each (scaling.placement_strategy=SPREAD),
checkpoints and run.storage_path on S3 (moto): the second node is killed outright mid-run (SIGKILL
to every process of its `ray start`, as when a machine goes away) and `pipeline train` resumes on
the remaining node from the last checkpoint on S3, finishing with every epoch logged once.

The head has room for the whole run alone (3 CPUs: 2 workers + 1 for Ray Data), the second node
for one worker (2 CPUs, and a `node2` resource that names it). Both nodes and the driver share a
token of their own (RAY_AUTH_MODE=token: a node or driver without it is refused), the moto S3
variables (the workers read and write the checkpoints) and Ray kept on 127.0.0.1
(`tests/support.py: ray_start_command`). The head's GCS checks its nodes every second instead of
every 3, so the lost node is declared dead in ~5 s rather than ~15 s and the restarted worker
group is placed sooner. Where the actors ran comes from Ray's state API (the head's dashboard).
"""

from __future__ import annotations

import secrets
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.support import (
    cluster_env,
    digits_on_s3_command,
    kill_started_by,
    logged_epochs,
    ray_start_command,
)

pytestmark = [pytest.mark.slow, pytest.mark.s3]


@dataclass
class StateApi:
    """Ray's state API on the head's dashboard, with the cluster's token."""

    dashboard: str  # http://127.0.0.1:<port>
    token: str

    def _list(self, resource: str, filters: list | None = None) -> list:
        from ray.util.state.api import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        client = StateApiClient(self.dashboard, headers={"Authorization": f"Bearer {self.token}"})
        return client.list(
            StateResource(resource),
            options=ListApiOptions(filters=filters or [], detail=True),
            raise_on_missing_output=False,
        )

    def alive_nodes(self) -> dict[str, dict[str, float]]:
        """node id -> total resources, of every node the GCS holds alive."""
        return {n.node_id: n.resources_total for n in self._list("nodes") if n.state == "ALIVE"}

    def actors(self, class_name: str | None = None) -> list:
        """Every actor (of `class_name`) the cluster has had, dead ones too."""
        return self._list("actors", [("class_name", "=", class_name)] if class_name else None)

    def wait_for_nodes(self, count: int, proc: subprocess.Popen, log: Path, timeout=120.0):
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}: {log.read_text()}")
            try:
                if len(self.alive_nodes()) == count:
                    return
            except Exception:  # the dashboard is still starting
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"not {count} alive Ray nodes after {timeout}s; see {log}")
            time.sleep(0.5)


@dataclass
class TwoNodes:
    gcs_address: str  # 127.0.0.1:<port>: what a driver passes to ray.init
    env: dict[str, str]  # a driver's environment for this cluster
    state: StateApi
    node2: subprocess.Popen  # its own session: killed alone


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


@pytest.fixture
def two_nodes(s3_server) -> Iterator[TwoNodes]:
    # Short: Ray's socket paths live under it and Unix sockets allow ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="rtn-", dir="/tmp"))
    token = secrets.token_hex(32)
    env = {**cluster_env(), **s3_server.env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    gcs, dashboard = free_port(), free_port()
    state = StateApi(f"http://127.0.0.1:{dashboard}", token)
    started: list[subprocess.Popen] = []
    try:
        log = temp_dir / "head.log"
        head = _start(
            ray_start_command(temp_dir / "head", 3, gcs_port=gcs, dashboard_port=dashboard),
            log,
            {**env, "RAY_health_check_period_ms": "1000"},
        )
        started.append(head)
        state.wait_for_nodes(1, head, log)
        log = temp_dir / "node2.log"
        node2 = _start(
            ray_start_command(
                temp_dir / "node2", 2, address=f"127.0.0.1:{gcs}", resources='{"node2": 1}'
            ),
            log,
            env,
        )
        started.append(node2)
        state.wait_for_nodes(2, node2, log)
        yield TwoNodes(f"127.0.0.1:{gcs}", env, state, node2)
    finally:
        for proc in reversed(started):
            kill_started_by(proc, grace_s=0)  # nothing on them needs draining
        shutil.rmtree(temp_dir, ignore_errors=True)


def _where(state: StateApi, names: dict[str, str]) -> str:
    """Each actor's class, node (by name) and state, for a failure message."""
    try:
        return "\n".join(
            f"{a.class_name} on {names.get(a.node_id, a.node_id)}: {a.state}"
            for a in state.actors()
        )
    except Exception as exc:
        return f"(no actor list: {exc})"


@pytest.mark.timeout(900)
def test_a_lost_node_resumes_on_the_other_from_s3_with_each_epoch_logged_once(
    two_nodes, tmp_path, digits_uri, s3_server
):
    state = two_nodes.state
    nodes = state.alive_nodes()
    (node2,) = [node for node, resources in nodes.items() if "node2" in resources]
    (head,) = set(nodes) - {node2}
    names = {head: "head", node2: "node2"}
    bucket = s3_server.new_bucket()
    db = tmp_path / "mlflow.db"
    command = digits_on_s3_command(
        digits_uri, bucket, db, "tracking.log_model=false", "run.name=two-nodes",
        "scaling.num_workers=2", "scaling.cpus_per_worker=1", "scaling.placement_strategy=SPREAD",
        "run.max_failures=2", f"scaling.ray_address={two_nodes.gcs_address}",
    )  # fmt: skip
    log = tmp_path / "train.log"
    train = subprocess.Popen(
        command, cwd=tmp_path, env=two_nodes.env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    try:
        first: dict[str, str] = {}  # the first worker group: actor id -> node id
        deadline = time.monotonic() + 600
        while len(logged_epochs(db)) < 2:  # epochs 0 and 1 logged: a checkpoint is on S3
            assert train.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no second epoch within 600 s"
            if not first:
                try:
                    alive = [w for w in state.actors("RayTrainWorker") if w.state == "ALIVE"]
                except Exception:  # a slow answer on a busy machine: ask again
                    alive = []
                if len(alive) == 2:
                    first = {w.actor_id: w.node_id for w in alive}
            time.sleep(0.5)
        kill_started_by(two_nodes.node2, grace_s=0)  # the machine is gone: no clean shutdown
        before = logged_epochs(db)
        assert sorted(first.values()) == sorted([head, node2]), "SPREAD: one worker per node"
        assert 2 <= len(before) < 4, f"not mid-run: epochs {before} logged at the kill"
        train.wait(timeout=600)
    finally:
        if train.poll() is None:
            train.kill()
            train.wait(30)
    assert train.returncode == 0, f"{log.read_text()[-3000:]}\n{_where(state, names)}"

    epochs = logged_epochs(db)
    (run_id,) = {run for run, _ in epochs}  # one MLflow run across both worker groups
    assert [step for _, step in epochs] == [0, 1, 2, 3], "each epoch logged exactly once"
    resumed = [step for _, step in logged_epochs(db, "resumed_from_epoch")]
    assert resumed, "the restarted workers resumed from a checkpoint instead of starting over"
    with sqlite3.connect(db) as con:
        (status,) = con.execute("SELECT status FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
    assert status == "FINISHED"

    # Where everything ran: node2 is gone, and a whole worker group ran on the head after it.
    assert list(state.alive_nodes()) == [head]
    groups: dict[str, list[str]] = {}
    for worker in state.actors("RayTrainWorker"):
        if worker.actor_id not in first:
            groups.setdefault(worker.placement_group_id, []).append(worker.node_id)
    assert [head, head] in groups.values(), _where(state, names)
    # The driver's own actors stay on its node (the head): the progress queue, which had
    # landed on node2 and failed every restarted rank 0, and Ray Train's controller.
    for name in ("_QueueActor", "TrainController"):
        assert {a.node_id for a in state.actors(name)} == {head}, _where(state, names)
