"""Who may reach a server the pipeline starts: a non-loopback bind needs allowed hosts and auth.

Servers bind 127.0.0.1 unless told (DESIGN.md, security rules). Any other interface (0.0.0.0, ::,
a LAN address or a host name) puts the server on the network, so `pipeline server mlflow` then
needs both guards MLflow offers: `--allowed-hosts` (the Host headers it answers, MLflow's
DNS-rebinding check) and `--auth` (basic auth: `mlflow server --app-name basic-auth`). `--insecure`
is the explicit opt-out, for a network the user trusts or a server behind an authenticating proxy.

Pure functions, no I/O: the CLI calls them before it starts anything.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from pipeline.errors import ConfigError

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
# What `mlflow server --app-name basic-auth` needs in its environment (MLflow 3.17): a static CSRF
# key, and the admin password on the first start (MLflow refuses to start without it then).
BASIC_AUTH_SECRET_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
BASIC_AUTH_ARGS = ("--app-name", "basic-auth")


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine (127.0.0.0/8, ::1, localhost)."""
    name = host.strip().removeprefix("[").removesuffix("]")
    if name.lower() in LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False  # a host name other than localhost resolves to a network interface
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 (Python 3.11 calls it non-loopback)
    return address.is_loopback


def allowed_host_list(allowed_hosts: str | None) -> list[str]:
    """`--allowed-hosts` as MLflow splits it: comma-separated, blanks dropped."""
    return [h.strip() for h in (allowed_hosts or "").split(",") if h.strip()]


def check_server_exposure(
    host: str,
    allowed_hosts: str | None,
    auth: bool,
    insecure: bool,
    server: str = "the MLflow tracking server",
) -> None:
    """Refuse a non-loopback `--host` unless both `--allowed-hosts` (without `*`) and `--auth`
    are given, or `--insecure` says the exposure is intended. Raises ConfigError."""
    if is_loopback(host) or insecure:
        return
    hosts = allowed_host_list(allowed_hosts)
    missing = []
    if not hosts:
        missing.append("--allowed-hosts HOST:PORT[,...] (the names clients use to reach it)")
    elif "*" in hosts:
        missing.append("--allowed-hosts without '*' (it accepts any Host header)")
    if not auth:
        missing.append(f"--auth (basic auth; set {BASIC_AUTH_SECRET_ENV} and, on the first "
                       "start, MLFLOW_AUTH_ADMIN_PASSWORD)")  # fmt: skip
    if missing:
        raise ConfigError(
            f"--host {host}: binding a non-loopback interface puts {server} on the network; "
            f"also pass {' and '.join(missing)}, or bind --host 127.0.0.1, or pass --insecure "
            "if the network is trusted"
        )


def check_basic_auth_env(environ: Mapping[str, str]) -> None:
    """`--auth` needs MLflow's CSRF key in the environment; say so before MLflow fails."""
    if not environ.get(BASIC_AUTH_SECRET_ENV):
        raise ConfigError(
            f"--auth: {BASIC_AUTH_SECRET_ENV} is not set; basic auth needs a static secret key "
            f'(e.g. export {BASIC_AUTH_SECRET_ENV}="$(openssl rand -hex 32)"), and on the first '
            "start MLFLOW_AUTH_ADMIN_PASSWORD for the admin user"
        )
