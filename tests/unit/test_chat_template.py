"""ChatTemplate: HF-compatible Jinja environment and message validation."""
from __future__ import annotations

import datetime

import pytest

from taskloom.tokenizer.chat_template import ChatTemplate, TemplateError, normalize_messages

# Block tags indented and on their own lines: lstrip_blocks and trim_blocks must remove them
# entirely, leaving only the literal lines.
CHATML = """\
{% for message in messages %}
    {% if message['role'] == 'user' %}
<|im_start|>user
{{ message['content'] }}<|im_end|>
    {% else %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""


def test_trim_and_lstrip_blocks_remove_block_whitespace() -> None:
    rendered = ChatTemplate(CHATML).render([{"role": "user", "content": "hi"}],
                                           add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_without_generation_prompt() -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rendered = ChatTemplate(CHATML).render(messages, add_generation_prompt=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"


def test_expression_whitespace_is_kept() -> None:
    template = "{% for m in messages %}  [{{ m.content }}]\n{% endfor %}"
    assert ChatTemplate(template).render([{"role": "user", "content": "x"}]) == "  [x]\n"


def test_raise_exception_raises_template_error_with_message() -> None:
    template = ("{% if messages[0]['role'] != 'user' %}"
                "{{ raise_exception('Conversations must start with a user message') }}{% endif %}")
    with pytest.raises(TemplateError, match="must start with a user message") as info:
        ChatTemplate(template).render([{"role": "assistant", "content": "x"}])
    assert isinstance(info.value, ValueError)


def test_content_parts_are_joined_with_newline() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "first"},
                                             {"type": "text", "text": "second"}]}]
    assert ChatTemplate("{{ messages[0].content }}").render(messages) == "first\nsecond"


def test_normalize_does_not_modify_the_callers_messages() -> None:
    parts = [{"type": "text", "text": "a"}]
    messages = [{"role": "user", "content": parts}]
    normalize_messages(messages)
    assert messages[0]["content"] is parts


def test_tojson_does_not_escape_html_and_takes_options() -> None:
    template = ("{{ messages[0].content | tojson }}|"
                "{{ {'b': 1, 'a': [1]} | tojson(indent=1, sort_keys=True) }}")
    rendered = ChatTemplate(template).render([{"role": "user", "content": "<b>&'é"}])
    assert rendered == "\"<b>&'é\"|{\n \"a\": [\n  1\n ],\n \"b\": 1\n}"


def test_strftime_now() -> None:
    rendered = ChatTemplate("{{ strftime_now('%Y') }}").render([{"role": "user", "content": ""}])
    assert rendered in {str(datetime.datetime.now().year), str(datetime.datetime.now().year - 1)}


def test_loop_controls() -> None:
    template = ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                "{{ m.content }}{% endfor %}")
    messages = [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]
    assert ChatTemplate(template).render(messages) == "one"


def test_special_tokens_and_optional_variables() -> None:
    template = ("{% if bos_token is defined %}{{ bos_token }}{% endif %}"
                "{{ tools is none }}{{ documents is none }}{{ eos_token | default('-') }}")
    messages = [{"role": "user", "content": "x"}]
    rendered = ChatTemplate(template).render(messages, special_tokens={"bos_token": "<s>"})
    assert rendered == "<s>TrueTrue-"
    assert ChatTemplate(template).render(messages) == "TrueTrue-"
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert ChatTemplate("{{ tools[0].function.name }}").render(messages, tools=tools) == "f"


def test_none_content_is_allowed_with_tool_calls_and_dropped() -> None:
    messages = [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]
    template = "{{ messages[0].content is defined }}{{ messages[0].tool_calls[0].id }}"
    assert ChatTemplate(template).render(messages) == "False1"


def test_sandbox_blocks_mutation() -> None:
    with pytest.raises(TemplateError, match="failed to render"):
        ChatTemplate("{% set _ = messages.append(1) %}").render([{"role": "user", "content": "x"}])


def test_syntax_error_is_a_template_error() -> None:
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")


@pytest.mark.parametrize(("messages", "problem"), [
    ("hello", "must be a list"),
    ([], "at least one message"),
    ([{"role": "user", "content": "ok"}, "text"], "message 1 must be a dict"),
    ([{"role": "user", "content": "ok"}, {"content": "x"}], "message 1: 'role'"),
    ([{"role": "user"}], "message 0 \\(role 'user'\\) has no 'content'"),
    ([{"role": "user", "content": 5}], "message 0: content must be a string or a list"),
    ([{"role": "user", "content": None}], "message 0 .*only allowed on a message with tool_calls"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
     "message 0: content part 0 .*'image_url'"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}],
     "message 0: content part 0 has no string 'text'"),
])
def test_bad_messages_name_the_problem(messages: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ChatTemplate(CHATML).render(messages)  # type: ignore[arg-type]
