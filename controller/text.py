"""Token ids <-> text on the controller, with the `tokenizers` library only (no torch in this image)."""

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders

from eesd.identity import tokenizer_hash


class TextCodec:
    def __init__(self, tokenizer_file: Path):
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`add_special_tokens=False` for a rendered chat template, which has its special tokens already."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


class TextStream:
    """Text deltas of a growing token sequence, decoded incrementally: each push costs O(new tokens), not
    O(sequence). `tokenizers`' DecodeStream keeps the few previous tokens it needs for context (byte-level
    BPE, leading spaces) and holds back an incomplete multi-byte character until its last byte arrives."""

    def __init__(self, codec: TextCodec | None):
        self.codec = codec
        self._stream = decoders.DecodeStream(skip_special_tokens=True)

    def push(self, ids: list[int]) -> str:
        """The text `ids` add. Token by token, so that the text sent after any prefix of the sequence does not
        depend on how it was cut into pushes (a list that ends inside a character is held back whole), and a
        resumed stream can continue exactly where its client's text stopped (`skip`)."""
        if self.codec is None:
            return ""
        return "".join(self._stream.step(self.codec.tokenizer, token) or "" for token in ids)

    def skip(self, ids: list[int]) -> None:
        """Takes `ids` as sent already (a resumed stream's client has their text)."""
        self.push(ids)

    def step(self, token: int) -> str:
        """The text one more token adds (eesd.stops.StopText's detokenizer)."""
        return self.push([token])


@dataclass(frozen=True)
class ModelFacts:
    """What the controller knows of the served model, from its checkpoint directory's JSON files."""

    codec: TextCodec | None = None  # None: no tokenizer, token-id prompts only
    eos_token_ids: frozenset[int] = frozenset()
    vocab_size: int | None = None  # None: unknown, prompts are checked by the nodes
    context: int | None = None  # max_position_embeddings
    checkpoint: tuple[str, str] | None = None  # (model_type, tokenizer_hash): the nodes must serve the same


def model_facts(model_dir: str) -> ModelFacts:
    """The served model's facts; all unknown when no directory is configured."""
    if not model_dir:
        return ModelFacts()
    root = Path(model_dir)
    config = json.loads((root / "config.json").read_text())
    generation = root / "generation_config.json"
    eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    eos = config.get("eos_token_id") if eos is None else eos
    eos_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
    codec = TextCodec(root / "tokenizer.json") if (root / "tokenizer.json").is_file() else None
    checkpoint = (config.get("model_type", ""), tokenizer_hash(root))
    return ModelFacts(codec, eos_ids, config["vocab_size"], config.get("max_position_embeddings"), checkpoint)
