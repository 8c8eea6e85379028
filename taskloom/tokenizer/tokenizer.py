"""The engine's tokenizer: a `tokenizers.Tokenizer` plus what the model's config says around it.

The text <-> ids work is done by the Rust `tokenizers` library; this class adds the special
tokens (BOS, EOS and every token that ends a turn), the chat template, and two loaders:

- `Tokenizer.from_hf_dir`: a Hugging Face model directory (`tokenizer.json`,
  `tokenizer_config.json`, `chat_template.jinja`, `special_tokens_map.json`,
  `generation_config.json`), read the way transformers >= 5 reads it: `tokenizer.json`'s
  post-processor decides whether BOS is added.
- `Tokenizer.from_gguf`: a GGUF file's tokenizer metadata (see `gguf_tokenizer`).

`load_tokenizer` picks the loader from the path.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import tokenizers

from taskloom.tokenizer.chat_template import ChatTemplate

logger = logging.getLogger(__name__)

__all__ = ["Tokenizer", "TokenizerConfig", "load_tokenizer", "TURN_END_MARKERS"]

# Special tokens that close a chat turn. When the chat template writes one, generation stops
# on it as well as on the primary EOS (SmolLM2 / Qwen, Llama 3, Phi-3, Gemma).
TURN_END_MARKERS: tuple[str, ...] = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>",
                                     "<end_of_turn>")

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass(frozen=True)
class TokenizerConfig:
    """What a model's configuration says around its vocabulary.

    bos_token / eos_token / unk_token / pad_token: the token texts, or None.
    chat_template: the Jinja chat template source, or None.
    extra_eos_token_ids: ids that also end generation (generation_config.json's eos ids, a
        GGUF's eot / eom ids), besides the primary EOS.
    """

    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    pad_token: str | None = None
    chat_template: str | None = None
    extra_eos_token_ids: tuple[int, ...] = ()


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and chat template.

    Args:
        backend: the `tokenizers.Tokenizer` (normalizer, pre-tokenizer, model, decoder and the
            post-processor that adds BOS / EOS when the model wants them).
        config: special tokens, chat template and extra end-of-generation ids.

    Raises:
        ValueError: the configured BOS or EOS token is not in the vocabulary (an unknown
            unk / pad token is only logged).
    """

    def __init__(self, backend: tokenizers.Tokenizer, config: TokenizerConfig) -> None:
        self._backend = backend
        self._config = config
        self._special_token_ids = {key: self._lookup(key, getattr(config, key))
                                   for key in _SPECIAL_TOKEN_KEYS}
        added = backend.get_added_tokens_decoder()
        self._all_special_ids = frozenset(
            [token_id for token_id, token in added.items() if token.special]
            + [token_id for token_id in self._special_token_ids.values() if token_id is not None])
        self._template: ChatTemplate | None = None
        self._eos_token_ids = self._collect_eos_ids()

    def __reduce__(self) -> tuple[type[Tokenizer], tuple[tokenizers.Tokenizer, TokenizerConfig]]:
        """Pickled as what it is built from (an engine process sends its tokenizer to the
        server's process this way; the chat template compiles again where it is used)."""
        return Tokenizer, (self._backend, self._config)

    def _lookup(self, key: str, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self._backend.token_to_id(token)
        if token_id is None and key in ("bos_token", "eos_token"):
            raise ValueError(f"{key} {token!r} is not in the tokenizer's vocabulary")
        if token_id is None:
            logger.warning("%s %r is not in the tokenizer's vocabulary; ignored", key, token)
        return token_id

    def _collect_eos_ids(self) -> tuple[int, ...]:
        ids = [] if self.eos_token_id is None else [self.eos_token_id]
        ids.extend(self._config.extra_eos_token_ids)
        template = self._config.chat_template or ""
        for marker in TURN_END_MARKERS:
            token_id = self._backend.token_to_id(marker)
            if token_id is not None and token_id in self._all_special_ids and marker in template:
                ids.append(token_id)
        return tuple(dict.fromkeys(ids))

    @classmethod
    def from_hf_dir(cls, path: str) -> Tokenizer:
        """Load a Hugging Face model directory's tokenizer.

        Raises:
            FileNotFoundError: the directory or its tokenizer.json does not exist.
            ValueError: a config file is not valid JSON or has an unexpected shape.
        """
        return _load_hf_dir(path)

    @classmethod
    def from_gguf(cls, path: str) -> Tokenizer:
        """Load the tokenizer described by a GGUF file's metadata.

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: the file has no tokenizer, or an unsupported tokenizer model or
                pre-tokenizer type.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file {path!r} does not exist")
        # imported here: the gguf package is needed only for GGUF files (the GPU image lacks it)
        from taskloom.tokenizer.gguf_tokenizer import build_gguf_tokenizer, read_gguf_vocab
        vocab = read_gguf_vocab(path)
        extra = tuple(i for i in (vocab.eot_token_id, vocab.eom_token_id) if i is not None)
        logger.info("loaded tokenizer from %s (%s, pre-tokenizer %s, %d tokens)", path,
                    vocab.model, vocab.pre, len(vocab.tokens))
        config = TokenizerConfig(
            bos_token=vocab.token(vocab.bos_token_id), eos_token=vocab.token(vocab.eos_token_id),
            unk_token=vocab.token(vocab.unk_token_id), pad_token=vocab.token(vocab.pad_token_id),
            chat_template=vocab.chat_template, extra_eos_token_ids=extra)
        return cls(build_gguf_tokenizer(vocab), config)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        """Text of the beginning-of-sequence token, or None."""
        return self._config.bos_token

    @property
    def eos_token(self) -> str | None:
        """Text of the primary end-of-sequence token, or None."""
        return self._config.eos_token

    @property
    def bos_token_id(self) -> int | None:
        """Id of the beginning-of-sequence token, or None."""
        return self._special_token_ids["bos_token"]

    @property
    def eos_token_id(self) -> int | None:
        """Id of the primary end-of-sequence token, or None."""
        return self._special_token_ids["eos_token"]

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: the primary EOS first, then the generation config's
        (or GGUF's eot / eom) ids, then turn-end tokens the chat template writes."""
        return self._eos_token_ids

    @property
    def all_special_ids(self) -> set[int]:
        """Ids of all special tokens (skipped by `decode(..., skip_special_tokens=True)`)."""
        return set(self._all_special_ids)

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template source, or None when the model has none."""
        return self._config.chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS / EOS as the model's config says."""
        if not isinstance(text, str):
            raise ValueError(f"text to encode must be a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids; invalid UTF-8 byte sequences decode to U+FFFD."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """Vocabulary spelling of each id (byte-level tokens in GPT-2's byte alphabet)."""
        tokens = []
        for token_id in ids:
            token = self._backend.id_to_token(int(token_id))
            if token is None:
                raise ValueError(f"token id {token_id} is not in the vocabulary of "
                                 f"{self.vocab_size} tokens")
            tokens.append(token)
        return tokens

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None,
                            documents: list[dict[str, Any]] | None = None,
                            continue_final_message: bool = False) -> str:
        """Render a conversation with the model's chat template (as transformers does);
        `continue_final_message` leaves the last message open, for the model to continue.

        Raises:
            ValueError: the model has no chat template, a message is malformed, or the final
                message cannot be continued.
            TemplateError: the template failed or raised an exception.
        """
        if self._config.chat_template is None:
            raise ValueError("this model's tokenizer has no chat template: pass a prompt "
                             "instead of messages, or use a model with a chat template")
        if self._template is None:  # compiled on first use: a broken template fails chats only
            self._template = ChatTemplate(self._config.chat_template)
        special = {key: getattr(self._config, key) for key in _SPECIAL_TOKEN_KEYS
                   if getattr(self._config, key) is not None}
        return self._template.render(messages, add_generation_prompt, special_tokens=special,
                                     tools=tools, documents=documents,
                                     continue_final_message=continue_final_message)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None,
                    continue_final_message: bool = False) -> list[int]:
        """Token ids of a rendered conversation (with `tools` shown to the model, if given).
        The template writes any BOS itself, so none is added (as transformers'
        `apply_chat_template(tokenize=True)`)."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools,
                                        continue_final_message=continue_final_message)
        return self.encode(text, add_special_tokens=False)


def _read_json(path: str) -> dict[str, Any] | None:
    """A JSON object file, or None when the file does not exist."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any, key: str, source: str) -> str | None:
    """A special token given as a string or an AddedToken dict (`{"content": ...}`)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{source}: {key} must be a string or a dict with a string 'content', "
                     f"got {value!r}")


def _chat_template_from_config(value: Any, source: str) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named templates."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {item.get("name"): item.get("template")
                 for item in value if isinstance(item, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
        logger.warning("%s: chat_template lists no 'default' template (has %s); none is used",
                       source, sorted(str(name) for name in named))
        return None
    raise ValueError(f"{source}: chat_template must be a string or a list of "
                     f"{{'name', 'template'}} dicts, got {type(value).__name__}")


def _hf_chat_template(path: str, tokenizer_config: Mapping[str, Any]) -> str | None:
    """`chat_template.jinja` (written by transformers >= 4.43) wins over the config's entry."""
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    return _chat_template_from_config(tokenizer_config.get("chat_template"),
                                      os.path.join(path, "tokenizer_config.json"))


def _generation_eos_ids(path: str) -> tuple[int, ...]:
    source = os.path.join(path, "generation_config.json")
    value = (_read_json(source) or {}).get("eos_token_id")
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{source}: eos_token_id must be an int or a list of ints, got {value!r}")
    return tuple(values)


def _load_hf_dir(path: str) -> Tokenizer:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    tokenizer_json = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tokenizer_json):
        ggufs = sorted(name for name in os.listdir(path) if name.lower().endswith(".gguf"))
        hint = f"; it holds GGUF files, pass one of them: {', '.join(ggufs)}" if ggufs else ""
        raise FileNotFoundError(f"model directory {path!r} has no tokenizer.json; expected a "
                                f"Hugging Face directory with a fast tokenizer{hint}")
    try:
        backend = tokenizers.Tokenizer.from_file(tokenizer_json)
    except Exception as exc:  # the tokenizers library raises a bare Exception
        raise ValueError(f"{tokenizer_json} is not a valid tokenizers file: {exc}") from exc
    tokenizer_config = _read_json(os.path.join(path, "tokenizer_config.json")) or {}
    legacy_map = _read_json(os.path.join(path, "special_tokens_map.json")) or {}
    source = os.path.join(path, "tokenizer_config.json")
    tokens = {key: _token_text(tokenizer_config.get(key, legacy_map.get(key)), key, source)
              for key in _SPECIAL_TOKEN_KEYS}
    config = TokenizerConfig(**tokens, chat_template=_hf_chat_template(path, tokenizer_config),
                             extra_eos_token_ids=_generation_eos_ids(path))
    logger.info("loaded tokenizer from %s (%d tokens)", path, backend.get_vocab_size(True))
    return Tokenizer(backend, config)


def load_tokenizer(model_path: str) -> Tokenizer:
    """Load the tokenizer of a model: a `.gguf` file or a Hugging Face model directory.

    Raises:
        FileNotFoundError: the path does not exist, or the directory has no tokenizer.json.
        ValueError: the path is a file but not a .gguf file, or the tokenizer is unsupported.
    """
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"model path {model_path!r} does not exist; expected a .gguf "
                                f"file or a Hugging Face model directory")
    if os.path.isdir(model_path):
        return Tokenizer.from_hf_dir(model_path)
    if model_path.lower().endswith(".gguf"):
        return Tokenizer.from_gguf(model_path)
    raise ValueError(f"model path {model_path!r} is a file but not a .gguf file; expected a "
                     f".gguf file or a Hugging Face model directory")
