"""`pipeline server mlflow`: the tracking server's command line, and a bounded check of a
PostgreSQL backend store before MLflow's own ~100 s of retries."""

from __future__ import annotations

import sys
from urllib.parse import urlsplit

from pipeline.errors import ServingError
from pipeline.storage import mask_credentials as masked_uri


def tracking_server_command(
    backend_store_uri: str = "sqlite:///mlflow.db",
    artifacts_destination: str = "./mlartifacts",
    host: str = "127.0.0.1",
    port: int = 5000,
    workers: int = 2,
    allowed_hosts: str | None = None,
) -> list[str]:
    """`mlflow server` with proxied artifacts (clients need no storage credentials)."""
    if _is_postgres(backend_store_uri):
        backend_store_uri = postgres_backend_uri(backend_store_uri)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
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
