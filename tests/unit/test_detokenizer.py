"""IncrementalDetokenizer with the embedded SmolLM2 tokenizer (byte-level BPE) and a tiny
SentencePiece-style tokenizer whose decoder strips the leading space."""
from __future__ import annotations

import random
import subprocess
import sys

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from taskloom.models.embedded import embedded_model_path
from taskloom.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerConfig

MULTIBYTE_TEXT = "Hello 🌍! 世界 naïve café 🎉👍🏽 日本語のテキスト 👩‍👩‍👧 Ωμέγα"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(embedded_model_path())


@pytest.fixture(scope="module")
def prompt_ids(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode_chat([{"role": "user", "content": "Say something."}])


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.push([token_id]) for token_id in ids]


def test_tokenizer_package_does_not_import_torch() -> None:
    code = "import sys, taskloom.tokenizer; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_multibyte_characters_split_across_tokens(tokenizer: Tokenizer,
                                                  prompt_ids: list[int]) -> None:
    ids = tokenizer.encode(MULTIBYTE_TEXT, add_special_tokens=False)
    partial = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    assert len(partial) >= 5, "the text must split characters across byte tokens"
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = stream(detok, ids)
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) + detok.flush() == MULTIBYTE_TEXT == tokenizer.decode(ids)
    assert detok.text == MULTIBYTE_TEXT


def test_pushing_many_tokens_at_once(tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
    ids = tokenizer.encode(MULTIBYTE_TEXT, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    first = detok.push(ids[:7])
    rest = detok.push(ids[7:])
    assert "\ufffd" not in first + rest
    assert first + rest + detok.flush() == MULTIBYTE_TEXT


def test_byte_level_spacing_token_by_token(tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
    ids = tokenizer.encode("Hello world, it's  a test.\nNext line", add_special_tokens=False)
    deltas = stream(IncrementalDetokenizer(tokenizer, prompt_ids), ids)
    assert deltas == [tokenizer.decode([i]) for i in ids]
    assert deltas[:3] == ["Hello", " world", ","]


def test_unfinished_character_is_held_until_flush(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok 🌍", add_special_tokens=False)
    assert "\ufffd" in tokenizer.decode(ids[:-1])
    detok = IncrementalDetokenizer(tokenizer, [])
    held = "".join(stream(detok, ids[:-1]))
    assert "\ufffd" not in held
    assert held + detok.flush() == tokenizer.decode(ids[:-1])
    assert detok.flush() == ""


def test_special_tokens_skipped_or_kept(tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
    ids = tokenizer.encode("Done.", add_special_tokens=False) + [tokenizer.eos_token_id]
    skipped = IncrementalDetokenizer(tokenizer, prompt_ids)
    assert "".join(stream(skipped, ids)) + skipped.flush() == "Done."
    kept = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=False)
    assert "".join(stream(kept, ids)) + kept.flush() == "Done.<|im_end|>"


@pytest.fixture(scope="module")
def spm_like() -> Tokenizer:
    """Word-level pieces with SentencePiece's "▁" word marker; the decoder strips one leading
    space, so a piece decoded alone loses its space."""
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "▁how": 3, "▁are": 4, "▁you": 5}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁",
                                                            prepend_scheme="always")])
    return Tokenizer(backend, TokenizerConfig(unk_token="<unk>"))


def test_leading_space_kept_with_context(spm_like: Tokenizer) -> None:
    ids = spm_like.encode("Hello world how are you")
    assert spm_like.decode(ids[1:2]) == "world", "a piece alone loses its space"
    deltas = stream(IncrementalDetokenizer(spm_like, ids[:1]), ids[1:])
    assert deltas == [" world", " how", " are", " you"]


def test_first_output_token_without_prompt(spm_like: Tokenizer) -> None:
    ids = spm_like.encode("Hello world you")
    detok = IncrementalDetokenizer(spm_like, [])
    assert stream(detok, ids) == ["Hello", " world", " you"]
    assert detok.text == "Hello world you"


class _PythonOnly:
    """The tokenizer's decode alone: the detokenizer's Python steps, not DecodeStream."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.decode = tokenizer.decode


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_decode_stream_emits_what_the_python_steps_emit(tokenizer: Tokenizer, spm_like: Tokenizer,
                                                        skip: bool, seed: int) -> None:
    """Random ids (characters split across byte tokens, special tokens, pieces that decode
    differently alone), after prompts of 0 to 9 tokens, one or several at a time: the same
    deltas, the same flush and the same text by either path."""
    rng = random.Random(seed)
    fast_cases = 0
    for tok in (tokenizer, spm_like):
        vocab = tok.vocab_size
        for _ in range(12):
            prompt = [rng.randrange(vocab) for _ in range(rng.randrange(10))]
            fast = IncrementalDetokenizer(tok, prompt, skip)
            slow = IncrementalDetokenizer(_PythonOnly(tok), prompt, skip)
            assert slow._stream is None
            fast_cases += fast._stream is not None
            for _ in range(40):
                ids = [rng.randrange(vocab) for _ in range(rng.choice((1, 1, 1, 3)))]
                assert fast.push(ids) == slow.push(ids)
            assert fast.flush() == slow.flush()
            assert fast.text == slow.text
    assert fast_cases >= 16     # of 24: a prompt ending mid-character takes the Python steps

