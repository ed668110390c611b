import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from eesd.tiny import save_tiny_model

torch.set_num_threads(1)  # tiny models run fastest single-threaded; keeps parallel test processes fair
# Where the engine tests run their drafters and verifiers (greedy equality, batching, sampling): the CPU
# here and in CI; a GPU machine runs the same tests with EESD_TEST_DEVICE=cuda (tests/gpu_check.sh). The
# oracle, hf_greedy, always runs on the CPU.
DEVICE = os.environ.get("EESD_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """One random checkpoint per architecture, written to disk once per test session."""
    root = tmp_path_factory.mktemp("models")
    return {arch: save_tiny_model(root / arch, arch, seed=i) for i, arch in enumerate(("llama", "qwen2", "mistral"))}


def hf_greedy(model_dir, prompt: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """The oracle: transformers' own greedy decoding of the checkpoint."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()
