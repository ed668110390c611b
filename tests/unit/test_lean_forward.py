"""The lean forward path computes what the transformers layer modules compute, on every architecture."""

import pytest
import torch

from eesd.checkpoint import CheckpointReader, load_config
from eesd.decoder_stack import build_stack, resident_bytes


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_matches_transformers_modules(tiny_models, arch, dtype):
    config, reader = load_config(tiny_models[arch]), CheckpointReader.open(tiny_models[arch])
    layers = list(range(config.num_hidden_layers))
    lean, modules = (build_stack(config, reader, layers, dtype, "cpu", lean=flag) for flag in (True, False))
    assert lean.lean and not modules.lean
    assert resident_bytes(lean) == resident_bytes(modules)  # fused weights are shared, not copied
    lean_cache, modules_cache = lean.new_cache(), modules.new_cache()
    tolerance = dict(rtol=0, atol=1e-4) if dtype == torch.float32 else dict(rtol=0, atol=0)
    prompt = [(7 * i + 3) % 380 + 3 for i in range(60)]  # longer than mistral's window of 48
    torch.testing.assert_close(lean(prompt, lean_cache), modules(prompt, modules_cache), **tolerance)
    for step in ([9], [4, 5, 6], [11]):  # decode, a verify block, decode after it
        torch.testing.assert_close(lean(step, lean_cache), modules(step, modules_cache), **tolerance)
    lean_cache.crop(58)
    modules_cache.crop(58)
    torch.testing.assert_close(lean([1, 2], lean_cache), modules([1, 2], modules_cache), **tolerance)


def test_fused_parameters_still_load_as_the_checkpoint(tiny_models):
    config, reader = load_config(tiny_models["qwen2"]), CheckpointReader.open(tiny_models["qwen2"])
    stack = build_stack(config, reader, [0, 1], torch.float32, "cpu")
    state = stack.layers[1].state_dict()
    expected = reader.read_prefix("model.layers.1.", torch.float32)
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)
