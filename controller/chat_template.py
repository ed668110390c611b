"""Chat messages to a prompt with the checkpoint's own chat template, rendered the way transformers'
`apply_chat_template` renders it (jinja2's ImmutableSandboxedEnvironment with trim_blocks and
lstrip_blocks, the loop-control extension, a `tojson` that keeps non-ASCII, and the `raise_exception` and
`strftime_now` globals), so the controller needs no torch and no transformers. The template comes from
`chat_template.jinja` or tokenizer_config.json's `chat_template` (a string, or named templates of which
"default" is used); the special tokens of tokenizer_config.json are the template's variables too."""

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from eesd.errors import InvalidArgument

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant tokens with it): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_text(value) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken's {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.template = env.from_string(source)
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def of_model(cls, model_dir: str) -> "ChatTemplate | None":
        """The checkpoint's chat template; None when it has none."""
        if not model_dir:
            return None
        root = Path(model_dir)
        config_file = root / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if (root / "chat_template.jinja").is_file():  # how transformers saves it since 4.43
            source = (root / "chat_template.jinja").read_text()
        if not isinstance(source, str) or not source:
            return None
        specials = {name: text for name in SPECIAL_TOKENS if (text := _token_text(config.get(name))) is not None}
        return cls(source, specials)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        """The prompt text; a template that refuses the conversation (raise_exception, a bad variable) is an
        InvalidArgument naming `messages`."""
        context = {**self.special_tokens, **variables}
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None, **context
            )
        except Exception as error:  # TemplateError (raise_exception, SecurityError, UndefinedError), TypeError, ...
            raise InvalidArgument("messages", f"the model's chat template refused them: {error}") from error
