"""Build a `tokenizers.Tokenizer` from the tokenizer metadata of a GGUF file.

A GGUF file carries no `tokenizer.json`: it stores the vocabulary, merges, token types and the
pre-tokenizer's name under llama.cpp's keys. This module reads them with `gguf.GGUFReader` and
rebuilds the tokenizer the model was trained with:

- `gpt2` (byte-level BPE): the split regex of the file's pre-tokenizer type (`tokenizer.ggml.pre`),
  the same regex as the model's original `tokenizer.json` and llama.cpp; ByteLevel decoder.
- `llama` (SentencePiece BPE): merges recovered from the scores as transformers' converter
  does, byte fallback, Metaspace pre-tokenizer and the matching decoder.

Control and unknown tokens become special added tokens (matched whole in text, skipped when
decoding with `skip_special_tokens`); user-defined tokens (such as `<think>`) are matched whole
but kept when decoding, as llama.cpp and transformers do.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gguf
from gguf import Keys, TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors

from taskloom.models.gguf_reader import open_gguf

logger = logging.getLogger(__name__)

__all__ = ["GGUFVocab", "read_gguf_vocab", "build_gguf_tokenizer", "SUPPORTED_PRE_TYPES",
           "SUPPORTED_MODELS"]

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class _PreTokenizerSpec:
    """How a byte-level vocabulary splits text before BPE.

    split_regex: an isolating split regex applied before the byte mapping; None means the
        GPT-2 regex built into the ByteLevel pre-tokenizer.
    individual_digits: split every digit on its own first (StarCoder, SmolLM).
    nfc: NFC-normalize the text first (Qwen2).
    ignore_merges: a pre-token that is itself in the vocabulary is one token (Llama 3).
    """

    split_regex: str | None = None
    individual_digits: bool = False
    nfc: bool = False
    ignore_merges: bool = False


_GPT2 = _PreTokenizerSpec()
_DIGITS_THEN_GPT2 = _PreTokenizerSpec(individual_digits=True)
_LLAMA3 = _PreTokenizerSpec(split_regex=_LLAMA3_SPLIT, ignore_merges=True)
_QWEN2 = _PreTokenizerSpec(split_regex=_QWEN2_SPLIT, nfc=True)

_PRE_TOKENIZERS: dict[str, _PreTokenizerSpec] = {
    "default": _GPT2,
    "gpt2": _GPT2,
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "smaug-bpe": _LLAMA3,
    "dbrx": _LLAMA3,
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
}

SUPPORTED_PRE_TYPES: tuple[str, ...] = tuple(sorted(_PRE_TOKENIZERS))
SUPPORTED_MODELS: tuple[str, ...] = ("gpt2", "llama")

_SPM_SPACE = "\u2581"


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer metadata of a GGUF file (llama.cpp's `tokenizer.*` keys)."""

    model: str
    pre: str | None
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...] | None
    scores: tuple[float, ...] | None
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    eot_token_id: int | None
    eom_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    add_space_prefix: bool
    chat_template: str | None

    def token(self, token_id: int | None) -> str | None:
        """The text of a token id, or None for None; ValueError when out of range."""
        if token_id is None:
            return None
        if not 0 <= token_id < len(self.tokens):
            raise ValueError(f"GGUF special token id {token_id} is outside the vocabulary "
                             f"of {len(self.tokens)} tokens")
        return self.tokens[token_id]


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def read_gguf_vocab(path: str) -> GGUFVocab:
    """Read the tokenizer metadata of the GGUF file at `path`.

    Raises:
        ValueError: the file is not a GGUF file, has no tokenizer vocabulary, or its arrays
            disagree in length.
    """
    reader = open_gguf(path)
    model = _field(reader, Keys.Tokenizer.MODEL)
    tokens = _field(reader, Keys.Tokenizer.LIST)
    if model is None or tokens is None:
        raise ValueError(f"GGUF file {path!r} holds no tokenizer: expected the keys "
                         f"{Keys.Tokenizer.MODEL!r} and {Keys.Tokenizer.LIST!r}")
    token_types = _field(reader, Keys.Tokenizer.TOKEN_TYPE) or [TokenType.NORMAL] * len(tokens)
    scores = _field(reader, Keys.Tokenizer.SCORES)
    merges = _field(reader, Keys.Tokenizer.MERGES)
    for name, values in (("token_type", token_types), ("scores", scores)):
        if values is not None and len(values) != len(tokens):
            raise ValueError(f"GGUF file {path!r}: tokenizer.ggml.{name} has {len(values)} "
                             f"entries, expected one per token ({len(tokens)})")
    add_bos = _field(reader, Keys.Tokenizer.ADD_BOS)
    add_prefix = _field(reader, Keys.Tokenizer.ADD_PREFIX)
    return GGUFVocab(
        model=model, pre=_field(reader, Keys.Tokenizer.PRE), tokens=tuple(tokens),
        token_types=tuple(int(t) for t in token_types),
        merges=None if merges is None else tuple(merges),
        scores=None if scores is None else tuple(float(s) for s in scores),
        bos_token_id=_field(reader, Keys.Tokenizer.BOS_ID),
        eos_token_id=_field(reader, Keys.Tokenizer.EOS_ID),
        unk_token_id=_field(reader, Keys.Tokenizer.UNK_ID),
        pad_token_id=_field(reader, Keys.Tokenizer.PAD_ID),
        eot_token_id=_field(reader, Keys.Tokenizer.EOT_ID),
        eom_token_id=_field(reader, Keys.Tokenizer.EOM_ID),
        # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
        add_bos_token=bool(add_bos) if add_bos is not None else model == "llama",
        add_eos_token=bool(_field(reader, Keys.Tokenizer.ADD_EOS) or False),
        add_space_prefix=True if add_prefix is None else bool(add_prefix),
        chat_template=_field(reader, Keys.Tokenizer.CHAT_TEMPLATE),
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the byte-level alphabet)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _is_added(token_type: int) -> bool:
    return token_type in (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)


def _vocab_dict(vocab: GGUFVocab, respell: bool) -> dict[str, int]:
    """Token text -> id. With `respell`, a normal token written outside the byte-level alphabet
    is respelled in it; added tokens keep their raw text, which is how they are matched."""
    byte_map = _bytes_to_unicode() if respell else {}
    alphabet = set(byte_map.values())
    result: dict[str, int] = {}
    for token_id, (token, token_type) in enumerate(zip(vocab.tokens, vocab.token_types)):
        if respell and not _is_added(token_type) and not set(token) <= alphabet:
            token = "".join(byte_map[b] for b in token.encode("utf-8"))
        if token in result:
            logger.warning("GGUF token %d %r repeats token %d; text maps to the first",
                           token_id, token, result[token])
            continue
        result[token] = token_id
    return result


def _parse_merges(merges: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for index, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"GGUF merge {index} {merge!r} is not two tokens separated by "
                             f"one space")
        pairs.append((parts[0], parts[1]))
    return pairs


def _byte_level_pre_tokenizer(spec: _PreTokenizerSpec) -> pre_tokenizers.PreTokenizer:
    steps: list[pre_tokenizers.PreTokenizer] = []
    if spec.individual_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if spec.split_regex is not None:
        steps.append(pre_tokenizers.Split(Regex(spec.split_regex), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False,
                                          use_regex=spec.split_regex is None))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


def _pre_tokenizer_spec(pre: str | None) -> _PreTokenizerSpec:
    name = pre or "default"
    if name not in _PRE_TOKENIZERS:
        raise ValueError(f"GGUF pre-tokenizer type {name!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_PRE_TYPES)}")
    return _PRE_TOKENIZERS[name]


def _byte_level_tokenizer(vocab: GGUFVocab) -> Tokenizer:
    if vocab.merges is None:
        raise ValueError("GGUF byte-level (gpt2) vocabulary has no tokenizer.ggml.merges")
    spec = _pre_tokenizer_spec(vocab.pre)
    tokenizer = Tokenizer(models.BPE(_vocab_dict(vocab, respell=True), _parse_merges(vocab.merges),
                                     fuse_unk=False, ignore_merges=spec.ignore_merges))
    if spec.nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(spec)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _merges_from_scores(vocab: GGUFVocab, token_ids: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges recovered from piece scores (transformers' extractor):
    every split of a normal piece into two pieces of the vocabulary is a merge, ranked by the
    merged piece's score, then by the lengths of its halves."""
    if vocab.scores is None:
        raise ValueError("GGUF SentencePiece (llama) vocabulary has neither merges nor scores")
    mergeable = {token: token_id for token, token_id in token_ids.items()
                 if vocab.token_types[token_id] == TokenType.NORMAL}
    ranked: list[tuple[str, str, float]] = []
    for piece, piece_id in mergeable.items():
        local = [(piece[:i], piece[i:]) for i in range(1, len(piece))
                 if piece[:i] in mergeable and piece[i:] in mergeable]
        local.sort(key=lambda pair: (mergeable[pair[0]], mergeable[pair[1]]))
        ranked.extend((left, right, vocab.scores[piece_id]) for left, right in local)
    ranked.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in ranked]


def _sentencepiece_tokenizer(vocab: GGUFVocab) -> Tokenizer:
    token_ids = _vocab_dict(vocab, respell=False)
    merges = (_parse_merges(vocab.merges) if vocab.merges is not None
              else _merges_from_scores(vocab, token_ids))
    tokenizer = Tokenizer(models.BPE(token_ids, merges, unk_token=vocab.token(vocab.unk_token_id),
                                     fuse_unk=True, byte_fallback=True))
    prepend = "first" if vocab.add_space_prefix else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPM_SPACE,
                                                       prepend_scheme=prepend, split=False)
    steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _add_gguf_added_tokens(tokenizer: Tokenizer, vocab: GGUFVocab) -> None:
    special, plain = [], []
    for token, token_type in zip(vocab.tokens, vocab.token_types):
        if token_type in (TokenType.CONTROL, TokenType.UNKNOWN):
            special.append(AddedToken(token, special=True, normalized=False))
        elif token_type == TokenType.USER_DEFINED:
            plain.append(AddedToken(token, special=False, normalized=False))
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(plain)


def _post_processor(vocab: GGUFVocab) -> processors.PostProcessor | None:
    """BOS / EOS around an encoded text, as the file's add_bos_token / add_eos_token say."""
    bos = vocab.token(vocab.bos_token_id) if vocab.add_bos_token else None
    eos = vocab.token(vocab.eos_token_id) if vocab.add_eos_token else None
    if bos is None and eos is None:
        return None
    single = ([bos] if bos is not None else []) + ["$A"] + ([eos] if eos is not None else [])
    marks = {token: token_id for token, token_id in
             ((bos, vocab.bos_token_id), (eos, vocab.eos_token_id)) if token is not None}
    return processors.TemplateProcessing(single=single, special_tokens=list(marks.items()))


def build_gguf_tokenizer(vocab: GGUFVocab) -> Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to the one the GGUF vocabulary describes.

    Raises:
        ValueError: the tokenizer model or pre-tokenizer type is not supported, naming it and
            the supported ones.
    """
    if vocab.model == "gpt2":
        tokenizer = _byte_level_tokenizer(vocab)
    elif vocab.model == "llama":
        tokenizer = _sentencepiece_tokenizer(vocab)
    else:
        raise ValueError(f"GGUF tokenizer model {vocab.model!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_MODELS)}")
    _add_gguf_added_tokens(tokenizer, vocab)
    tokenizer.post_processor = _post_processor(vocab)
    return tokenizer
