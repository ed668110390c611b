"""A tiny checkpoint made servable by the OpenAI-compatible API: a word-level tokenizer over its vocabulary
(token i reads "w<i>", text is the words joined by spaces, so any token sequence has a text and back) and a
chat template in tokenizer_config.json, the way Hugging Face checkpoints carry them."""

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

VOCAB = 384  # eesd.tiny's vocabulary
# Each message as its role's word and its content, then the assistant's turn opened; "w3" is the
# separator. A conversation that does not start with a user message is refused, as many templates do.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] not in ('user', 'system') %}"
    "{{ raise_exception('Conversation must start with a user or system message') }}{% endif %}"
    "{{ bos_token }} "
    "{% for m in messages %}{{ {'system': 'w4', 'user': 'w5', 'assistant': 'w6'}[m['role']] }} "
    "{{ m['content'] }} w3 {% endfor %}"
    "{% if add_generation_prompt %}w6{% endif %}"
)


def word_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return tokenizer


def words(ids: list[int]) -> str:
    """The text of `ids` as the word tokenizer writes it."""
    return " ".join(f"w{i}" for i in ids)


def servable_model(model_dir: Path, out: Path, chat_template: bool = True) -> Path:
    """A copy of the checkpoint with the word tokenizer and, when `chat_template`, the chat template."""
    shutil.copytree(model_dir, out)
    word_tokenizer().save(str(out / "tokenizer.json"))
    config = {"bos_token": "w1", "eos_token": "w2", "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template:
        config["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out
