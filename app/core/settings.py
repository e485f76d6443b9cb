"""Settings: the one place that reads the environment (prefix ``REALIGN_``)."""

from __future__ import annotations

import json
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from app.core.envparse import (
    ListFriendlyDotEnvSource,
    ListFriendlyEnvSource,
    explain,
    markdown_table,
)
from app.core.errors import InvalidSettingsError

PackFormat = Literal["exact", "bfloat16", "float16", "float32", "int8", "int4", "bitdelta"]
"""The residual pack formats (``--pack``, ``dtype`` of requests)."""


class Settings(BaseSettings):
    """Process-wide configuration, built once and passed into factories."""

    model_config = SettingsConfigDict(env_prefix="REALIGN_", frozen=True, extra="ignore")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """List settings also take ``/a:/b`` and ``/a,/b`` (see ``app.core.envparse``)."""
        return (
            init_settings,
            ListFriendlyEnvSource(settings_cls),
            ListFriendlyDotEnvSource(settings_cls),
            file_secret_settings,
        )

    @field_validator("store_url")
    @classmethod
    def _store_url(cls, value: str) -> str:
        value = value.strip()
        if value and not (value.startswith("s3://") and len(value) > 5 and value[5] != "/"):
            raise ValueError("must be empty (local store) or s3://bucket/prefix")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        value = value.strip().lower()
        if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
            raise ValueError("must be cpu, cuda or cuda:N (N = 0, 1, ...)")
        return value

    @field_validator("serve_replicas")
    @classmethod
    def _replicas(cls, value: str) -> str:
        value = value.strip().lower()
        if value != "all" and not (value.isdigit() and int(value) >= 1):
            raise ValueError("must be a number of replicas (1 or more) or 'all'")
        return value

    def replicas_needed(self) -> int | None:
        """Replicas a serve=true job waits for; None = every live replica."""
        return None if self.serve_replicas == "all" else int(self.serve_replicas)

    @field_validator("vllm_args")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value or "{}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc})") from None
        if not isinstance(parsed, dict):
            raise ValueError("must be a JSON object of vLLM engine arguments")
        return value

    models_cache_dir: Path = Field(
        default=Path("models_cache"),
        description="Root of the artifact store: residuals/, merged/, evals/, sources/.",
    )
    store_budget_gb: float | None = Field(
        default=None,
        description="Size budget of the store in GB; least recently used artifacts are "
        "evicted beyond it (artifacts in use never are). Unset = unlimited.",
        examples=["500"],
    )
    device: str = Field(
        default="cpu",
        description="Where merge math runs: cpu, cuda or cuda:N. A worker set to CUDA "
        "refuses to start where there is none.",
        examples=["cuda:0"],
    )
    inline_scratch_mb: int = Field(
        default=512,
        ge=1,
        description="Memory an in-engine merge (a model served as `target + alpha * R` "
        "without writing it) may take besides the merged weights, in MB: each tensor is "
        "merged in row blocks this small (on CUDA on the GPU and in pinned host memory "
        "each); at least one row at a time. ties/dare merge whole tensors, unbounded.",
        examples=["256"],
    )
    residual_dtype: PackFormat = Field(
        default="exact",
        description="Pack format of residuals the service computes when a request names "
        "none: exact (lossless, smaller than bf16), R rounded to bfloat16/float16/float32, "
        "or (lossy, opt-in) int8, int4, bitdelta: R coded in 8, 4 or 1 bit with fp32 scales.",
    )
    max_shard_gb: float = Field(default=5.0, gt=0, description="Largest output shard in GB.")
    max_read_mbps: float | None = Field(
        default=None,
        gt=0,
        description="Cap on input MB read per second by one merge (shared storage); "
        "unset = as fast as the disk allows.",
        examples=["200"],
    )
    lineage_max_distance: float = Field(
        default=0.8,
        gt=0,
        description="Preflight refuses an instruct model or target whose sampled weights are "
        "farther than this from the base (median of |x - base| / |base| per tensor): "
        "fine-tunes measure ~0.001-0.01, continual pre-training up to a few tenths, unrelated "
        "models 1 or more (~1.4). Override one merge with `--force` / `force: true`.",
    )
    log_level: str = Field(
        default="INFO", description="DEBUG, INFO, WARNING or ERROR.", examples=["DEBUG"]
    )

    # -- job service -------------------------------------------------------------------
    redis_url: str | None = Field(
        default=None,
        description="Redis for the queue and job records; unset = embedded mode (one "
        "process, in-process worker, SQLite job records in the store).",
    )
    allowed_roots: list[Path] = Field(
        default_factory=list,
        description="Directories local model paths must resolve into (symlinks followed): "
        "`/a:/b`, `/a,/b` or a JSON list. Empty = only the store (`REALIGN_MODELS_CACHE_DIR`).",
        examples=["/data/models:/srv/models"],
    )
    api_keys: str | None = Field(
        default=None,
        description='API keys as JSON: [{"name": ..., "role": "user"|"admin", '
        '"sha256": <hex of the key>}]. Unset = no auth, loopback only.',
    )
    host: str = Field(
        default="127.0.0.1",
        description="Address `realign serve` binds; any other than loopback needs API keys.",
        examples=["0.0.0.0"],
    )
    port: int = Field(default=8000, ge=0, le=65535, description="Port `realign serve` binds.")
    max_body_bytes: int = Field(default=64 * 1024, description="Request body limit (413).")
    job_time_limit_s: int = Field(
        default=6 * 3600,
        description="Hard limit of one merge step: past it the job fails (`time_limit`).",
    )
    visibility_timeout_s: int = Field(
        default=7 * 3600, description="Redis redelivery timeout; must exceed the job limit."
    )
    max_deliveries: int = Field(
        default=3,
        description="A job redelivered more often fails (worker_lost); so does one whose "
        "queue message had to be re-sent this often (message_lost, see "
        "`REALIGN_JOB_REQUEUE_AFTER_S`).",
    )
    merge_parallel_min_shards: int = Field(
        default=4,
        ge=0,
        description="A merge whose model has at least this many output shards (see "
        "`REALIGN_MAX_SHARD_GB`) is split into one task per shard, run by all workers at "
        "once, and published by a final task (Redis workers only); 0 = never split.",
    )
    worker_queues: list[str] = Field(
        default_factory=lambda: ["gpu", "cpu"],
        description="Queues merge jobs go to, by preference: `gpu,cpu` or a JSON list.",
        examples=["gpu,cpu"],
    )
    worker_alive_file: Path | None = Field(
        default=None,
        description="File `realign worker` touches on every heartbeat (10 s), for a "
        "container liveness probe that checks its age; unset = none.",
        examples=["/tmp/realign-worker.alive"],
    )

    # -- serving -----------------------------------------------------------------------
    serve_role: Literal["all", "api", "serving"] = Field(
        default="all",
        description="What `realign serve` runs: all = job API and engines in one process; "
        "api = the job plane only (merges, admin, no engines); serving = engines and the "
        "OpenAI routes only. api and serving need REALIGN_REDIS_URL.",
        examples=["serving"],
    )
    serve_replicas: str = Field(
        default="1",
        description="Serving replicas that must have loaded a serve=true job's model before "
        "the job succeeds: a number, or `all` (every live replica).",
        examples=["all"],
    )
    serve_load_timeout_s: float = Field(
        default=1800.0,
        gt=0,
        description="How long a serve=true job waits for serving replicas to load its model "
        "before it fails with code load_timeout (the model stays registered and loads on "
        "its first request).",
    )
    engine: Literal["auto", "vllm", "torch"] = Field(
        default="auto", description="auto = vLLM when it is installed, else transformers."
    )
    max_engines: int = Field(default=1, ge=1, description="Engines kept loaded (memory budget).")
    engine_max_model_len: int | None = Field(
        default=None,
        ge=16,
        description="Context length (prompt + completion tokens) of served models. Unset = "
        "each model's own limit (`max_position_embeddings` etc. in its config); a lower "
        "value saves KV-cache memory, a higher one is refused.",
        examples=["4096"],
    )
    engine_wait_s: float = Field(
        default=30.0, description="How long a request waits for a loading model before 503."
    )
    vllm_args: str = Field(
        default="{}",
        description='Extra vLLM engine arguments as JSON, e.g. {"enforce_eager": true}; '
        "they override the `REALIGN_ENGINE_*` settings.",
        examples=['{"enforce_eager": true}'],
    )
    engine_kv_cache_gb: float | None = Field(
        default=None,
        gt=0,
        description="vLLM KV-cache size in GB. Unset = room for "
        "`REALIGN_ENGINE_KV_SEQUENCES` full-length sequences, capped at "
        "`REALIGN_ENGINE_MEMORY_FRACTION` of the memory free when the engine starts (RAM on "
        "the CPU build; on GPUs unset leaves the KV cache to the GPU memory share).",
        examples=["2"],
    )
    engine_kv_sequences: int = Field(
        default=4,
        ge=1,
        description="Full-length sequences the automatic KV cache holds at once.",
    )
    engine_memory_fraction: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Share of the free RAM (after the weights) the automatic KV cache "
        "may take on the CPU build.",
    )
    engine_gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Share of the GPU's memory vLLM may use (weights + KV cache). Unset = "
        "0.9 of what is free when the engine starts, so other processes on the GPU keep "
        "theirs.",
        examples=["0.8"],
    )

    # -- remote code (model inputs) --------------------------------------------------------
    trusted_code_sha256: list[str] = Field(
        default_factory=list,
        description="Code hashes (sha256 hex) of models an administrator allows although "
        "they ship code (auto_map in a config, *.py files); every other such model is "
        "refused. The refusal message prints the hash. Realign never runs the code, and "
        "merged models never carry it.",
    )

    # -- store: locking and builder leases ---------------------------------------------
    store_locking: Literal["flock", "none"] = Field(
        default="flock",
        description="How builders of one artifact coordinate: flock (they wait for each "
        "other; readers pin artifacts against eviction) or none, for stores on NFS or "
        "volumes where flock does not work (still correct: concurrent builds of one key "
        "each do the work, the first to publish wins).",
    )
    store_lease_s: float = Field(
        default=120.0,
        gt=0,
        description="Lease of a builder on its staging directory (and, with an object "
        "store and Redis, on the shared build lock), renewed every third of it while the "
        "build runs; staging left by a dead builder is removed once its lease has run "
        "out. The object store's budget spares artifacts committed less than this ago.",
    )

    # -- object store (S3, MinIO, GCS interop) ----------------------------------------
    store_url: str = Field(
        default="",
        description="Where artifacts are published: empty = the local store "
        "(`REALIGN_MODELS_CACHE_DIR`); `s3://bucket/prefix` = an S3-compatible object "
        "store (extra `s3`), with `REALIGN_MODELS_CACHE_DIR` as this node's read-through "
        "cache. Credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID / "
        "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance or pod role). With "
        "`REALIGN_REDIS_URL` set, builders on every machine share one build lock.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="S3 endpoint for the object store and `s3://` model refs: MinIO, "
        "GCS interop (https://storage.googleapis.com), a test server. Unset = AWS S3.",
    )
    store_cache_budget_gb: float | None = Field(
        default=None,
        gt=0,
        description="Size budget in GB of this node's read-through cache of an object "
        "store; least recently used artifacts not being read are evicted. Unset = "
        "unbounded.",
    )

    # -- job records, leases and disk readiness ----------------------------------------
    job_retention_days: float = Field(
        default=30.0,
        gt=0,
        description="Finished jobs (succeeded, failed, cancelled) are deleted, with their "
        "events, this many days after they ended; queued and running jobs never are.",
    )
    job_lease_s: float = Field(
        default=20.0,
        gt=0,
        description="A running merge renews its lease every third of this; a worker that "
        "dies is noticed once its lease expires (redelivery, or the job fails after "
        "max_deliveries).",
    )
    job_requeue_after_s: float = Field(
        default=300.0,
        gt=0,
        description="A queued job that nothing touched for this long, that no worker "
        "holds and whose message is in no broker queue (lost in a records outage or a "
        "broker restart) is sent again by worker housekeeping, at most once per this "
        "period; after `REALIGN_MAX_DELIVERIES` re-sends it fails with code message_lost.",
    )
    min_free_disk_gb: float = Field(
        default=1.0,
        ge=0,
        description="/readyz answers 503 when the store's filesystem has less free space "
        "than this, in GB (0 = no disk check).",
    )

    # -- API limits: per key, or per client address without auth ----------------------
    rate_limit_chat_rpm: int = Field(
        default=600,
        ge=0,
        description="Chat and completion requests per minute per API key (sliding "
        "window; 0 = no limit). Without auth, per client address.",
    )
    rate_limit_merge_rpm: int = Field(
        default=60,
        ge=0,
        description="Merge and residual job submissions per minute per API key (0 = no limit).",
    )
    rate_limit_api_rpm: int = Field(
        default=3000,
        ge=0,
        description="Every other request per minute per API key (health and metrics are "
        "exempt; 0 = no limit).",
    )
    concurrency_chat: int = Field(
        default=16,
        ge=0,
        description="Chat and completion requests in flight at once per API key (0 = no limit).",
    )
    concurrency_merge: int = Field(
        default=8,
        ge=0,
        description="Job submissions in flight at once per API key (0 = no limit).",
    )
    concurrency_api: int = Field(
        default=64,
        ge=0,
        description="Other requests in flight at once per API key, event streams included "
        "(0 = no limit).",
    )
    concurrency_slot_ttl_s: float = Field(
        default=60.0,
        gt=0,
        description="Redis concurrency slots expire this long after their last refresh "
        "(refreshed while the request runs), so a crashed API process frees its slots.",
    )


def load_settings() -> Settings:
    """Read the settings from the environment.

    Raises:
        InvalidSettingsError: a variable does not parse; one line naming it, what is
            wrong and an example.
    """
    try:
        return Settings()
    except (ValidationError, SettingsError) as exc:
        raise InvalidSettingsError(explain(Settings, exc)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process settings (read from the environment once).

    Raises:
        InvalidSettingsError: see :func:`load_settings`.
    """
    return load_settings()


def main(argv: list[str]) -> int:
    """``python -m app.core.settings --markdown``: the README's settings table."""
    if argv != ["--markdown"]:
        print("usage: python -m app.core.settings --markdown", file=sys.stderr)
        return 2
    sys.stdout.write(markdown_table(Settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
