"""`pipeline submit` / `pipeline jobs` send Ray's token (RAY_AUTH_TOKEN) to a cluster with token
auth on (infra/k8s sets authOptions.mode: token on every cluster)."""

from __future__ import annotations

import pytest

from pipeline import cluster

TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def token_env(monkeypatch, tmp_path):
    from ray._raylet import AuthenticationTokenLoader

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token of the machine's user
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    AuthenticationTokenLoader.instance().reset_cache()
    yield monkeypatch
    AuthenticationTokenLoader.instance().reset_cache()


def test_the_token_from_the_environment_goes_in_the_authorization_header(token_env):
    token_env.setenv("RAY_AUTH_TOKEN", TOKEN)
    assert cluster._auth_headers() == {"authorization": f"Bearer {TOKEN}"}


def test_no_token_no_header_and_disabled_mode_sends_none(token_env):
    assert cluster._auth_headers() == {}
    token_env.setenv("RAY_AUTH_TOKEN", TOKEN)
    token_env.setenv("RAY_AUTH_MODE", "disabled")
    assert cluster._auth_headers() == {}
