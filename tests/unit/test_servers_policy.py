"""`pipeline server mlflow --host`: off loopback it needs allowed hosts and auth, or --insecure."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError, PipelineError
from pipeline.servers import (
    BASIC_AUTH_SECRET_ENV,
    allowed_host_list,
    check_basic_auth_env,
    check_server_exposure,
    is_loopback,
)


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.0.0.2", "localhost", "LOCALHOST", "::1", "[::1]", "::ffff:127.0.0.1"]
)
def test_loopback_hosts_need_nothing(host):
    assert is_loopback(host)
    check_server_exposure(host, allowed_hosts=None, auth=False, insecure=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "192.168.1.20", "mlflow.example"])
def test_network_hosts_are_not_loopback(host):
    assert not is_loopback(host)


def test_a_public_bind_without_allowed_hosts_or_auth_names_both_and_the_ways_out():
    with pytest.raises(ConfigError) as caught:
        check_server_exposure("0.0.0.0", allowed_hosts=None, auth=False, insecure=False)
    message = str(caught.value)
    assert isinstance(caught.value, PipelineError)
    assert message.startswith("--host 0.0.0.0:")
    for hint in ("--allowed-hosts", "--auth", "--insecure", "127.0.0.1", BASIC_AUTH_SECRET_ENV):
        assert hint in message


@pytest.mark.parametrize(
    ("allowed_hosts", "auth", "missing", "present"),
    [
        ("mlflow.example:5000", False, "--auth", "--allowed-hosts HOST"),
        (None, True, "--allowed-hosts", "--auth ("),
        ("  , ", True, "--allowed-hosts", "--auth ("),  # blanks are no hosts
        ("mlflow.example:5000,*", True, "without '*'", "--auth ("),
    ],
)
def test_each_missing_guard_is_refused_on_its_own(allowed_hosts, auth, missing, present):
    with pytest.raises(ConfigError) as caught:
        check_server_exposure("10.1.2.3", allowed_hosts, auth, insecure=False)
    assert missing in str(caught.value)
    assert present not in str(caught.value).split("also pass", 1)[1]


def test_both_guards_or_insecure_let_a_public_bind_through():
    check_server_exposure("0.0.0.0", "mlflow.example:5000,10.1.2.3:5000", auth=True, insecure=False)
    check_server_exposure("0.0.0.0", None, auth=False, insecure=True)


def test_the_server_name_appears_in_the_message():
    with pytest.raises(ConfigError, match="the scoring server"):
        check_server_exposure("::", None, False, False, server="the scoring server")


def test_allowed_host_list_splits_like_mlflow():
    assert allowed_host_list(" a:1, b:2 ,,") == ["a:1", "b:2"]
    assert allowed_host_list(None) == []


def test_basic_auth_needs_the_flask_secret_key():
    with pytest.raises(ConfigError, match=BASIC_AUTH_SECRET_ENV):
        check_basic_auth_env({})
    with pytest.raises(ConfigError, match=BASIC_AUTH_SECRET_ENV):
        check_basic_auth_env({BASIC_AUTH_SECRET_ENV: ""})
    check_basic_auth_env({BASIC_AUTH_SECRET_ENV: "k"})
