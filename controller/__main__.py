"""python -m controller [--flags]: see ControllerConfig (flags and EESD_* environment variables)."""

import asyncio
import logging

from controller.chat_template import ChatTemplate
from controller.config import ControllerConfig, max_request_bytes
from controller.discovery import make_discovery
from controller.http_api import HttpServer, OpenAIFrontEnd
from controller.nodes import NodeClients
from controller.round_loop import RoundLoop
from controller.routing import Router
from controller.servicer import ControllerServicer
from controller.state_store import open_state_store
from controller.text import model_facts
from eesd.fetch import resolve_model
from eesd_proto.eesd.v1 import controller_pb2, controller_pb2_grpc
from serving import observability
from serving.config import load_config
from serving.metrics import TimedStateStore
from serving.security import Peers, Tokens, internal_tokens_of
from serving.server import run_service, serve


async def main() -> None:
    config = load_config(ControllerConfig)
    observability.setup(config, "controller")  # logs, tracing, the metrics' model_name: before anything else
    store = TimedStateStore(
        open_state_store(config.redis_url, config.session_ttl_s, config.redis_max_connections, config.redis_ca_file)
    )
    model_dir = str(resolve_model(config.model_dir, "model_dir")) if config.model_dir else ""
    facts = model_facts(model_dir)
    nodes = NodeClients(
        config.round_timeout_s, config.node_probe_s, config.node_lost_s, facts.checkpoint, Peers.of(config)
    )
    router = Router(
        make_discovery(config.discovery, config.drafters, config.namespace, config.drafter_selector),
        make_discovery(config.discovery, config.verifiers, config.namespace, config.verifier_selector),
        config.node_down_s,
        nodes.liveness.is_lost,
    )
    loop = RoundLoop(
        store,
        router,
        nodes,
        facts.eos_token_ids,
        facts.vocab_size,
        admission_wait_s=config.admission_wait_s,
        context=facts.context,
        max_sessions=config.max_sessions,
        store_wait_s=config.store_wait_s,
        end_retry_s=config.session_ttl_s,
        codec=facts.codec,
    )
    servicer = ControllerServicer(
        loop,
        store,
        facts.codec,
        config.default_policy_params(),
        config.max_new_tokens_limit,
        config.prompt_limit(facts.context),
    )
    client_tokens = Tokens(config.auth_token, config.auth_token_file)
    internal_tokens_of(config)  # a bad internal token file fails here, at start
    http = None
    if config.http_port:  # the OpenAI-compatible API: the same round loop, the same client tokens
        front = OpenAIFrontEnd(
            loop,
            facts.codec,
            ChatTemplate.of_model(model_dir),
            observability.model_name_of(config),  # served_model_name, else model_dir's folder name
            config.default_policy_params(),
            config.max_new_tokens_limit,
            config.prompt_limit(facts.context),
            max_request_bytes(config.prompt_limit(facts.context)),
            context=facts.context,
            tokens=client_tokens if client_tokens else None,
        )
        http = HttpServer(front, config.host, config.http_port, config.grace_s, config)

    shared_load: list[asyncio.Task] = []

    async def warmup() -> None:
        await store.ping()  # SERVING only once the state store answers
        router.start()
        nodes.liveness.start(router.addresses)  # hung nodes are found within node_lost_s
        shared_load.append(asyncio.ensure_future(router.share_load(store)))  # other replicas' load
        if http is not None:
            await http.start()
            http.front.ready = True

    def drain() -> None:
        if http is not None:
            http.begin_stop()  # new requests refused; streams in flight get grace_s, as gRPC's do

    async def stop() -> None:
        if http is not None:
            await http.stop()
        for task in shared_load:
            task.cancel()
        router.stop()
        await loop.aclose()
        await nodes.close()
        await store.close()

    def register(server) -> list[str]:
        controller_pb2_grpc.add_ControllerServiceServicer_to_server(servicer, server)
        return [controller_pb2.DESCRIPTOR.services_by_name["ControllerService"].full_name]

    await serve(
        "controller",
        f"{config.host}:{config.port}",
        register,
        warmup,
        config.grace_s,
        stop,
        metrics_port=config.metrics_port,
        max_receive_bytes=max_request_bytes(config.prompt_limit(facts.context)),
        security=config,
        tokens=client_tokens if client_tokens else None,
        drain=drain,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_service("controller", main)
