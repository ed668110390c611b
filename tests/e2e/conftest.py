"""Distributed pipeline fixtures: real processes (controller, drafters, verifiers, redis-server) on loopback.

Stacks are expensive to start (each model process imports torch), so one main stack serves most modules
for the whole session: llama (4 layers, hidden 64), exit layer N=1, two drafters, two verifiers, Redis.
"""

import shutil

import pytest

from tests.e2e.helpers import start_stack, stop_stack

MAIN_EXIT_LAYER = 1


@pytest.fixture(scope="session")
def require_redis() -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: `make redis` installs it (the e2e suite needs a real one)")


@pytest.fixture(scope="session")
def main_stack(tiny_models, tmp_path_factory, require_redis):
    """llama, N=1, 2 drafters + 2 verifiers, Redis state store. Tests that restart nodes leave them SERVING."""
    stack = start_stack(
        tiny_models["llama"],
        MAIN_EXIT_LAYER,
        tmp_path_factory.mktemp("main-stack-logs"),
        drafters=2,
        verifiers=2,
        redis=True,
    )
    yield stack
    stop_stack(stack)


@pytest.fixture(scope="session")
def main_model(tiny_models):
    return tiny_models["llama"]
