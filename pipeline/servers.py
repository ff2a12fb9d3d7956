"""`pipeline server mlflow`: the tracking server's command line, who may reach it, and a bounded
check of a PostgreSQL backend store before MLflow's own ~100 s of retries.

Servers bind 127.0.0.1 unless told (DESIGN.md, security rules). Any other interface (0.0.0.0, ::,
a LAN address or a host name) puts the server on the network, so `pipeline server mlflow` then
needs both guards MLflow offers: `--allowed-hosts` (the Host headers it answers, MLflow's
DNS-rebinding check) and `--auth` (basic auth: `mlflow server --app-name basic-auth`). `--insecure`
is the explicit opt-out, for a network the user trusts or a server behind an authenticating proxy.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Mapping
from urllib.parse import urlsplit

from pipeline.errors import ConfigError, ServingError
from pipeline.storage import mask_credentials as masked_uri


def tracking_server_command(
    backend_store_uri: str = "sqlite:///mlflow.db",
    artifacts_destination: str = "./mlartifacts",
    host: str = "127.0.0.1",
    port: int = 5000,
    workers: int = 2,
    allowed_hosts: str | None = None,
    auth: bool = False,
) -> list[str]:
    """`mlflow server` with proxied artifacts (clients need no storage credentials); `auth`:
    MLflow's basic-auth app."""
    if _is_postgres(backend_store_uri):
        backend_store_uri = postgres_backend_uri(backend_store_uri)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        *(BASIC_AUTH_ARGS if auth else ()),
        "--backend-store-uri",
        backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts_destination,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    if allowed_hosts:  # MLflow 3 rejects other Host headers (DNS-rebinding protection)
        cmd += ["--allowed-hosts", allowed_hosts]
    return cmd


# SQLAlchemy's PostgreSQL drivers that take libpq's connect_timeout, by URI driver name.
_PG_DRIVERS = {"psycopg2": "psycopg2", "psycopg": "psycopg"}


def _is_postgres(uri: str) -> bool:
    return uri.partition("://")[0].partition("+")[0] == "postgresql"


def postgres_backend_uri(uri: str) -> str:
    """A postgresql:// URI naming a driver that is installed.

    SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; with only psycopg2 installed (the
    `postgres` extra) the URI becomes postgresql+psycopg2://. A URI naming its driver is kept.
    """
    import importlib.util

    scheme, _, rest = uri.partition("://")
    driver = scheme.partition("+")[2]
    if driver:
        module = _PG_DRIVERS.get(driver, driver)
        if importlib.util.find_spec(module) is None:
            raise ServingError(
                f"--backend-store-uri {masked_uri(uri)}: the {driver} driver is not installed; "
                f"install it (`.venv/bin/pip install {module}`) or use postgresql:// with "
                "`.venv/bin/pip install psycopg2-binary`"
            )
        return uri
    if importlib.util.find_spec("psycopg") is not None:
        return uri
    if importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    raise ServingError(
        f"--backend-store-uri {masked_uri(uri)}: PostgreSQL needs a driver; install one with "
        "`.venv/bin/pip install psycopg2-binary` (or `pip install -e '.[postgres]'`)"
    )


def check_backend_store(uri: str, timeout_s: float = 10.0) -> None:
    """Connect once to a PostgreSQL backend store, with a bounded wait.

    `mlflow server` itself retries a failing database for about 100 s and then ends in a
    traceback; this fails in seconds with the URI (password masked) and what to fix.
    """
    if not _is_postgres(uri):
        return
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    shown = masked_uri(uri)
    uri = postgres_backend_uri(uri)
    try:
        driver = sqlalchemy.engine.make_url(uri).get_driver_name()
        bounded = {"connect_timeout": max(2, round(timeout_s))} if driver in _PG_DRIVERS else {}
        engine = sqlalchemy.create_engine(uri, poolclass=NullPool, connect_args=bounded)
    except (sqlalchemy.exc.ArgumentError, ValueError) as exc:
        raise ServingError(
            f"--backend-store-uri {shown}: not a valid PostgreSQL URI ({exc}); expected "
            "postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
        ) from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.DBAPIError as exc:
        reason = " ".join(str(exc.orig).split())
        password = urlsplit(uri).password
        if password:
            reason = reason.replace(password, "***")
        raise ServingError(
            f"--backend-store-uri {shown}: cannot connect to PostgreSQL ({reason}); check that "
            "the server runs and accepts TCP connections at that host and port, the user and "
            "password, and that the database exists (createdb DATABASE)"
        ) from None
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------------
# Who may reach it

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
