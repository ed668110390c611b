"""The decoding methods a benchmark compares, each behind one call: prompt -> (tokens, seconds, stats).

- `hf-generate`: transformers' `generate` (autoregressive), the external baseline;
- `hf-assisted-ee`: transformers' assisted generation with `assistant_early_exit=N`: the model's own
  first N layers draft through the final norm and LM head (no trained exit layer); its draft length,
  schedule and confidence threshold are read from `model.generation_config`;
- `ours-ar`: our engine with speculation off (the verifier alone, autoregressive);
- `ours-<policy>`: our engine with the drafter (first N layers + exit layer) under a draft policy.

Every method generates exactly `max_new_tokens` tokens (EOS does not stop any of them), so tokens/s
compare like with like.
"""

import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM

from eesd.drafter import Drafter
from eesd.engine import SpeculativeEngine
from eesd.params import GenerationParams, PolicyParams, SamplingParams
from eesd.verifier import Verifier


@dataclass
class Run:
    tokens: list[int]
    seconds: float
    stats: dict | None = None  # our engine's GenerationStats.summary(); None for HF methods


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "hf-generate", "hf-assisted-ee", "ours"
    policy: str = "off"  # ours: the policy name
    options: dict = field(default_factory=dict)  # ours: policy options; hf-assisted-ee: generation_config fields
    label: str = ""  # what plots and tables show
    # ours: (N, exit-head directory or None for an untrained exit layer); None: the Runners' own drafter
    drafter: tuple[int, str | None] | None = None
    tuned: bool = False  # its options were chosen by a tuning run (on other prompts than the evaluation's)

    @property
    def speculative(self) -> bool:
        return self.kind == "ours" and self.policy != "off"


def default_methods(k_max: int, fixed_ks: list[int], policies: list[str], hf_assisted: list[dict]) -> list[Method]:
    methods = [Method("hf-generate", "hf-generate", label="HF generate")]
    for variant in hf_assisted:
        name = "hf-assisted-ee" + (f"-{variant['name']}" if variant.get("name") else "")
        options = {k: v for k, v in variant.items() if k != "name"}
        methods.append(Method(name, "hf-assisted-ee", options=options, label=name.replace("hf-", "HF ")))
    methods.append(Method("ours-ar", "ours", "off", label="ours, no speculation"))
    methods += [Method(f"ours-fixed-{k}", "ours", "fixed", {"k": k}, label=f"fixed k={k}") for k in fixed_ks]
    for spec in policies:
        name, options = parse_policy_spec(spec)
        methods.append(Method(f"ours-{spec}", "ours", name, options, label=spec))
    return methods


def parse_policy_spec(spec: str) -> tuple[str, dict[str, float]]:
    """'beta-ts' or 'beta-ts[draft_cost=0.2;alpha=2]' -> (name, options)."""
    name, _, rest = spec.partition("[")
    options = {}
    for item in filter(None, rest.rstrip("]").split(";")):
        key, _, value = item.partition("=")
        options[key.strip()] = float(value)
    return name.strip(), options


class Runners:
    """Loads each model once (our verifier + drafter, HF's model) and runs any Method on a prompt."""

    def __init__(
        self,
        model_dir: str,
        exit_layer: int,
        exit_head: str | None,
        dtype: str,
        k_max: int,
        need_hf: bool,
        eos_token_ids: frozenset[int] = frozenset(),
    ):
        self.model_dir, self.dtype, self.eos_token_ids = model_dir, dtype, eos_token_ids
        self.exit_layer, self.k_max = exit_layer, k_max
        self.drafter = (exit_layer, exit_head)
        self.verifier = verifier = Verifier(model_dir, dtype=dtype)
        # One engine per drafter (exit layer, head), all on the one verifier: a sweep over N loads it once.
        self.engines: dict[tuple[int, str | None], SpeculativeEngine] = {}
        self.engine_for(self.drafter)  # loaded now: a bad exit layer or head fails before any measurement
        self.hf = None
        if need_hf:
            torch_dtype = verifier.stack.embed_tokens.weight.dtype
            self.hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, attn_implementation="sdpa")
            self.hf.eval()
            self.hf.generation_config.eos_token_id = None  # run exactly max_new_tokens, like the engine below
            self._hf_defaults = self.hf.generation_config.to_dict()

    def engine_for(self, drafter: tuple[int, str | None]) -> SpeculativeEngine:
        if drafter not in self.engines:
            exit_layer, exit_head = drafter
            draft = Drafter(self.model_dir, exit_layer, exit_head, dtype=self.dtype)
            self.engines[drafter] = SpeculativeEngine(draft, self.verifier, self.eos_token_ids)
        return self.engines[drafter]

    def run(self, method: Method, prompt: list[int], max_new_tokens: int, temperature: float, seed: int) -> Run:
        if method.kind == "ours":
            return self._ours(method, prompt, max_new_tokens, temperature, seed)
        return self._hf(method, prompt, max_new_tokens, temperature, seed)

    def _ours(self, method: Method, prompt: list[int], max_new_tokens: int, temperature: float, seed: int) -> Run:
        params = GenerationParams(
            max_new_tokens,
            SamplingParams(temperature, seed=seed),
            PolicyParams(method.policy, self.k_max, dict(method.options)),
            stop_on_eos=False,
        )
        engine = self.engine_for(method.drafter or self.drafter)
        start = time.perf_counter()
        result = engine.generate(prompt, params)
        elapsed = time.perf_counter() - start
        per_round = [{"k": r.k_chosen, "drafted": r.drafted, "accepted": r.accepted} for r in result.stats.per_round]
        return Run(result.token_ids, elapsed, result.stats.summary() | {"per_round": per_round})

    @torch.inference_mode()
    def _hf(self, method: Method, prompt: list[int], max_new_tokens: int, temperature: float, seed: int) -> Run:
        config = self.hf.generation_config
        for key, value in self._hf_defaults.items():  # undo the previous assisted variant's settings
            if hasattr(config, key):
                setattr(config, key, value)
        kwargs = {}
        if method.kind == "hf-assisted-ee":
            for key, value in method.options.items():
                setattr(config, key, value)
            kwargs["assistant_early_exit"] = self.exit_layer
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
            torch.manual_seed(seed)
        else:
            kwargs.update(do_sample=False)
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        out = self.hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=self.hf.config.pad_token_id or 0,
            **kwargs,
        )
        return Run(out[0, len(prompt) :].tolist(), time.perf_counter() - start)
