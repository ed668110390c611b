"""python -m verifier_service [--flags]: see VerifierConfig (flags and EESD_* environment variables)."""

import logging

from eesd.fetch import resolve_model
from eesd.verifier import Verifier
from eesd_proto.eesd.v1 import verifier_pb2, verifier_pb2_grpc
from serving import observability
from serving.config import load_config
from serving.node import ModelNode
from serving.security import internal_tokens_of
from serving.server import run_service, serve
from verifier_service.config import VerifierConfig
from verifier_service.servicer import VerifierServicer


async def main() -> None:
    config = load_config(VerifierConfig)
    observability.setup(config, "verifier")  # logs, tracing, the metrics' model_name: before anything else
    node = ModelNode.from_config(config, "verifier")
    servicer = VerifierServicer(node)

    async def load() -> None:
        await node.load(
            lambda: Verifier(
                resolve_model(config.model_dir, "model_dir"),  # a hub id is downloaded here, off the event loop
                config.dtype,
                config.device,
                config.max_sessions,
                config.kv_tokens,
            )
        )

    def register(server) -> list[str]:
        verifier_pb2_grpc.add_VerifierServiceServicer_to_server(servicer, server)
        return [verifier_pb2.DESCRIPTOR.services_by_name["VerifierService"].full_name]

    await serve(
        "verifier",
        f"{config.host}:{config.port}",
        register,
        load,
        config.grace_s,
        metrics_port=config.metrics_port,
        stalled=lambda: node.stalled(config.max_pass_s),
        drain=servicer.drain,
        security=config,
        tokens=internal_tokens_of(config) or None,
        token_kind="internal token",
    )
    node.shutdown()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_service("verifier", main)
