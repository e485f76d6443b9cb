"""Typed domain errors.

Every error a user can cause derives from :class:`RealignError` and carries a
stable ``code`` (used by the CLI's exit status and, later, by the HTTP error
mapper) plus a message that says what is wrong, where, and what to do.
"""

from __future__ import annotations


class RealignError(Exception):
    """Base class of every error Realign raises on purpose."""

    code: str = "realign_error"
    http_status: int = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRefError(RealignError, ValueError):
    """A model reference cannot be parsed or does not point to a usable model."""

    code = "invalid_model_ref"


class InvalidParameterError(RealignError, ValueError):
    """A merge parameter (alpha, dtype) is outside what the math can use."""

    code = "invalid_parameter"


class ModelNotFoundError(RealignError, FileNotFoundError):
    """A model reference parses but nothing is there."""

    code = "model_not_found"
    http_status = 404


class UnsafeCheckpointError(RealignError, ValueError):
    """Weights are only available in a pickle-based format."""

    code = "unsafe_checkpoint"


class CorruptCheckpointError(RealignError, ValueError):
    """A safetensors file is truncated, malformed or inconsistent with its index."""

    code = "corrupt_checkpoint"


class IncompatibleModelsError(RealignError, ValueError):
    """Two checkpoints are not of the same architecture or lineage."""

    code = "incompatible_models"


class UnrelatedModelsError(IncompatibleModelsError):
    """A model's weights are too far from the base's to descend from it: task arithmetic
    needs models of one lineage (fine-tuned or continually pre-trained from one base)."""

    code = "unrelated_models"


class ArtifactNotFoundError(RealignError, KeyError):
    """No stored artifact matches a key."""

    code = "artifact_not_found"
    http_status = 404

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class SourcesUnavailableError(RealignError, FileNotFoundError):
    """The models a stored residual pack was computed from are not where its manifest
    records them, or their files changed since (so the pack cannot be made again)."""

    code = "sources_unavailable"
    http_status = 409


class AmbiguousKeyError(RealignError, KeyError):
    """A key prefix matches several stored artifacts."""

    code = "ambiguous_key"

    def __str__(self) -> str:
        return self.message


class IntegrityError(RealignError, ValueError):
    """A stored file does not match the hash recorded in its manifest."""

    code = "integrity_error"
    http_status = 409


class OutputExistsError(RealignError, FileExistsError):
    """The requested output location is already taken."""

    code = "output_exists"
    http_status = 409


class OutputNotWritableError(RealignError, PermissionError):
    """The output location cannot be written."""

    code = "output_not_writable"


class ArtifactInUseError(RealignError, RuntimeError):
    """An artifact cannot be removed because a reader holds it."""

    code = "artifact_in_use"
    http_status = 409


class DeviceUnavailableError(RealignError, RuntimeError):
    """The requested compute device is not present on this machine."""

    code = "device_unavailable"
    http_status = 503


class OperationCancelledError(RealignError):
    """Work was stopped on request; nothing was published."""

    code = "cancelled"
    http_status = 409


class JobNotFoundError(RealignError, LookupError):
    """No job with that id is visible to the caller."""

    code = "job_not_found"
    http_status = 404


class JobStateError(RealignError, RuntimeError):
    """The job is in a state that does not allow the request (e.g. cancel a finished job)."""

    code = "job_state_conflict"
    http_status = 409


class PathNotAllowedError(RealignError, PermissionError):
    """A local model path resolves outside the configured allowed roots."""

    code = "path_not_allowed"
    http_status = 403


class AuthenticationError(RealignError):
    """Missing or unknown API key."""

    code = "invalid_api_key"
    http_status = 401


class PermissionDeniedError(RealignError, PermissionError):
    """The caller's role may not do this."""

    code = "permission_denied"
    http_status = 403


class PayloadTooLargeError(RealignError):
    """The request body exceeds the configured limit."""

    code = "payload_too_large"
    http_status = 413


class ServiceUnavailableError(RealignError, RuntimeError):
    """A dependency (Redis, workers, an engine) is not available right now."""

    code = "service_unavailable"
    http_status = 503


class UnsafeSettingsError(RealignError, RuntimeError):
    """The configuration would expose the service unsafely; refused at start-up."""

    code = "unsafe_settings"


class RemoteCodeError(RealignError, ValueError):
    """A model ships code (``auto_map`` or ``*.py`` files) that loading it would run."""

    code = "remote_code_refused"


class InsufficientStorageError(RealignError, OSError):
    """Not enough free space to write an output (before writing, or mid-write).

    Also an ``OSError`` with ``errno`` ENOSPC (or the original EDQUOT/EFBIG), so
    code that handles disk-full as an ``OSError`` keeps working.
    """

    code = "insufficient_storage"
    http_status = 507

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        needed: int | None = None,
        free: int | None = None,
        err: int | None = None,
    ) -> None:
        super().__init__(message)
        self.path, self.needed, self.free = path, needed, free
        self.errno = err if err is not None else 28  # ENOSPC
        self.filename = path

    def __str__(self) -> str:  # OSError would prefix "[Errno 28]"
        return self.message


class ArtifactCorruptError(IntegrityError):
    """A stored file did not match its recorded checksum when it was read.

    Args:
        message: what, where, and what to do.
        file: the file's name inside its artifact (e.g. ``residual-00001-of-00002.safetensors``).
    """

    def __init__(self, message: str, *, file: str) -> None:
        super().__init__(message)
        self.file = file


class RecordsUnavailableError(ServiceUnavailableError):
    """The job records (Redis, or SQLite in embedded mode) cannot be read or written."""

    code = "records_unavailable"


# -- API limits and serving (issue 8, points 1, 7, 9) -------------------------------------


class RateLimitedError(RealignError):
    """A caller sent more requests (or more at once) than its limits allow."""

    code = "rate_limit_exceeded"
    http_status = 429

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = max(1, retry_after)


class ModelLoadFailedError(ServiceUnavailableError):
    """A served model's engine failed to load; retrying the request will not help.

    Remembered by the engine pool until a new load is requested, so clients get this
    answer at once instead of one failed load per request.
    """

    code = "model_load_failed"
    retryable = False  # the API tells clients (x-should-retry: false) not to retry

    def __init__(self, model_id: str, reason: str) -> None:
        super().__init__(
            f"model {model_id!r} failed to load: {reason}. Retrying will fail the same way; "
            f"fix the model, then load it again (POST /admin/models/{model_id}/load, or "
            "merge it again with serve=true)"
        )
        self.model_id = model_id
        self.reason = reason


class ReplicaRequestError(ServiceUnavailableError):
    """An admin's load or unload through the job plane did not get done by the serving
    replicas: one could not (``model_load_failed`` or ``model_unload_failed``, with its
    reason; not retryable), none answered in time (``load_timeout``), or none is running
    (``no_serving_replica``).
    """

    code = "replica_request_failed"

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = code not in ("model_load_failed", "model_unload_failed")


class InvalidSettingsError(RealignError, ValueError):
    """An environment variable of the settings does not parse or is out of range."""

    code = "invalid_settings"


class MissingExtraError(RealignError, RuntimeError):
    """A command needs an optional dependency group that is not installed."""

    code = "missing_extra"


def install_hint(extra: str) -> str:
    """How to install an extra. Realign installs from its checkout: the PyPI project
    named ``realign`` is another one, so ``pip install 'realign[x]'`` must never be said."""
    return f"pip install -e '.[{extra}]' in the Realign checkout"


class ContextLengthSettingError(RealignError, ValueError):
    """The configured context length is above what the model supports."""

    code = "context_length_setting"


class EngineMemoryError(RealignError, RuntimeError):
    """The engine's KV cache does not fit in the memory available."""

    code = "engine_memory"
    http_status = 507


class StoreUnavailableError(ServiceUnavailableError):
    """The object store (S3, MinIO, GCS interop) cannot be reached or refused a request."""

    code = "store_unavailable"


class BuildLockLostError(ServiceUnavailableError):
    """A builder's lease on an artifact's build lock ran out before it committed (the
    process was paused, or the lock service could not be reached): it published
    nothing, and another builder may have published the artifact meanwhile."""

    code = "build_lock_lost"


class StagingLostError(BuildLockLostError):
    """A builder's staging directory was removed while it built (its lease ran out while
    the process was paused, and another process swept it): it published nothing."""

    code = "staging_lost"
