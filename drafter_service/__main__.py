"""python -m drafter_service [--flags]: see DrafterConfig (flags and EESD_* environment variables)."""

import logging

from drafter_service.config import DrafterConfig
from drafter_service.servicer import DrafterServicer
from drafter_service.verifier_link import VerifierAllowlist
from eesd.drafter import Drafter
from eesd.fetch import resolve_model
from eesd_proto.eesd.v1 import drafter_pb2, drafter_pb2_grpc
from serving import observability
from serving.config import load_config
from serving.node import ModelNode
from serving.security import Peers, internal_tokens_of
from serving.server import run_service, serve


async def main() -> None:
    config = load_config(DrafterConfig)
    observability.setup(config, "drafter")  # logs, tracing, the metrics' model_name: before anything else
    node = ModelNode.from_config(config, "drafter")
    servicer = DrafterServicer(
        node, config.verify_timeout_s, VerifierAllowlist(config.verifiers), config.pipeline, Peers.of(config)
    )

    async def load() -> None:
        await node.load(
            lambda: Drafter(
                resolve_model(config.model_dir, "model_dir"),  # a hub id is downloaded here, off the event loop
                config.exit_layer,
                config.exit_head or None,
                config.dtype,
                config.device,
                config.max_sessions,
                config.kv_tokens,
                config.draft_top_k,
            )
        )

    def register(server) -> list[str]:
        drafter_pb2_grpc.add_DrafterServiceServicer_to_server(servicer, server)
        return [drafter_pb2.DESCRIPTOR.services_by_name["DrafterService"].full_name]

    await serve(
        "drafter",
        f"{config.host}:{config.port}",
        register,
        load,
        config.grace_s,
        servicer.close,
        metrics_port=config.metrics_port,
        stalled=lambda: node.stalled(config.max_pass_s),
        security=config,
        tokens=internal_tokens_of(config) or None,
        token_kind="internal token",
    )
    node.shutdown()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_service("drafter", main)
