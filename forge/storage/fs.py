"""One way to reach any remote place: fsspec filesystems (s3fs, gcsfs, huggingface_hub's
HfFileSystem, http), with forge's settings (conf `storage:`), bounded retries, credentials
registered with the masking, and every failure as one line naming the URL."""

from __future__ import annotations

import logging
import os
import random
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

from forge.storage.config import StorageConfig

log = logging.getLogger("forge.storage")
T = TypeVar("T")
SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
LOCAL_SCHEMES = ("file", "forge")
# credentials in the environment of each store's client: registered with the masking
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "GOOGLE_OAUTH_ACCESS_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "HF_TOKEN",
)
# what a retry may cure: a server error, throttling, a timeout, a broken connection
TRANSIENT = re.compile(
    r"\b50[0-9]\b|InternalError|ServiceUnavailable|SlowDown|Throttl|RequestTimeout|timed? ?out|"
    r"Connection ?(reset|refused|aborted|closed|error)|ServerDisconnected|Server disconnected|"
    r"IncompleteRead|EndpointConnectionError|ResponseStreamingError|Broken pipe",
    re.I,
)
DENIED = re.compile(r"AccessDenied|Forbidden|\b403\b|Permission", re.I)
BAD_CREDENTIALS = re.compile(
    r"InvalidAccessKeyId|SignatureDoesNotMatch|ExpiredToken|TokenRefreshRequired|InvalidToken|"
    r"NoCredentials|Unable to locate credentials|\b401\b|Unauthorized|invalid_grant|RefreshError",
    re.I,
)
MISSING = re.compile(r"NoSuchBucket|NoSuchKey|Not ?Found|\b404\b|does not exist", re.I)

_settings = StorageConfig()


class StorageError(OSError):
    """A remote place that cannot be read or written; the message names the URL and what to do."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "storage error"


def configure(cfg: StorageConfig) -> None:
    """The settings every filesystem of this process is opened with (conf `storage:`)."""
    global _settings
    _settings = cfg
    register_storage_secrets()


def settings() -> StorageConfig:
    return _settings


def scheme(path: str) -> str | None:
    m = SCHEME.match(str(path))
    return m.group(1).lower() if m else None


def check_url(url: str, key: str) -> None:
    """A remote URL must name at least a bucket (or repo): `s3://` alone names nothing."""
    rest = str(url).split("://", 1)[1] if "://" in str(url) else ""
    if not rest.strip("/"):
        raise StorageError(f"{key}: {url} names no bucket; write {scheme(url)}://BUCKET/PATH")


def is_remote(path: object) -> bool:
    """A URL an fsspec backend reads (s3://, gs://, hf://, https://...), not a local path."""
    found = scheme(str(path))
    return found is not None and found not in LOCAL_SCHEMES


def register_storage_secrets() -> None:
    """Mask the stores' credentials wherever forge writes: the environment's, and those a
    profile file or instance role gives boto (read once here, never written)."""
    from forge.io.secrets import register_secret_env, register_secret_value

    for name in SECRET_ENV:
        register_secret_env(name)
    if not any(os.environ.get(k) for k in ("AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")):
        if not os.path.exists(os.path.expanduser("~/.aws/credentials")):
            return
    try:
        import botocore.session

        creds = botocore.session.Session().get_credentials()
    except Exception:  # no boto, a broken profile: the store's own call reports it, naming the URL
        return
    if creds is not None:
        frozen = creds.get_frozen_credentials()
        for value in (frozen.access_key, frozen.secret_key, frozen.token):
            register_secret_value(value)


def options(protocol: str) -> dict[str, Any]:
    """fsspec options for one protocol: storage.options[protocol], the endpoint and timeouts."""
    cfg = _settings
    opts: dict[str, Any] = dict((cfg.options or {}).get(protocol) or {})
    if protocol in ("s3", "s3a"):
        if cfg.endpoint_url:
            opts.setdefault("endpoint_url", cfg.endpoint_url)
        kwargs = dict(opts.get("config_kwargs") or {})
        kwargs.setdefault("connect_timeout", cfg.timeout_s)
        kwargs.setdefault("read_timeout", cfg.timeout_s)
        kwargs.setdefault("retries", {"max_attempts": cfg.max_retries + 1, "mode": "standard"})
        # checksums only where the API requires them: a CRC of every body costs CPU for nothing
        # (each object is whole or absent anyway), and older S3-compatible servers reject them
        kwargs.setdefault("request_checksum_calculation", "when_required")
        kwargs.setdefault("response_checksum_validation", "when_required")
        opts["config_kwargs"] = kwargs
    elif protocol == "hf":
        endpoint = os.environ.get("HF_ENDPOINT")
        if endpoint:
            opts.setdefault("endpoint", endpoint)
    return opts


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URL; instances are cached by fsspec."""
    import fsspec

    protocol = scheme(url) or "file"
    try:
        fs, path = fsspec.core.url_to_fs(url, **options(protocol))
    except (ImportError, ValueError) as exc:
        raise StorageError(
            f"{url}: no fsspec backend reads {protocol}:// here ({first_line(exc)}); "
            f"install it (s3fs, gcsfs and huggingface_hub come with forge)"
        ) from None
    return fs, path


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts if p)])


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, FileNotFoundError | FileExistsError | PermissionError | NotADirectoryError):
        return False
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    text = f"{type(exc).__name__}: {exc}"
    if DENIED.search(text) or BAD_CREDENTIALS.search(text):
        return False
    return bool(TRANSIENT.search(text))


def explain(url: str, exc: BaseException, doing: str) -> StorageError:
    """One line for a failed remote call: the URL, what failed and what to do."""
    if isinstance(exc, StorageError):
        return exc
    text = f"{type(exc).__name__}: {exc}"
    why = first_line(exc)
    if BAD_CREDENTIALS.search(text):
        hint = "the credentials were refused or have expired: renew them (AWS_*, ~/.aws, gcloud, HF_TOKEN)"
    elif isinstance(exc, PermissionError) or DENIED.search(text):
        hint = "access denied: these credentials may not do this; grant access or pick another place"
    elif isinstance(exc, FileNotFoundError) or MISSING.search(text):
        hint = "no such bucket or object"
    elif is_transient(exc):
        hint = f"the store kept failing after {_settings.max_retries} retries"
    else:
        hint = ""
    message = f"{url}: cannot {doing}: " + (f"{hint} ({why})" if hint else why)
    return StorageError(message)


def retrying(url: str, doing: str, call: Callable[[], T], passthrough: tuple[type[BaseException], ...] = ()) -> T:
    """call() with bounded retries on transient failures (backoff doubling from storage.backoff_s,
    with jitter); any other failure, or the last one, as a StorageError naming the URL (but the
    `passthrough` types, raised as they are)."""
    cfg = _settings
    delay = cfg.backoff_s
    for attempt in range(cfg.max_retries + 1):
        try:
            return call()
        except Exception as exc:
            if isinstance(exc, (StorageError, *passthrough)):
                raise
            if attempt >= cfg.max_retries or not is_transient(exc):
                raise explain(url, exc, doing) from None
            log.warning("%s: %s failed (%s); retry %d of %d", url, doing, first_line(exc), attempt + 1, cfg.max_retries)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 30.0)
    raise AssertionError("unreachable")
