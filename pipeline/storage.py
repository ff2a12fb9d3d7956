"""One place that turns a URI into a filesystem: local paths and `s3://bucket/prefix`.

S3 credentials come from the standard boto3 chain (env vars, shared config/credentials files,
instance roles); `StorageConfig.endpoint_url` points at MinIO, moto or any S3-compatible store.
Every network call has a bounded timeout and a bounded number of attempts, and every failure is
raised as a `StorageError` naming the URI and what to do about it.
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse, urlsplit, urlunsplit

import pyarrow.fs as pafs

from pipeline.config import StorageConfig
from pipeline.errors import StorageError


@dataclass(frozen=True)
class Location:
    """A resolved URI: the filesystem, the path inside it, and the URI for messages."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_s3(self) -> bool:
        return is_s3(self.uri)

    def join(self, *parts: str) -> Location:
        return Location(self.fs, posixpath.join(self.path, *parts), join_uri(self.uri, *parts))


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join_uri(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return str(Path(uri, *parts))


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"{uri}: not an S3 URI; expected s3://bucket/prefix")
    return parsed.netloc, parsed.path.lstrip("/")


def resolve(uri: str, storage: StorageConfig | None = None) -> Location:
    """URI -> Location. Plain paths (and file://) are local; s3:// goes through S3FileSystem."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            fs = s3_filesystem(storage or StorageConfig())
        except StorageError as exc:
            raise StorageError(f"{uri}: {exc}") from None
        return Location(fs, f"{bucket}/{key}".rstrip("/"), uri.rstrip("/"))
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: unsupported URI scheme; use a local path or s3://bucket/prefix")
    local = Path(uri.removeprefix("file://")).expanduser().resolve()
    return Location(pafs.LocalFileSystem(), str(local), str(local))


def _boto3_credentials():
    import boto3

    creds = boto3.Session().get_credentials()
    if creds is None:
        raise StorageError(
            "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or an instance role (the standard boto3 credential chain)"
        )
    return creds.get_frozen_credentials()


def _endpoint_parts(endpoint_url: str | None) -> tuple[str | None, str]:
    if not endpoint_url:
        return None, "https"
    parsed = urlparse(endpoint_url)
    if not parsed.scheme or not parsed.netloc:
        raise StorageError(
            f"storage.endpoint_url {endpoint_url!r}: expected a URL like http://127.0.0.1:9000"
        )
    return parsed.netloc, parsed.scheme


def s3_filesystem(storage: StorageConfig) -> pafs.S3FileSystem:
    storage = storage.resolved()
    creds = _boto3_credentials()
    return _cached_s3(
        creds.access_key,
        creds.secret_key,
        creds.token,
        storage.endpoint_url,
        storage.region or "us-east-1",
        storage.connect_timeout_s,
        storage.request_timeout_s,
        storage.max_attempts,
    )


def s3_filesystem_opened() -> bool:
    """True once this process has created an S3 filesystem (its SDK threads are running)."""
    return _cached_s3.cache_info().currsize > 0


@lru_cache(maxsize=8)
def _cached_s3(
    access_key, secret_key, token, endpoint_url, region, connect_timeout, request_timeout, attempts
) -> pafs.S3FileSystem:
    endpoint, scheme = _endpoint_parts(endpoint_url)
    return pafs.S3FileSystem(
        access_key=access_key,
        secret_key=secret_key,
        session_token=token,
        region=region,
        endpoint_override=endpoint,
        scheme=scheme,
        connect_timeout=connect_timeout,
        request_timeout=request_timeout,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
        allow_bucket_creation=False,
    )


def s3_client(storage: StorageConfig | None = None):
    """A boto3 S3 client with the same endpoint, region, timeouts and retry budget."""
    import boto3
    from botocore.config import Config

    storage = (storage or StorageConfig()).resolved()
    _endpoint_parts(storage.endpoint_url)  # validates the URL shape
    return boto3.client(
        "s3",
        endpoint_url=storage.endpoint_url,
        region_name=storage.region or "us-east-1",
        config=Config(
            connect_timeout=storage.connect_timeout_s,
            read_timeout=storage.request_timeout_s,
            retries={"max_attempts": storage.max_attempts, "mode": "standard"},
            s3={"addressing_style": "path"} if storage.endpoint_url else {},
        ),
    )


def check_bucket(uri: str, storage: StorageConfig | None = None) -> None:
    """Fail early and clearly when the bucket is missing, forbidden or unreachable."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    bucket, _ = split_s3(uri)
    storage = (storage or StorageConfig()).resolved()
    where = storage.endpoint_url or "AWS S3"
    _boto3_credentials()
    try:
        s3_client(storage).head_bucket(Bucket=bucket)
    except NoCredentialsError as exc:
        raise StorageError(f"{uri}: no AWS credentials found ({exc})") from None
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError) as exc:
        raise StorageError(
            f"{uri}: cannot reach the S3 endpoint {where} within "
            f"{storage.connect_timeout_s:g}s x {storage.max_attempts} attempts ({exc}); check "
            "storage.endpoint_url / AWS_ENDPOINT_URL and that the server is running"
        ) from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in {"404", "NoSuchBucket", "NotFound"}:
            raise StorageError(
                f"{uri}: bucket {bucket!r} does not exist at {where}; create it first "
                f"(aws s3 mb s3://{bucket})"
            ) from None
        if code in {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
            raise StorageError(
                f"{uri}: access to bucket {bucket!r} at {where} was denied ({code}); check the "
                "AWS credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE) and "
                "the bucket policy"
            ) from None
        raise StorageError(f"{uri}: S3 error {code} from {where}: {exc}") from None


def exists(loc: Location) -> bool:
    try:
        return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise StorageError(f"{loc.uri}: cannot be read: {exc}") from None


def read_bytes(loc: Location) -> bytes:
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"{loc.uri}: file not found") from None
    except OSError as exc:
        raise StorageError(f"{loc.uri}: cannot be read: {exc}") from None


def write_bytes_atomic(loc: Location, data: bytes | memoryview) -> None:
    """Write so that readers see the old file, the whole new file, or nothing.

    Locally: write a temporary sibling, fsync, rename. On S3 a PUT is already all-or-nothing.
    """
    try:
        if loc.is_s3:
            with loc.fs.open_output_stream(loc.path) as f:
                f.write(data)
            return
        os.makedirs(os.path.dirname(loc.path), exist_ok=True)
        tmp = f"{loc.path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, loc.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as exc:
        raise StorageError(f"{loc.uri}: cannot be written: {exc}") from None


def delete_tree(loc: Location) -> None:
    try:
        if exists(loc):
            loc.fs.delete_dir(loc.path)
    except OSError as exc:
        raise StorageError(f"{loc.uri}: cannot be deleted: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Credentials in URIs (database, tracking and endpoint URIs may carry a user and password)


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^\s/]+@")


def mask_credentials(text: str) -> str:
    """`text` (a URI, or a message, log line or YAML holding URIs) with the password of every
    `scheme://user:password@host` replaced by ***: for messages, logs, MLflow params and
    artifacts."""
    return _USERINFO.sub(r"\g<scheme>\g<user>:***@", text)


def strip_credentials(uri: str) -> str:
    """`uri` without its user and password, for records that outlive the session."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc))
    return uri
