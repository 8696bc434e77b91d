"""One error base with an HTTP status, rendered in one shape (DESIGN contract 7).

``{"error": {"type": ..., "message": ..., "request_id": ...}}`` — internal details never leak:
anything that is not a :class:`ServingError` is rendered as a generic 500 and logged.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base of every error the platform shows to a caller."""

    status_code: int = 500
    error_type: str = "internal_error"
    headers: dict[str, str] | None = None

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if headers is not None:
            self.headers = headers

    def body(self, request_id: str | None) -> dict:
        return {
            "error": {"type": self.error_type, "message": self.message, "request_id": request_id}
        }


class InvalidJSON(ServingError):
    status_code = 400
    error_type = "invalid_json"


class InvalidRequest(ServingError):
    status_code = 422
    error_type = "validation_error"


class TooManyTexts(ServingError):
    """More texts than one request or job may carry."""

    status_code = 413
    error_type = "too_many_texts"


class PayloadTooLarge(ServingError):
    status_code = 413
    error_type = "payload_too_large"


class JobNotFound(ServingError):
    status_code = 404
    error_type = "job_not_found"


class IdempotencyConflict(ServingError):
    """The same ``Idempotency-Key`` was sent with a different request body."""

    status_code = 409
    error_type = "idempotency_conflict"


class JobFinished(ServingError):
    status_code = 409
    error_type = "job_finished"


class RolloutNotFound(ServingError):
    status_code = 404
    error_type = "rollout_not_found"


class RolloutConflict(ServingError):
    """The application runs another rollout, or the rollout has ended."""

    status_code = 409
    error_type = "rollout_conflict"


class AnswerNotFound(ServingError):
    """Feedback on an answer that was not recorded (or was forgotten)."""

    status_code = 404
    error_type = "answer_not_found"


class ModelNotFound(ServingError):
    status_code = 404
    error_type = "model_not_found"


class NotReady(ServingError):
    status_code = 503
    error_type = "not_ready"


class ModelUnavailable(ServingError):
    """A stage of the pipeline failed; the caller may retry."""

    status_code = 503
    error_type = "model_unavailable"
    headers = {"Retry-After": "1"}


class NotDeployed(ServingError):
    """The route's feature is not part of this application (e.g. no monitor deployed)."""

    status_code = 404
    error_type = "not_deployed"


class JobsUnavailable(ServingError):
    """The job store (or queue) cannot be reached; nothing was accepted."""

    status_code = 503
    error_type = "jobs_unavailable"
    headers = {"Retry-After": "1"}


class PipelineTimeout(ServingError):
    """The pipeline did not answer within the gateway's deadline; the caller may retry."""

    status_code = 504
    error_type = "timeout"
    headers = {"Retry-After": "1"}


class RegistryError(ServingError):
    """The MLflow registry could not resolve or load a model reference."""

    status_code = 503
    error_type = "registry_error"


class RegistryUnavailable(RegistryError):
    """The MLflow store did not answer, or failed: not the caller's fault, and worth a retry."""

    status_code = 503
    error_type = "registry_unavailable"
    headers = {"Retry-After": "5"}


class ConfigError(Exception):
    """A configuration file or pipeline spec is invalid (raised by the CLIs, never over HTTP)."""
