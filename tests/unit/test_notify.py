"""Nightly notifications: a Slack-compatible JSON POST to each webhook, on the outcomes asked
for, bounded in time, never changing the night's own result, never showing the webhook's URL."""

from __future__ import annotations

import http.server
import json
import logging
import threading
import time

import pytest

from pipeline.config import load_config
from pipeline.errors import NightlyError, PipelineError
from pipeline.nightly import NightlyReport, notify, run_nightly
from tests.support import closed_port


class Hook:
    """A webhook receiver on 127.0.0.1 that records every JSON body it is sent."""

    def __init__(self, delay_s: float = 0.0, status: int = 200) -> None:
        self.bodies: list[dict] = []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers["Content-Length"])
                hook.bodies.append(json.loads(self.rfile.read(length)))
                time.sleep(delay_s)
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/services/T000/B000/s3cr3t-token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook():
    h = Hook()
    yield h
    h.close()


def closed_url() -> str:
    return f"http://127.0.0.1:{closed_port()}/hook/s3cr3t-token"


def cfg_with(*urls: str, on: str = "[failed]"):
    return load_config(
        None, [f"nightly.notify={json.dumps(list(urls))}", f"nightly.notify_on={on}"]
    )


def report(decision: str) -> NightlyReport:
    return NightlyReport(
        "2026-11-30", "digits-resnet", decision, "why", nightly_run_url="http://127.0.0.1/run"
    )


def test_a_failure_is_posted_as_slack_text_with_the_report(hook):
    failed = report("failed")
    failed.error = "NightlyError: the data is gone"
    assert notify(cfg_with(hook.url), failed) == []
    (body,) = hook.bodies
    assert body["text"].startswith("nightly 2026-11-30 for digits-resnet: failed")
    assert "the data is gone" in body["text"] and "http://127.0.0.1/run" in body["text"]
    assert (
        body["report"]["decision"] == "failed" and body["report"]["model_name"] == "digits-resnet"
    )


def test_only_the_outcomes_asked_for_are_sent(hook, monkeypatch):
    assert notify(cfg_with(hook.url), report("promoted")) == []
    assert hook.bodies == []  # default: failures only
    notify(cfg_with(hook.url, on="[promoted, refused]"), report("promoted"))
    assert [b["report"]["decision"] for b in hook.bodies] == ["promoted"]
    monkeypatch.setenv("PIPELINE_NOTIFY_URLS", f" {hook.url} ")
    notify(load_config(None, []), report("failed"))  # from the environment alone
    assert len(hook.bodies) == 2


def test_unreachable_or_slow_webhooks_are_bounded_and_never_raise(caplog):
    slow = Hook(delay_s=5.0)
    try:
        cfg = cfg_with(closed_url(), slow.url)
        cfg.nightly.notify_timeout_s = 0.5
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="pipeline.notify"):
            failed = notify(cfg, report("failed"))
        assert time.monotonic() - started < 4.0
    finally:
        slow.close()
    assert len(failed) == 2
    assert "s3cr3t-token" not in caplog.text and "s3cr3t-token" not in repr(failed)
    assert caplog.text.count("notification to http://127.0.0.1:") == 2


def test_a_nightly_that_fails_early_is_still_reported(hook, tmp_path):
    cfg = load_config(
        None,
        [
            f"data.uri={tmp_path / 'no-such-data'}",
            "data.prepare=null",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"nightly.notify={json.dumps([hook.url])}",
        ],
    )
    with pytest.raises((NightlyError, PipelineError)) as info:
        run_nightly(cfg, date="2026-11-30")
    (body,) = hook.bodies
    assert body["report"]["decision"] == "failed"
    assert str(info.value) in body["text"]


def test_webhooks_are_hidden_in_mlflow_params():
    from pipeline.tracking import redact_config

    flat = redact_config({"nightly.notify": ["https://hooks.example.invalid/T/B/secret"]})
    assert flat == {"nightly.notify": "<1 hidden>"}
    nested = redact_config({"nightly": {"notify": ["https://x.invalid/secret"], "lr": 0.1}})
    assert nested == {"nightly": {"notify": "<1 hidden>", "lr": 0.1}}
