"""Token ids <-> text on the controller, with the `tokenizers` library only (no torch in this image)."""

import json
import re
from dataclasses import dataclass
from functools import cache
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


@cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (the `tokenizers` ByteLevel pre-tokenizer's): character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = dict(zip(printable, printable, strict=True)), 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = 256 + extra, extra + 1
    return {chr(c): b for b, c in chars.items()}


BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte tokens


class TokenPieces:
    """Each generated token's own text and bytes, for log probabilities (OpenAI's `tokens` of a completion,
    `token` and `bytes` of a chat completion), and the same for the alternatives at its position.

    A token's text is what it adds after the tokens before it (a word's leading space included), decoded
    with the few tokens before it as context and special tokens shown; a token that holds only part of a
    multi-byte character reads as U+FFFD, and its `bytes` are its exact bytes where the vocabulary says
    them (byte-level BPE, SentencePiece's <0xNN> tokens), else its text's UTF-8."""

    CONTEXT = 4  # tokens of context before each token

    def __init__(self, codec: TextCodec | None, prompt: list[int]):
        self.codec = codec
        self.context = list(prompt[-self.CONTEXT :])
        self._before: str | None = None  # the context's text, decoded once per position
        decoder = json.loads(codec.tokenizer.to_str()).get("decoder") if codec is not None else None
        self.byte_level = '"ByteLevel"' in json.dumps(decoder)

    def _decode(self, ids: list[int]) -> str:
        return self.codec.tokenizer.decode(ids, skip_special_tokens=False)

    def text(self, token: int) -> str:
        """The text `token` adds at the current position (without advancing). `token_id:<id>` without a
        tokenizer, as vLLM writes it."""
        if self.codec is None:
            return f"token_id:{token}"
        if self._before is None:
            self._before = self._decode(self.context)
        after = self._decode([*self.context, token])
        common = 0
        for a, b in zip(self._before, after, strict=False):  # a context that ends mid-character reads U+FFFD
            if a != b:
                break
            common += 1
        return after[common:]

    def bytes(self, token: int, text: str) -> list[int] | None:
        """The token's bytes (`text` is its text at this position); None without a tokenizer."""
        if self.codec is None:
            return None
        piece = self.codec.tokenizer.id_to_token(token) or ""
        if (byte := BYTE_FALLBACK.fullmatch(piece)) is not None:
            return [int(byte.group(1), 16)]
        alphabet = _byte_level_alphabet()
        if self.byte_level and piece and all(c in alphabet for c in piece):
            return [alphabet[c] for c in piece]
        return list(text.encode("utf-8"))

    def advance(self, token: int) -> None:
        """Moves past `token`, the one committed at this position."""
        self.context = [*self.context, token][-self.CONTEXT :]
        self._before = None


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
