"""drafter_service.verifier_link over real gRPC, against a stand-in verifier: the rounds of many sessions
share one VerifyStream, so what happens to one round must not end it for the others."""

import asyncio

import grpc

from drafter_service.verifier_link import VerifierLink
from eesd.identity import ModelIdentity
from eesd_proto.eesd.v1 import verifier_pb2, verifier_pb2_grpc
from serving import convert

IDENTITY = ModelIdentity("llama", "config", "tokenizer", "float32")
LARGE = 2_000_000  # pending tokens of a round of ~4 MB: a second one waits for the verifier to read


class SlowReader(verifier_pb2_grpc.VerifierServiceServicer):
    """Answers the hello at once, then reads rounds only once `reading` is set, answering each with a
    verdict: until then a large round fills the stream's flow-control window and its write waits."""

    def __init__(self):
        self.reading = asyncio.Event()

    async def VerifyStream(self, request_iterator, context):
        requests = aiter(request_iterator)
        await anext(requests)  # the hello
        yield verifier_pb2.VerifyStreamResponse(
            hello=verifier_pb2.VerifyHello(identity=convert.identity_to_proto(IDENTITY), node_id="stand-in")
        )
        await self.reading.wait()
        async for request in requests:
            round_ = request.verify_request
            yield verifier_pb2.VerifyStreamResponse(
                verdict=verifier_pb2.Verdict(
                    session_id=round_.session_id, owner=round_.owner, round=round_.round, next_token=7
                )
            )


def round_request(round_: int, pending: int) -> verifier_pb2.VerifyRequest:
    return verifier_pb2.VerifyRequest(session_id=f"s{round_}", round=round_, pending_token_ids=[1000] * pending)


def test_a_round_whose_caller_goes_away_leaves_the_shared_stream_to_the_others():
    """A dropped lookahead cancels its round while the round's message is still being written (a large one
    waits for flow control): the other rounds on the stream still get their verdicts."""
    asyncio.run(_cancel_one_round_while_it_is_written())


async def _cancel_one_round_while_it_is_written() -> None:
    stand_in = SlowReader()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    verifier_pb2_grpc.add_VerifierServiceServicer_to_server(stand_in, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    link = VerifierLink(f"127.0.0.1:{port}", IDENTITY, "drafter", timeout_s=5.0)
    try:
        waiting = asyncio.create_task(link.verify(round_request(1, 1)))  # written, waits for its verdict
        buffered = asyncio.create_task(link.verify(round_request(2, LARGE)))  # fills the transport's buffers
        await asyncio.sleep(0.3)
        writing = asyncio.create_task(link.verify(round_request(3, LARGE)))  # its write waits for the reader
        await asyncio.sleep(0.3)
        writing.cancel()
        await asyncio.gather(writing, return_exceptions=True)
        stand_in.reading.set()
        for task, round_ in ((waiting, 1), (buffered, 2)):
            answer = await task
            assert (answer.verdict.session_id, answer.verdict.round) == (f"s{round_}", round_)
        later = await link.verify(round_request(4, 1))  # and the stream still serves new rounds
        assert later.verdict.round == 4
    finally:
        await link.close()
        await server.stop(None)
