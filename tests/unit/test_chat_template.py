"""controller.chat_template: where a checkpoint's chat template is found, and rendering as transformers does."""

import json

import pytest

from controller.chat_template import ChatTemplate
from eesd.errors import InvalidArgument

MESSAGES = [{"role": "user", "content": "héllo"}]


def checkpoint(tmp_path, config: dict, jinja: str | None = None):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (tmp_path / "chat_template.jinja").write_text(jinja)
    return str(tmp_path)


def test_a_string_template_with_special_tokens_and_generation_prompt(tmp_path):
    source = (
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}[a]{% endif %}"
    )
    template = ChatTemplate.of_model(checkpoint(tmp_path, {"chat_template": source, "bos_token": {"content": "<s>"}}))
    assert template.render(MESSAGES) == "<s>[user]héllo[a]"
    assert template.render(MESSAGES, add_generation_prompt=False) == "<s>[user]héllo"


def test_named_templates_and_the_jinja_file(tmp_path):
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages | tojson }}"}]
    assert ChatTemplate.of_model(checkpoint(tmp_path, {"chat_template": named})).render(MESSAGES) == (
        'D[{"role": "user", "content": "héllo"}]'  # tojson keeps non-ASCII, as transformers' does
    )
    jinja = "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    assert ChatTemplate.of_model(checkpoint(tmp_path, {}, jinja)).render(MESSAGES) == "héllo"


def test_no_template_and_a_refusing_one(tmp_path):
    assert ChatTemplate.of_model(checkpoint(tmp_path, {"bos_token": "<s>"})) is None
    assert ChatTemplate.of_model("") is None
    refusing = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InvalidArgument, match="roles must alternate") as error:
        refusing.render(MESSAGES)
    assert error.value.field == "messages"
    sandboxed = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidArgument):
        sandboxed.render(MESSAGES)
