"""eesd.generation.finish: where a round's committed tokens end and why."""

import pytest

from eesd.generation import finish
from eesd.params import GenerationParams

EOS = frozenset({2})


@pytest.mark.parametrize(
    ("new_tokens", "generated", "max_new_tokens", "stop_on_eos", "expected"),
    [
        ([10, 11, 12], 0, 8, True, ([10, 11, 12], None)),  # room left, no EOS
        ([10, 2, 12], 0, 8, True, ([10, 2], "eos")),  # EOS inside the round: kept, the rest dropped
        ([10, 11, 12], 5, 8, True, ([10, 11, 12], "length")),  # exactly fills the budget
        ([10, 11, 12, 13], 6, 8, True, ([10, 11], "length")),  # over the budget: trimmed
        ([10, 11, 2], 3, 5, True, ([10, 11], "length")),  # EOS beyond the budget was never generated
        ([10, 2], 3, 5, True, ([10, 2], "eos")),  # EOS as the last token of the budget
        ([10, 2, 12], 0, 8, False, ([10, 2, 12], None)),  # ignore_eos
    ],
)
def test_finish(new_tokens, generated, max_new_tokens, stop_on_eos, expected):
    params = GenerationParams(max_new_tokens=max_new_tokens, stop_on_eos=stop_on_eos)
    assert finish(new_tokens, generated, params, EOS) == expected
