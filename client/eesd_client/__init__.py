"""Python client SDK of EESD Serve.

from eesd_client import EesdClient

with EesdClient("localhost:50051") as client:
    for chunk in client.generate("Once upon a time", max_new_tokens=64):
        print(chunk.text, end="", flush=True)
"""

from eesd_client._version import __version__
from eesd_client.aio import AsyncEesdClient, AsyncGenerationStream
from eesd_client.client import EesdClient, GenerationStream
from eesd_client.config import ChannelOptions, RetryPolicy, TlsConfig
from eesd_client.errors import (
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    EesdError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from eesd_client.types import (
    FinalStats,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    Policy,
    RoundStats,
    SessionError,
    SessionInfo,
    SessionState,
    SpeculationStats,
    TimeSplit,
    TokenLogprob,
    Usage,
)

__all__ = [
    "AlreadyExistsError",
    "AsyncEesdClient",
    "AsyncGenerationStream",
    "CancelledError",
    "ChannelOptions",
    "DeadlineExceededError",
    "EesdClient",
    "EesdError",
    "FailedPreconditionError",
    "FinalStats",
    "FinishReason",
    "GenerationChunk",
    "GenerationRequest",
    "GenerationResult",
    "GenerationStream",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "Policy",
    "ProtocolError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "RoundStats",
    "SessionError",
    "SessionInfo",
    "SessionState",
    "SpeculationStats",
    "TimeSplit",
    "TlsConfig",
    "TokenLogprob",
    "UnauthenticatedError",
    "UnavailableError",
    "Usage",
    "__version__",
]
