"""Token ids <-> text on the controller, with the `tokenizers` library only (no torch in this image)."""

import json
from pathlib import Path

from tokenizers import Tokenizer


class TextCodec:
    def __init__(self, tokenizer_file: Path):
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


class TextStream:
    """Text deltas of a growing token sequence; holds back a trailing partial UTF-8 character."""

    def __init__(self, codec: TextCodec | None):
        self.codec, self.ids, self.sent = codec, [], ""

    def push(self, ids: list[int]) -> str:
        if self.codec is None:
            return ""
        self.ids += ids
        text = self.codec.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


def model_facts(model_dir: str) -> tuple[TextCodec | None, frozenset[int], int | None]:
    """(text codec, EOS ids, vocabulary size) from a checkpoint directory's JSON files; empty if unset."""
    if not model_dir:
        return None, frozenset(), None
    root = Path(model_dir)
    config = json.loads((root / "config.json").read_text())
    generation = root / "generation_config.json"
    eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    eos = config.get("eos_token_id") if eos is None else eos
    eos_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
    codec = TextCodec(root / "tokenizer.json") if (root / "tokenizer.json").is_file() else None
    return codec, eos_ids, config["vocab_size"]
