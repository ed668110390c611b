"""Prompts over the controller's limit are refused before any work: not converted, not tokenized, not stored."""

import asyncio

import pytest

from controller.config import ControllerConfig
from controller.servicer import ControllerServicer
from eesd.errors import InvalidArgument
from eesd.params import MAX_CHARS_PER_TOKEN, PolicyParams
from eesd_proto.eesd.v1 import controller_pb2

LIMIT = 100


class NoWork:
    """A round loop and a tokenizer that fail the test if the request gets as far as them."""

    def generate(self, *args, **kwargs):
        raise AssertionError("an over-limit prompt reached the round loop")

    def encode(self, text: str) -> list[int]:
        assert len(text) <= LIMIT * MAX_CHARS_PER_TOKEN, "an over-limit text was tokenized"
        return [1] * len(text)  # one token per character: within the character limit, over the token limit


class NoMetadata:
    def invocation_metadata(self):
        return ()


def first_error(request: controller_pb2.GenerateRequest) -> InvalidArgument:
    servicer = ControllerServicer(NoWork(), None, NoWork(), PolicyParams("off", 0), 64, LIMIT)

    async def drain() -> None:
        async for _ in servicer.Generate(request, NoMetadata()):
            pass

    with pytest.raises(InvalidArgument) as info:
        asyncio.run(drain())
    return info.value


@pytest.mark.parametrize(
    ("prompt", "field"),
    [
        ({"prompt_ids": controller_pb2.TokenIds(ids=[1] * (LIMIT + 1))}, "prompt_ids"),
        ({"prompt_text": "x" * (LIMIT * MAX_CHARS_PER_TOKEN + 1)}, "prompt_text"),  # refused untokenized
        ({"prompt_text": "x" * (LIMIT + 1)}, "prompt_text"),  # tokenized to LIMIT + 1 tokens
    ],
    ids=["ids", "text-characters", "text-tokens"],
)
def test_over_limit_prompts_are_refused_naming_the_field(prompt, field):
    error = first_error(controller_pb2.GenerateRequest(max_new_tokens=4, **prompt))
    assert error.field == field


def test_the_prompt_limit_defaults_to_the_model_context():
    assert ControllerConfig().prompt_limit(2048) == 2047
    assert ControllerConfig(max_prompt_tokens=100).prompt_limit(2048) == 100
    assert ControllerConfig().prompt_limit(None) > 0  # no model_dir: still bounded
