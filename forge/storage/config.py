"""The `storage:` group: how forge reaches object stores (forge/storage/)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from forge.schema import ConfigError, neutral


@dataclass
class StorageConfig:
    """How inputs and run dirs on object stores are reached.

    Credentials are never set here: they come from the standard places (AWS_* variables or
    ~/.aws profiles for s3://, GOOGLE_APPLICATION_CREDENTIALS or gcloud's login for gs://, HF_TOKEN
    or the saved login for hf://) and are masked in every file and stream forge writes.

    Attributes:
        endpoint_url: an S3-compatible server (MinIO, Ceph, R2, a test server) for s3:// URLs;
            null = AWS_ENDPOINT_URL or AWS itself.
        options: extra fsspec options by protocol, e.g. `{s3: {requester_pays: true}}`.
        scratch_dir: local scratch for a remote run dir (its files, the request cache); null =
            $FORGE_SCRATCH, else ~/.cache/forge/scratch.
        sync_every_s: a remote run dir is brought up to date at every chunk and at least this
            often (also at the end, on Ctrl-C and on an error).
        max_retries, backoff_s: retries of a remote call on 5xx, throttling, timeouts and broken
            connections, the first after backoff_s, doubling; a denied or missing object is not
            retried.
        timeout_s: connect and read timeout of one remote call.
        lease_s: a remote run dir's lock that its holder stopped renewing for this long is
            stale (a holder on this machine whose process is gone is stale at once).
        read_ahead_rows: rows of a remote input read ahead of the stage (bounded memory).
    """

    endpoint_url: str | None = neutral(None)
    options: dict[str, Any] = neutral(factory=dict)
    scratch_dir: str | None = neutral(None)
    sync_every_s: float = neutral(10.0)
    max_retries: int = neutral(6)
    backoff_s: float = neutral(0.5)
    timeout_s: float = neutral(60.0)
    lease_s: float = neutral(60.0)
    read_ahead_rows: int = neutral(8192)

    def validate(self) -> None:
        for key in ("sync_every_s", "backoff_s", "timeout_s", "lease_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"storage.{key}: must be > 0 (got {getattr(self, key)})")
        if self.max_retries < 0:
            raise ConfigError(f"storage.max_retries: must be >= 0 (got {self.max_retries})")
        if self.read_ahead_rows < 1:
            raise ConfigError(f"storage.read_ahead_rows: must be >= 1 (got {self.read_ahead_rows})")
