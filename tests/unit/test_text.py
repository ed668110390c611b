"""controller.text.TextStream: streamed text deltas add up to the decoded sequence, with work linear in
the number of tokens, for a byte-level BPE tokenizer and multi-byte characters split across tokens; and
TokenPieces, each token's own text and bytes for log probabilities."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from controller.text import TextCodec, TextStream, TokenPieces

TEXT = "héllo wörld, 日本語のテキスト 🙂🚀 naïve café; ünïcödé ½ — “quotes” 𝔘𝔫𝔦"


class CountingCodec(TextCodec):
    """A real codec that counts how many token ids it was asked to decode in all."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.decoded_ids = tokenizer, 0

    def decode(self, ids: list[int]) -> str:
        self.decoded_ids += len(ids)
        return super().decode(ids)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())  # the reference model's tokenizer kind
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]
    )
    tok.train_from_iterator([TEXT] * 8, trainer)
    return tok


@pytest.mark.parametrize("seed", range(5))
def test_deltas_add_up_to_the_decoded_text(tokenizer, seed):
    ids = tokenizer.encode(TEXT).ids
    assert any(len(tokenizer.decode([i])) == 0 or "\ufffd" in tokenizer.decode([i]) for i in ids)  # split chars
    rng, codec = random.Random(seed), CountingCodec(tokenizer)
    stream, deltas, start = TextStream(codec), [], 0
    while start < len(ids):  # rounds of 1..5 tokens, as speculative rounds commit them
        end = start + rng.randint(1, 5)
        deltas.append(stream.push(ids[start:end]))
        start = end
    assert "".join(deltas) == TEXT == codec.decode(ids)
    assert all("\ufffd" not in d for d in deltas)  # a split character is held back, never sent broken
    assert codec.decoded_ids == len(ids)  # only the check above decoded: pushes never re-decode the sequence


def test_special_tokens_are_skipped_and_no_codec_means_no_text(tokenizer):
    eos = tokenizer.token_to_id("<eos>")
    stream = TextStream(CountingCodec(tokenizer))
    assert stream.push(tokenizer.encode("café").ids + [eos]) == "café"
    assert TextStream(None).push([1, 2, 3]) == ""
    assert TextStream(None).push([]) == ""


@pytest.mark.parametrize("cut", [1, 3, 5, 8, 13])
def test_a_stream_primed_with_what_the_client_has_continues_its_text(tokenizer, cut):
    """A resumed stream's text (the controller pushes the tokens its client already has, and sends only
    what follows) equals the rest of an uninterrupted stream's, even when the cut splits a character."""
    ids = tokenizer.encode(TEXT).ids
    whole, rng, before, sent = TextStream(CountingCodec(tokenizer)), random.Random(cut), "", 0
    while sent < cut:  # rounds of any size: what was sent must not depend on them
        size = min(rng.randint(1, 4), cut - sent)
        before += whole.push(ids[sent : sent + size])
        sent += size
    resumed = TextStream(CountingCodec(tokenizer))
    resumed.skip(ids[:cut])
    assert before + resumed.push(ids[cut:]) == TEXT


def test_token_pieces_give_each_tokens_text_and_exact_bytes(tokenizer):
    """Log probabilities' token texts (controller.text.TokenPieces): what each token adds after the ones
    before it, and its exact bytes, which add up to the text's UTF-8 even where a token splits a character."""
    codec = TextCodec.__new__(TextCodec)
    codec.tokenizer = tokenizer
    ids = tokenizer.encode(TEXT).ids
    pieces = TokenPieces(codec, ids[:3])
    texts, raw = [], b""
    for token in ids[3:]:
        text = pieces.text(token)
        assert pieces.text(token) == text  # asking for an alternative does not move the position
        texts.append(text)
        raw += bytes(pieces.bytes(token, text))
        pieces.advance(token)
    assert raw.decode() == tokenizer.decode(ids[3:]) == TEXT[len(tokenizer.decode(ids[:3])) :]
    assert "\ufffd" in "".join(texts)  # a token that holds part of a character reads U+FFFD; its bytes are exact
    assert TokenPieces(codec, []).text(tokenizer.token_to_id("<eos>")) == "<eos>"  # special tokens shown
    assert TokenPieces(None, [1]).text(7) == "token_id:7" and TokenPieces(None, [1]).bytes(7, "") is None


def test_token_pieces_read_sentencepiece_byte_tokens():
    vocab = {"<unk>": 0, "▁a": 1, "<0xE2>": 2, "<0x82>": 3, "<0xAC>": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    codec = TextCodec.__new__(TextCodec)
    codec.tokenizer = tok
    pieces = TokenPieces(codec, [1])
    assert [pieces.bytes(t, pieces.text(t)) for t in (2, 3, 4)] == [[0xE2], [0x82], [0xAC]]  # "€" in 3 tokens
    assert pieces.text(1) == " a" and pieces.bytes(1, " a") == [32, 97]
