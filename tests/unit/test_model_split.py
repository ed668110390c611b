"""The drafter holds and loads only its parts; exit heads save, load and refuse the wrong model."""

import json

import pytest
import torch

from eesd.checkpoint import CheckpointReader, config_hash, load_config
from eesd.decoder_stack import resident_bytes
from eesd.drafter import Drafter
from eesd.errors import FailedPrecondition, InvalidArgument
from eesd.exit_layer import META_FILE, ExitLayerMeta, save_exit_head, state_hash
from eesd.tiny import save_tiny_model
from eesd.verifier import Verifier


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_drafter_resident_bytes_are_its_parts_only(tiny_models, arch):
    model_dir = tiny_models[arch]
    config = load_config(model_dir)
    reader = CheckpointReader.open(model_dir)
    weights = reader.read(list(reader.files), torch.float32)
    n = 2
    layer = lambda i: [t for k, t in weights.items() if k.startswith(f"model.layers.{i}.")]  # noqa: E731
    expected = (
        _bytes([weights["model.embed_tokens.weight"], weights["model.norm.weight"]])
        + (0 if config.tie_word_embeddings else _bytes([weights["lm_head.weight"]]))
        + sum(_bytes(layer(i)) for i in range(n))
        + _bytes(layer(config.num_hidden_layers - 1))
    )  # the exit layer, same shape as a decoder layer
    drafter = Drafter(model_dir, n)
    assert resident_bytes(drafter.stack) == expected
    assert resident_bytes(drafter.stack) < resident_bytes(Verifier(model_dir).stack) == _bytes(weights.values())


def test_drafter_reads_only_its_tensors_from_disk(tiny_models, monkeypatch):
    read = []
    original = CheckpointReader.read

    def spy(self, names, dtype):
        read.extend(names)
        return original(self, names, dtype)

    monkeypatch.setattr(CheckpointReader, "read", spy)
    Drafter(tiny_models["llama"], 1)
    layers = {name.split(".")[2] for name in read if name.startswith("model.layers.")}
    assert layers == {"0", "3"}  # layer 0, and layer 3 copied into the untrained exit layer


def test_exit_head_round_trip_and_refusals(tiny_models, tmp_path):
    model_dir = tiny_models["llama"]
    config = load_config(model_dir)
    base = Drafter(model_dir, 2)
    exit_state = {k: v + 0.01 for k, v in base.stack.layers[2].state_dict().items()}
    head = save_exit_head(tmp_path / "head", exit_state, ExitLayerMeta(2, config_hash(config), "llama", True))
    loaded = Drafter(model_dir, 2, exit_head=head)
    assert loaded.identity.exit_head_hash == state_hash(exit_state) != base.identity.exit_head_hash
    for name, tensor in exit_state.items():
        torch.testing.assert_close(loaded.stack.layers[2].state_dict()[name], tensor)
    with pytest.raises(InvalidArgument, match="exit_layer"):
        Drafter(model_dir, 1, exit_head=head)
    other = save_tiny_model(tmp_path / "other", "llama", seed=0, num_hidden_layers=5)
    with pytest.raises(InvalidArgument, match="config hash"):
        Drafter(other, 2, exit_head=head)
    meta = json.loads((head / META_FILE).read_text())
    assert meta["exit_layer"] == 2 and meta["trained"] is True


def test_handshake_refuses_different_models(tiny_models):
    drafter = Drafter(tiny_models["llama"], 1)
    with pytest.raises(FailedPrecondition, match="config_hash"):
        drafter.identity.check_pairs_with(Verifier(tiny_models["qwen2"]).identity)
    drafter.identity.check_pairs_with(Verifier(tiny_models["llama"]).identity)


def test_bf16_checkpoint_loads_in_bf16(tiny_models):
    verifier = Verifier(tiny_models["llama"], dtype="bfloat16")
    assert verifier.stack.lm_head.weight.dtype == torch.bfloat16
    cache = verifier.stack.new_cache()
    assert verifier.stack([1, 2, 3], cache).shape == (3, verifier.config.vocab_size)
