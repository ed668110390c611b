"""Shared helpers of the distributed end-to-end tests: stacks as loopback processes, the HF oracle."""

import functools
import signal
from pathlib import Path

from eesd_client import EesdClient

from serving.local_stack import LocalStack, Node
from tests.conftest import hf_greedy

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ("beta-ts", "calibration-ts", "fixed", "heuristic", "threshold", "off")
EOS = 2  # eos_token_id of eesd.tiny checkpoints; the controller reads it from config.json


def start_stack(model_dir: Path, exit_layer: int, log_dir: Path, **kwargs) -> LocalStack:
    """A whole stack (threads=1 per process), SERVING on return; stopped again if the start fails."""
    stack = LocalStack(model_dir, exit_layer, log_dir=log_dir, threads=1, **kwargs)
    try:
        stack.start()
    except BaseException:
        stop_stack(stack)
        raise
    return stack


def stop_stack(stack: LocalStack) -> None:
    """SIGTERM to every process at once (they drain in parallel), then LocalStack.stop waits for each."""
    for node in stack.nodes:
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(signal.SIGTERM)
    stack.stop()


def node_at(stack: LocalStack, address: str) -> Node:
    """The node a controller names by its address (GetSession's drafter_id / verifier_id)."""
    matches = [n for n in stack.nodes if n.address == address]
    assert len(matches) == 1, f"no node at {address!r}; nodes: {[(n.role, n.address) for n in stack.nodes]}"
    return matches[0]


def all_alive(stack: LocalStack) -> bool:
    return all(n.process is not None and n.process.poll() is None for n in stack.nodes)


def log_tails(stack: LocalStack, chars: int = 2000) -> str:
    return "\n".join(f"--- {n.log.name}\n{n.log.read_text(errors='replace')[-chars:]}" for n in stack.nodes)


@functools.cache
def _oracle(model_dir: str, prompt: tuple[int, ...], max_new_tokens: int, eos_token_id: int | None) -> tuple[int, ...]:
    return tuple(hf_greedy(model_dir, list(prompt), max_new_tokens, eos_token_id))


def oracle(model_dir: Path, prompt: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> tuple:
    """HF generate(do_sample=False) of the checkpoint, computed once per (model, prompt, length, eos)."""
    return _oracle(str(model_dir), tuple(prompt), max_new_tokens, eos_token_id)


def assert_healthy(stack: LocalStack, model_dir: Path) -> None:
    """Every process is up and a normal greedy generation through the stack still equals the oracle."""
    assert all_alive(stack), log_tails(stack)
    prompt = [11, 12, 13, 14]
    with EesdClient(stack.controller_address, timeout=120) as client:
        got = client.generate_text(prompt, max_new_tokens=12, stop_on_eos=False).token_ids
    assert got == oracle(model_dir, prompt, 12)
