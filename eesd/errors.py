"""Domain errors. Each class names its gRPC status code (`status`, a `grpc.StatusCode` name) so the core
stays free of gRPC; services turn it into a status in a single interceptor, and the controller records
it in a failed session."""

import math


class EesdError(Exception):
    """Base of every error the core raises on purpose."""

    status = "INTERNAL"


class InvalidArgument(EesdError, ValueError):
    """A request field is wrong; `field` names it."""

    status = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class AlreadyExists(InvalidArgument):
    """A client-chosen name (a session id) is already in use. An InvalidArgument too, for callers that
    catch that; the interceptor maps it to ALREADY_EXISTS as the protocol documents."""

    status = "ALREADY_EXISTS"


class NotFound(EesdError, LookupError):
    """A session, model directory or file that the request names does not exist."""

    status = "NOT_FOUND"


class FailedPrecondition(EesdError):
    """The request is valid but the node's state does not allow it (e.g. a cache shorter than the base)."""

    status = "FAILED_PRECONDITION"


class ResourceExhausted(EesdError):
    """A capacity limit (sessions, context length) is reached."""

    status = "RESOURCE_EXHAUSTED"


class Unavailable(EesdError):
    """A peer cannot be reached; retrying elsewhere may work. `peer` names its role when relayed."""

    status = "UNAVAILABLE"

    def __init__(self, message: str, peer: str = ""):
        super().__init__(message)
        self.peer = peer


class Aborted(EesdError):
    """Another controller took the session over (a client resumed it there): this one stops driving it."""

    status = "ABORTED"


class Unauthenticated(EesdError):
    """The caller did not present valid credentials."""

    status = "UNAUTHENTICATED"


class RollbackError(FailedPrecondition):
    """A KV cache cannot be cropped to the requested length."""


class TrainingDiverged(EesdError):
    """A training run's loss stopped being finite: its weights are garbage, so none are saved."""

    def __init__(self, what: str, step: int, loss: float):
        super().__init__(f"{what} diverged at step {step} (loss {loss}); nothing was saved: lower the learning rate")

    @classmethod
    def check(cls, what: str, step: int, loss: float) -> float:
        """`loss` when it is finite; raised otherwise, at the first step whose loss is not."""
        if not math.isfinite(loss):
            raise cls(what, step, loss)
        return loss


# Every class that names its own status, most specific first (a peer's status maps back to the first match).
ERRORS: tuple[type[EesdError], ...] = (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
    Aborted,
    Unauthenticated,
)
