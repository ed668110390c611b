"""A refused request's memory must not outlive it (issue #12 item 4): what its handler held is freed when
the call ends, by reference counting, not whenever CPython's cyclic GC next runs. A reference cycle through
the refusal's traceback keeps every frame of the call alive (the parsed request, the lists converted from
it): a few maximum-size requests then hold gigabytes (tests/e2e/test_fuzz.py measures the RSS).

Each check runs with the cyclic GC off and looks at a weak reference to an object the handler held.
"""

import asyncio
import gc
import weakref

import grpc
import pytest
from grpc import aio

from eesd.errors import InvalidArgument
from eesd_proto.eesd.v1 import controller_pb2, controller_pb2_grpc
from serving.errors import DomainErrorInterceptor
from serving.node import ModelNode


class Payload:
    """Stands for the request data a handler holds."""


@pytest.fixture
def no_cyclic_gc():
    gc.collect()
    gc.disable()
    yield
    gc.enable()
    gc.collect()


def test_a_refused_node_call_frees_its_callers_frames(no_cyclic_gc):
    """ModelNode runs work on its compute thread and resolves a future with the error; the caller's frames
    (which hold the request) must go once the error has been handled."""
    held: list[weakref.ref] = []

    async def main() -> None:
        node = ModelNode("test")

        def refuse() -> None:
            raise InvalidArgument("pending_tokens", "too many")

        async def handler() -> None:
            payload = Payload()
            held.append(weakref.ref(payload))
            await node.run(refuse)

        try:
            try:
                await handler()
            except InvalidArgument:
                pass  # handled: nothing refers to the error any more
            else:
                pytest.fail("the call was not refused")
            await asyncio.sleep(0.1)
            assert held[0]() is None, "the refused call's frames are kept alive by a reference cycle"
        finally:
            node.shutdown()

    asyncio.run(main())


class Refusing(controller_pb2_grpc.ControllerServiceServicer):
    def __init__(self, held: list[weakref.ref]):
        self.held = held

    async def Generate(self, request, context):
        payload = Payload()
        self.held.append(weakref.ref(payload))
        raise InvalidArgument("prompt_ids", "too long")
        yield  # pragma: no cover - makes this an async generator, as the real handler

    async def GetSession(self, request, context):
        payload = Payload()
        self.held.append(weakref.ref(payload))
        raise InvalidArgument("session_id", "bad")


@pytest.mark.parametrize("method", ["Generate", "GetSession"])
def test_a_domain_error_frees_the_handlers_frames(no_cyclic_gc, method):
    """The error interceptor turns the handler's exception into a status; the handler's frames must not
    stay alive after the call ended."""
    held: list[weakref.ref] = []

    async def main() -> None:
        server = aio.server(interceptors=[DomainErrorInterceptor()])
        controller_pb2_grpc.add_ControllerServiceServicer_to_server(Refusing(held), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = controller_pb2_grpc.ControllerServiceStub(channel)
                for _ in range(3):
                    with pytest.raises(aio.AioRpcError) as info:
                        if method == "Generate":
                            async for _ in stub.Generate(controller_pb2.GenerateRequest()):
                                pass
                        else:
                            await stub.GetSession(controller_pb2.GetSessionRequest())
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                await asyncio.sleep(0.2)
        finally:
            await server.stop(0)

    asyncio.run(main())
    alive = [ref() is not None for ref in held]
    assert not any(alive), f"handler frames still alive after their calls ended: {alive}"
