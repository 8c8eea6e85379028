"""Chat templates: render a model's Jinja chat template exactly as HF transformers does.

Templates come from model repositories and are untrusted code, so they run in jinja2's
immutable sandbox. The environment (trim_blocks, lstrip_blocks, loop controls, the `tojson`
filter that does not escape HTML, `raise_exception`, `strftime_now`) mirrors
`transformers.utils.chat_template_utils`, so a prompt rendered here is byte-identical to
`tokenizer.apply_chat_template(..., tokenize=False)`.

Messages are validated before rendering: a bad message fails with an error that names its
index and what was expected, instead of a Jinja error from deep inside the template.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplate", "TemplateError", "normalize_messages"]

TEXT_PART_SEPARATOR = "\n"
# appended to the message to continue, so that the rendered prompt can be cut where it ends
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class TemplateError(ValueError):
    """A chat template failed to compile or render, or called `raise_exception`."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _build_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _content_to_text(index: int, content: Any) -> str:
    """A message's content as one string: a string as is, text parts joined by a newline."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"message {index}: content must be a string or a list of text parts, "
                         f"got {type(content).__name__}")
    texts = []
    for part_index, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ValueError(f"message {index}: content part {part_index} must be "
                             f"{{'type': 'text', 'text': str}}, got type {kind!r}")
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"message {index}: content part {part_index} has no string 'text', "
                             f"got {type(text).__name__}")
        texts.append(text)
    return TEXT_PART_SEPARATOR.join(texts)


def _normalize_message(index: int, message: Any) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise ValueError(f"message {index} must be a dict with 'role' and 'content', "
                         f"got {type(message).__name__}")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise ValueError(f"message {index}: 'role' must be a non-empty string, got {role!r}")
    if "content" not in message:
        raise ValueError(f"message {index} (role {role!r}) has no 'content'")
    normalized = {key: value for key, value in message.items() if value is not None}
    content = message["content"]
    if content is None:
        if not message.get("tool_calls"):
            raise ValueError(f"message {index} (role {role!r}): content is None, which is only "
                             f"allowed on a message with tool_calls")
        return normalized
    normalized["content"] = _content_to_text(index, content)
    return normalized


def normalize_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Validate chat messages and return copies with text-part content joined into a string.

    Each message must be a dict with a non-empty string `role` and a `content` that is a
    string or a list of `{"type": "text", "text": ...}` parts (joined with a newline); content
    may be None only on a message carrying `tool_calls`. Keys whose value is None are dropped,
    as transformers does. Raises ValueError naming the message index and the problem.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must hold at least one message, got an empty list")
    return [_normalize_message(index, message) for index, message in enumerate(messages)]


def _cut_at_continue_tag(rendered: str, final: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in rendered or tag not in rendered:
        raise ValueError("continue_final_message is set but the chat template drops the final "
                         "message's content, so there is no end of it to continue from")
    at = rendered.rindex(tag)
    if rendered[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]              # the template keeps the content's spacing
    return rendered[:at].rstrip()         # it strips the content: so is the prompt's end


class ChatTemplate:
    """A compiled chat template.

    Args:
        source: the Jinja source of the template.

    Raises:
        TemplateError: the source is not a valid Jinja template.
    """

    def __init__(self, source: str) -> None:
        if not isinstance(source, str) or not source:
            raise TemplateError(f"a chat template must be a non-empty string, got {source!r}")
        self.source = source
        try:
            self._template = _build_environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"chat template does not compile: {exc.message} "
                                f"(line {exc.lineno})") from exc

    def render(self, messages: Sequence[Any], add_generation_prompt: bool = True, *,
               special_tokens: Mapping[str, str] | None = None,
               tools: list[dict[str, Any]] | None = None,
               documents: list[dict[str, Any]] | None = None,
               continue_final_message: bool = False) -> str:
        """Render a conversation to the prompt text.

        Args:
            messages: the conversation (validated by `normalize_messages`).
            add_generation_prompt: append the header that opens the assistant's turn.
            special_tokens: template variables such as `bos_token` and `eos_token`; only
                tokens the model has are passed, so `{% if bos_token is defined %}` works.
            tools: JSON schemas of tools, or None.
            documents: retrieval documents (dicts), or None.
            continue_final_message: end the prompt where the last message's content ends,
                without what closes its turn, for the model to continue it (a reply's
                prefill); as transformers does it, with a tag appended to the content and
                the rendered text cut where the tag is.

        Raises:
            ValueError: a message is malformed, or the final message cannot be continued.
            TemplateError: the template failed or called `raise_exception`.
        """
        normalized = normalize_messages(messages)
        final = normalized[-1].get("content")
        if continue_final_message:
            if add_generation_prompt:
                raise ValueError("continue_final_message and add_generation_prompt cannot both "
                                 "be set: the first continues the last message, the second "
                                 "opens a new assistant turn")
            if not isinstance(final, str):
                raise ValueError("continue_final_message is set but the final message has no "
                                 "content to continue")
            normalized[-1] = {**normalized[-1], "content": final + _CONTINUE_TAG}
        variables: dict[str, Any] = dict(special_tokens or {})
        variables.update(messages=normalized, tools=tools, documents=documents,
                         add_generation_prompt=add_generation_prompt)
        try:
            rendered = self._template.render(**variables)
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template failed to render: {exc}") from exc
        if continue_final_message:
            rendered = _cut_at_continue_tag(rendered, final)
        return rendered
