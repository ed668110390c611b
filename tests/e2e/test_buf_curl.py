"""`buf curl` (the repo-local npm buf, `make proto-tools`) calls the controller through server reflection
only, no local protos: the streamed JSON carries the tokens the SDK gets."""

import json
import subprocess

import pytest
from eesd_client import EesdClient

from tests.e2e.helpers import ROOT

BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"
PROMPT = [3, 4, 5]


def json_messages(text: str) -> list[dict]:
    """buf curl prints each streamed message as a JSON object, one after the other."""
    decoder, messages, text, at = json.JSONDecoder(), [], text.strip(), 0
    while at < len(text):
        message, at = decoder.raw_decode(text, at)
        messages.append(message)
        while at < len(text) and text[at].isspace():
            at += 1
    return messages


def buf_curl(address: str, method: str, body: dict) -> list[dict]:
    if not BUF.exists():
        pytest.fail(f"buf is missing at {BUF}: run `make proto-tools` (CI must not skip this test)")
    done = subprocess.run(
        [
            str(BUF),
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            "-d",
            json.dumps(body),
            f"http://{address}/eesd.v1.ControllerService/{method}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, f"buf curl failed ({done.returncode}):\n{done.stderr}\n{done.stdout}"
    return json_messages(done.stdout)


def test_buf_curl_generate_streams_the_sdk_tokens(main_stack):
    messages = buf_curl(
        main_stack.controller_address,
        "Generate",
        {"promptIds": {"ids": PROMPT}, "maxNewTokens": 12, "policy": {"name": "fixed", "kMax": 3}, "ignoreEos": True},
    )
    chunks = [m["chunk"] for m in messages if "chunk" in m]
    tokens = [t for chunk in chunks for t in chunk.get("tokenIds", [])]
    with EesdClient(main_stack.controller_address, timeout=120) as client:
        expected = client.generate_text(PROMPT, max_new_tokens=12, policy="fixed", k_max=3, stop_on_eos=False)
    assert tokens == list(expected.token_ids)
    assert len({m["sessionId"] for m in messages}) == 1
    summary = messages[-1]["summary"]
    assert summary["finishReason"] == "FINISH_REASON_LENGTH"
    assert summary["usage"]["completionTokens"] == 12 and summary["speculation"]["policy"] == "fixed"

    # GetSession through reflection too: the committed tokens are the prompt plus the streamed ones.
    (session,) = buf_curl(
        main_stack.controller_address, "GetSession", {"sessionId": messages[0]["sessionId"], "includeTokenIds": True}
    )
    assert session["session"]["committedTokenIds"] == PROMPT + tokens
