"""Structured outputs: a completion held to a JSON schema, any JSON object, a regular
expression, one of a list of strings, or a Lark grammar, by masking before each sample the
tokens the grammar forbids there (vLLM's `structured_outputs`, llama.cpp's grammars).

llguidance (the library vLLM's "guidance" backend and llama.cpp use) compiles the constraint
against the model's tokenizer and computes, from a request's tokens so far, the bit mask of
the tokens allowed next: one bit per vocabulary entry, 32 to an int32 word. Each request owns
a `Grammar`; the scheduler asks it for the mask of every step that samples for the request,
the runner applies the mask to that request's logits, and the scheduler's update feeds each
new token back into the grammar. A completion ends when the grammar can take nothing but the
end of the text (finish_reason "stop"), or at the usual limits. With speculative decoding, a
request's drafts are cut to those the grammar takes, and its step carries one mask per
position (the grammar consumes the drafts, then rolls them back).

Pure Python (llguidance is a Rust extension with no torch dependency), imported only when a
request asks for structured output.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from taskloom.sampling_params import InvalidParameter, StructuredOutputs

logger = logging.getLogger(__name__)


class Grammar:
    """One request's constraint and where it stands: the tokens it allows next."""

    def __init__(self, matcher: Any, num_words: int) -> None:
        self._matcher = matcher
        self._num_words = num_words

    def bitmask(self) -> bytes:
        """The allowed next tokens: `num_words` little-endian int32 words, bit i of word w
        allowing token 32 * w + i."""
        return self._matcher.compute_bitmask()[:4 * self._num_words]

    def valid_prefix(self, token_ids: Sequence[int]) -> int:
        """How many of `token_ids`, in order, the grammar would take from here."""
        return self._matcher.validate_tokens(list(token_ids))

    def bitmasks_along(self, token_ids: Sequence[int]) -> bytes:
        """The masks at each position of a speculative step: here, then after each of
        `token_ids` (drafts the grammar takes: see `valid_prefix`), one after another; the
        grammar is left where it was."""
        parts = [self.bitmask()]
        for t in token_ids:
            if not self._matcher.consume_token(t):
                raise RuntimeError(f"draft token {t} breaks the grammar: "
                                   f"{self._matcher.get_error()}")
            parts.append(self.bitmask())
        self._matcher.rollback(len(token_ids))
        return b"".join(parts)

    def accept(self, token_id: int) -> bool:
        """Take the request's next token; False if the grammar forbids it (it then stays in
        an error state)."""
        return self._matcher.consume_token(token_id)

    @property
    def done(self) -> bool:
        """Whether the grammar can take no more tokens but the end of the text."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None


class GrammarCompiler:
    """Compiles each request's `StructuredOutputs` for one model's tokenizer.

    `tokenizer_json` is the `tokenizers` library's serialisation of the tokenizer (HF
    tokenizer.json, or the one taskloom builds from a GGUF file); llguidance reads every
    token's bytes from it, once, when the first structured request arrives (about half a
    second for a 50k vocabulary)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: tuple[int, ...]
                 ) -> None:
        self._tokenizer_json = tokenizer_json
        self._vocab_size = vocab_size
        self._eos_token_ids = list(eos_token_ids)
        self._tokenizer: Any = None

    def compile(self, spec: StructuredOutputs) -> Grammar:
        """A fresh `Grammar` for `spec`; InvalidParameter (a ValueError) saying what is
        wrong with it."""
        import llguidance
        if self._tokenizer is None:
            self._tokenizer = llguidance.LLTokenizer(
                self._tokenizer_json, n_vocab=self._vocab_size, eos_token=self._eos_token_ids)
        matcher = llguidance.LLMatcher(self._tokenizer, _grammar(spec), log_level=0)
        if matcher.is_error():
            raise InvalidParameter("structured_outputs", f"invalid structured output "
                                   f"({spec.kind}): {matcher.get_error()}")
        return Grammar(matcher, -(-self._vocab_size // 32))


def _grammar(spec: StructuredOutputs) -> str:
    """The llguidance grammar of a constraint."""
    from llguidance import LLMatcher
    try:
        if spec.json is not None:
            return LLMatcher.grammar_from_json_schema(_schema(spec.json))
        if spec.json_object:
            return LLMatcher.grammar_from_json_schema({"type": "object"})
        if spec.regex is not None:
            return LLMatcher.grammar_from_regex(spec.regex)
        if spec.choice is not None:
            return LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in spec.choice))
        assert spec.grammar is not None
        return LLMatcher.grammar_from_lark(spec.grammar)
    except ValueError as e:
        raise InvalidParameter("structured_outputs",
                               f"invalid structured output ({spec.kind}): {e}") from None


def _schema(schema: dict | str) -> dict:
    if isinstance(schema, dict):
        return schema
    try:
        parsed = json.loads(schema)
    except json.JSONDecodeError as e:
        raise ValueError(f"the JSON schema is not JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"a JSON schema must be an object, got {schema!r}")
    return parsed
