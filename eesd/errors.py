"""Domain errors. Services map each class to one gRPC status code in a single interceptor."""


class EesdError(Exception):
    """Base of every error the core raises on purpose."""


class InvalidArgument(EesdError, ValueError):
    """A request field is wrong; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class AlreadyExists(InvalidArgument):
    """A client-chosen name (a session id) is already in use. An InvalidArgument too, for callers that
    catch that; the interceptor maps it to ALREADY_EXISTS as the protocol documents."""


class NotFound(EesdError, LookupError):
    """A session, model directory or file that the request names does not exist."""


class FailedPrecondition(EesdError):
    """The request is valid but the node's state does not allow it (e.g. a cache shorter than the base)."""


class ResourceExhausted(EesdError):
    """A capacity limit (sessions, context length) is reached."""


class Unavailable(EesdError):
    """A peer cannot be reached; retrying elsewhere may work. `peer` names its role when relayed."""

    def __init__(self, message: str, peer: str = ""):
        super().__init__(message)
        self.peer = peer


class Unauthenticated(EesdError):
    """The caller did not present valid credentials."""


class RollbackError(FailedPrecondition):
    """A KV cache cannot be cropped to the requested length."""
