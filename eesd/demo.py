"""`make demo` (in-process for now): greedy decoding on a small random Llama under each policy.

Prints the streamed tokens, tau and tokens/s, checks every policy reproduces plain greedy decoding,
and compares our autoregressive path with HF `generate`.
"""

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from eesd.drafter import Drafter
from eesd.engine import SpeculativeEngine
from eesd.params import GenerationParams, PolicyParams
from eesd.tiny import save_tiny_model
from eesd.verifier import Verifier

MODEL_DIR = Path(".cache/demo-tiny-llama")
EXIT_LAYER = 7  # of 8: an untrained exit layer drafts well only this deep
PROMPT, MAX_NEW = [1, 17, 42, 99, 7], 64


def main() -> None:
    torch.set_num_threads(2)
    if not (MODEL_DIR / "config.json").is_file():
        save_tiny_model(
            MODEL_DIR,
            "llama",
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
            vocab_size=2048,
            initializer_range=0.05,
        )
    verifier = Verifier(MODEL_DIR)
    engine = SpeculativeEngine(Drafter(MODEL_DIR, EXIT_LAYER), verifier)
    reference = None
    for policy in ("off", "fixed", "heuristic", "beta-ts", "calibration-ts"):
        engine.generate(PROMPT, GenerationParams(8, policy=PolicyParams(policy)))  # warm-up
        print(f"\n== policy {policy}: ", end="")
        result = engine.generate(
            PROMPT,
            GenerationParams(MAX_NEW, policy=PolicyParams(policy, k_max=6)),
            on_tokens=lambda tokens: print(*tokens, end=" | ", flush=True),
        )
        reference = reference or result.token_ids
        s = result.stats
        print(
            f"\n   tau {s.mean_accepted_tokens:.2f}  {s.tokens_per_second:.0f} tok/s  "
            f"same tokens as plain greedy: {result.token_ids == reference}"
        )
    hf = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT])
    hf.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=0)
    start = time.perf_counter()
    out = hf.generate(ids, do_sample=False, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, pad_token_id=0)
    elapsed = time.perf_counter() - start
    print(
        f"\nHF generate greedy: {MAX_NEW / elapsed:.0f} tok/s, same tokens: "
        f"{out[0, len(PROMPT) :].tolist() == reference}"
    )


if __name__ == "__main__":
    main()
