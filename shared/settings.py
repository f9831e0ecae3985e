"""One typed settings object for every ``FEATUREMAPS_*`` environment variable.

Built once at each entry point (API factory, worker start-up, CLI) and passed down; library
code never reads ``os.environ`` itself.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.access import SourceRule, parse_source_allow, parse_tokens
from shared.options import ARCHITECTURES, DEFAULT_MODEL


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEATUREMAPS_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    s3_endpoint: str = "127.0.0.1:9000"
    # No default: the service's own scoped S3 user (docs/security.md), never a root login.
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_bucket: str = "featuremaps"
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    # Host[:port] that clients outside the network use; presigned URLs are signed for it.
    s3_public_endpoint: str = ""
    presign_expiry_s: int = Field(900, ge=1, le=7 * 24 * 3600)

    # imagenet | random | path to a state_dict file
    weights: str = "imagenet"
    weights_seed: int = 0
    # auto | cpu | cuda | cuda:N
    device: str = "auto"
    # The architectures jobs may ask for (option `model`), a comma list of
    # shared.options.ARCHITECTURES; resnet18 is always enabled. WEIGHTS imagenet|random apply
    # to each; a state_dict path is ResNet-18's only (docs/design.md "Models").
    models: str = DEFAULT_MODEL
    # Models a worker keeps loaded besides ResNet-18 (which always stays), least recently
    # used evicted first.
    resident_models: int = Field(2, ge=1)
    # An uploaded weights file (POST /models) may be at most this large.
    max_model_bytes: int = Field(1024**3, gt=0)

    # Bearer tokens (shared/access.py): `name:token,…` here, or `name:sha256hex` lines in the
    # file; neither means no auth.
    api_tokens: str = ""
    api_tokens_file: Path | None = None
    # `s3://bucket/prefix/` (or `name=s3://…` for one token) a batch may read; none by default.
    source_allow: str = ""
    # false: a job's uploaded input is deleted when the job ends, a batch's archive and
    # expanded members when it is finalized; figures stay for the TTL.
    keep_inputs: bool = False
    max_upload_mb: float = Field(20.0, gt=0)
    max_image_pixels: int = Field(50_000_000, gt=0)
    max_form_parts: int = Field(20, gt=0)
    max_archive_members: int = Field(2_000_000, gt=0)
    max_archive_bytes: int = Field(10 * 1024**3, gt=0)
    max_archive_member_bytes: int = Field(50 * 1024**2, gt=0)
    max_compression_ratio: float = Field(200.0, gt=1)
    job_ttl_hours: float = Field(24.0, gt=0)
    # A job or batch item whose digest (input bytes, output options, weights, computation
    # version) already has a finished result gets server-side copies of it instead of a
    # model pass (worker/reuse.py, docs/design.md "Result reuse").
    reuse_results: bool = True
    batch_chunk: int = Field(16, ge=1, le=512)
    # Batch chunks are handed out in fair turns (shared/schedule.py): at most this many turn
    # messages are queued or running at once over all batches. Set it to about twice the
    # worker slots at full scale: fewer leaves workers idle; more only lengthens the queue.
    batch_window: int = Field(64, ge=1, le=100_000)
    # Each owner (token) gets an equal share of chunk turns; "owner=weight,..." changes that
    # (an owner of weight 2 gets twice the turns of one of weight 1).
    owner_weights: str = ""
    # A finished batch's results are written in shards of this many members (a manifest and
    # a zip each, worker/batches/finalize.py): at ~250 KB a figure, 5,000 make a zip of ~1.25 GB.
    result_shard_items: int = Field(5_000, ge=1)
    # Dataset examples: the winning items go through the model again in slices of this many,
    # one task each (worker/batches/examples.py, docs/design.md "Dataset examples").
    example_slice_items: int = Field(64, ge=1)

    # Celery: the soft limit ends the job as `timeout`; both stay below the visibility
    # timeout so a running task is never handed to a second worker.
    task_soft_time_limit_s: int = Field(120, gt=0)
    task_time_limit_s: int = Field(150, gt=0)
    visibility_timeout_s: int = Field(600, gt=0)
    # Expanding a big archive (tens of thousands of members) takes longer than one job;
    # unset, they are 80% and 90% of the visibility timeout.
    expand_soft_time_limit_s: int | None = Field(None, gt=0)
    expand_time_limit_s: int | None = Field(None, gt=0)
    # Expansion (worker/batches/expand.py): a zip's members are cut into shards of this many (a
    # multiple of the 128-member block), expanded in parallel; every expansion task hands
    # on to a continuation of itself after this many seconds (or at its soft time limit).
    expand_shard_members: int = Field(20_480, ge=128)
    expand_slice_s: float = Field(120.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    storage_retries: int = Field(5, ge=0)
    storage_retry_backoff_s: float = Field(1.0, ge=0)

    rate_limit_per_minute: int = Field(0, ge=0)  # 0 = off

    # The keeper's reconciler (keeper/reconciler.py) sweeps every RECONCILE_EVERY_S and
    # repairs a record that nothing has moved for RECONCILE_GRACE_S (two sweeps apart at
    # least): a job whose message is gone, a batch never finalized, a webhook left out.
    reconcile_every_s: float = Field(30.0, gt=0)
    reconcile_grace_s: float = Field(60.0, ge=0)
    # The keeper restores jobs and batches accepted and then lost with Redis's last second
    # (keeper/restore.py): a sweep over their specs in storage every RESTORE_EVERY_S.
    restore_every_s: float = Field(300.0, gt=0)

    # Webhooks (shared/webhooks.py): callbacks are signed with this key; without one a
    # callback_url is refused. Private, loopback and link-local targets only when allowed.
    webhook_secret: str = ""
    webhook_allow_private: bool = False
    # One attempt's connect and read timeout; retries back off from WEBHOOK_BACKOFF_S,
    # doubling, until WEBHOOK_RETRY_FOR_S after the first attempt.
    webhook_timeout_s: float = Field(5.0, gt=0, le=60)
    webhook_backoff_s: float = Field(2.0, gt=0)
    webhook_retry_for_s: int = Field(3600, ge=0)
    # A batch's per-item callbacks (item_callbacks=true) start at most this many per second.
    webhook_item_rate: float = Field(10.0, gt=0, le=1000)

    # /readyz fails while no worker heartbeats. Off where workers scale to zero on an empty
    # queue (KEDA, deploy/k8s/): the API must stay in its Service to take the job that
    # brings the first worker up.
    readyz_requires_worker: bool = True
    # Each worker process serves Prometheus metrics on this port (0 = off); the launcher
    # gives its N-th worker this port + N.
    worker_metrics_port: int = Field(0, ge=0, le=65535)

    _token_table: dict[str, str] = PrivateAttr(default_factory=dict)
    _source_rules: tuple[SourceRule, ...] = PrivateAttr(default=())

    @field_validator("expand_shard_members")
    @classmethod
    def _whole_blocks(cls, value: int) -> int:
        if value % 128:
            raise ValueError("FEATUREMAPS_EXPAND_SHARD_MEMBERS must be a multiple of 128 (a block)")
        return value

    @field_validator("weights")
    @classmethod
    def _weights_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("FEATUREMAPS_WEIGHTS must be imagenet, random or a state_dict path")
        return value.strip()

    @field_validator("owner_weights")
    @classmethod
    def _owner_weights(cls, value: str) -> str:
        from shared.schedule import parse_weights

        parse_weights(value)  # a clear error at start, not at the first claim
        return value

    @field_validator("models")
    @classmethod
    def _known_models(cls, value: str) -> str:
        names = [name.strip() for name in value.split(",") if name.strip()]
        unknown = [name for name in names if name not in ARCHITECTURES]
        if unknown:
            raise ValueError(
                f"FEATUREMAPS_MODELS names {', '.join(unknown)}, not among the supported "
                f"architectures: {', '.join(ARCHITECTURES)}"
            )
        return ",".join(dict.fromkeys([DEFAULT_MODEL, *names]))

    @model_validator(mode="after")
    def _weights_for_every_model(self) -> Settings:
        if self.weights not in ("imagenet", "random") and self.enabled_models != (DEFAULT_MODEL,):
            raise ValueError(
                "FEATUREMAPS_WEIGHTS as a state_dict path holds ResNet-18's weights only; with "
                "other FEATUREMAPS_MODELS enabled use imagenet or random, and upload other "
                "weights with POST /models"
            )
        return self

    @property
    def enabled_models(self) -> tuple[str, ...]:
        """The architectures jobs may ask for, ResNet-18 first."""
        return tuple(self.models.split(","))

    @model_validator(mode="after")
    def _parse_access(self) -> Settings:
        self._token_table = parse_tokens(self.api_tokens, self.api_tokens_file)
        self._source_rules = parse_source_allow(self.source_allow)
        return self

    @property
    def token_table(self) -> dict[str, str]:
        """Token name → SHA-256 hex digest of the token; empty means no auth."""
        return self._token_table

    @property
    def source_rules(self) -> tuple[SourceRule, ...]:
        return self._source_rules

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def expand_limits_s(self) -> tuple[int, int]:
        """(soft, hard) time limits of the archive-expansion task."""
        return (
            self.expand_soft_time_limit_s or int(self.visibility_timeout_s * 0.8),
            self.expand_time_limit_s or int(self.visibility_timeout_s * 0.9),
        )

    @property
    def job_ttl_s(self) -> int:
        return max(1, int(self.job_ttl_hours * 3600))
