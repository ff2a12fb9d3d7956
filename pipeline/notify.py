"""Webhook notifications: a JSON POST per configured URL, bounded in time, never fatal.

The body is Slack-compatible (`text`, shown by Slack, Mattermost, Teams' incoming webhooks and
most chat tools) plus the structured report under `report` for anything that parses it. A URL
that fails (refused, slow, non-2xx) is logged with its host only (webhook URLs are secrets) and
the caller's result is unchanged.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)


def shown(url: str) -> str:
    """A webhook URL as it may appear in logs: scheme and host, never the path or token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}{f':{parts.port}' if parts.port else ''}/…"


def send(urls: list[str], payload: dict[str, Any], timeout_s: float) -> list[str]:
    """POST `payload` as JSON to every URL; returns the (shown) URLs that failed."""
    body = json.dumps(payload, default=str).encode()
    failed = []
    for url in urls:
        request = urllib.request.Request(
            url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                response.read(1024)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            log.warning("notification to %s failed: %s", shown(url), reason)
            failed.append(shown(url))
    return failed
