"""Tokenizer fidelity against HF transformers: the embedded SmolLM2 GGUF, a HF directory
round trip, and small GGUF files written here (byte-level BPE with each supported
pre-tokenizer, and SentencePiece BPE), so nothing needs the internet."""
from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import unicodedata
from pathlib import Path

import gguf
import pytest
import sentencepiece
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from taskloom.models.embedded import embedded_model_path
from taskloom.tokenizer import TemplateError, Tokenizer, load_tokenizer
from tests.models.hf_smollm import load_hf_smollm_tokenizer

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they're here, aren't they? We'll see; I'd've known.",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "Pi is 3.14159265, e is 2.71828 and 1234567890 is big; 2024-01-31 10:30:59",
    "lots    of     spaces   and\ttabs\t\there",
    "\n\nnewlines\n\n\n  indented\r\nwindows line\r\n",
    "   leading and trailing spaces   ",
    "Naïve café, façade, Ångström, Straße, résumé",
    "Привет, мир! Γειά σου κόσμε! مرحبا بالعالم שלום",
    "日本語のテキストと中文文本，还有한국어 텍스트",
    "Emoji: 🌍🎉👍🏽 👩‍👩‍👧 🇫🇷 ❤️",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<repo_name>x<file_sep>",
    "",
    " ",
    "a",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one, with émoji 🌈?"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Hi! How can I help?"}, {"role": "user", "content": "Bye"}],
]


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return embedded_model_path()


@pytest.fixture(scope="module")
def ours(gguf_path: str) -> Tokenizer:
    return load_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def hf() -> PreTrainedTokenizerBase:
    return load_hf_smollm_tokenizer()


def hf_chat(hf_tok: PreTrainedTokenizerBase, messages: list[dict], generation: bool) -> str:
    return hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def assert_same_as_hf(ours: Tokenizer, hf_tok: PreTrainedTokenizerBase, texts: list[str]) -> None:
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf_tok.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == hf_tok.encode(
            text, add_special_tokens=False), text
        for skip in (True, False):
            assert ours.decode(ids, skip) == hf_tok.decode(ids, skip_special_tokens=skip), text


def test_embedded_ids_and_decode_match_hf(ours: Tokenizer, hf: PreTrainedTokenizerBase) -> None:
    assert_same_as_hf(ours, hf, TEXTS)
    ids = ours.encode(TEXTS[3])
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)


def test_embedded_special_tokens(ours: Tokenizer, hf: PreTrainedTokenizerBase) -> None:
    assert (ours.bos_token, ours.eos_token) == (hf.bos_token, hf.eos_token) == (
        "<|im_start|>", "<|im_end|>")
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    assert ours.eos_token_ids == (2,)
    assert ours.vocab_size == len(hf) == 49152
    assert set(hf.all_special_ids) <= ours.all_special_ids == set(range(17))
    assert ours.encode("<|im_start|>") == [1], "special tokens are matched whole"


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("generation", [True, False])
def test_embedded_chat_template_matches_hf(ours: Tokenizer, hf: PreTrainedTokenizerBase,
                                           messages: list[dict], generation: bool) -> None:
    assert ours.apply_chat_template(messages, generation) == hf_chat(hf, messages, generation)


PREFILLS = ["Sure, here is", "The answer:  ", "  A list:\n", "Two parts", ""]


@pytest.mark.parametrize("prefill", PREFILLS)
def test_continue_final_message_matches_hf(ours: Tokenizer, hf: PreTrainedTokenizerBase,
                                           prefill: str) -> None:
    """A reply's prefill: the prompt ends where the assistant's content ends (its trailing
    spaces as the template keeps them), without the end of its turn, as transformers' own
    `continue_final_message`; content in text parts too (joined by a newline)."""
    messages = CONVERSATIONS[2] + [{"role": "assistant", "content": prefill}]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                      continue_final_message=True)
    assert ours.apply_chat_template(messages, False, continue_final_message=True) == expected
    assert not expected.endswith("<|im_end|>\n")
    ids = hf.apply_chat_template(messages, add_generation_prompt=False,
                                 continue_final_message=True, return_dict=True)["input_ids"]
    assert ours.encode_chat(messages, False, continue_final_message=True) == ids
    parts = messages[:-1] + [{"role": "assistant", "content": [      # joined as for HF's
        {"type": "text", "text": "Two"}, {"type": "text", "text": prefill}]}]     # templates
    joined = messages[:-1] + [{"role": "assistant", "content": f"Two\n{prefill}"}]
    assert ours.apply_chat_template(parts, False, continue_final_message=True) == \
        hf.apply_chat_template(joined, tokenize=False, continue_final_message=True)


def test_continue_final_message_refusals(ours: Tokenizer) -> None:
    messages = CONVERSATIONS[0] + [{"role": "assistant", "content": "Sure"}]
    with pytest.raises(ValueError, match="continue_final_message and add_generation_prompt "
                                         "cannot both be set"):
        ours.apply_chat_template(messages, True, continue_final_message=True)
    drops = Tokenizer(ours.backend, dataclasses.replace(
        ours._config, chat_template="{% for m in messages %}{{ m.role }}\n{% endfor %}"))
    with pytest.raises(ValueError, match="the chat template drops the final message's "
                                         "content"):
        drops.apply_chat_template(messages, False, continue_final_message=True)


def test_encode_chat_matches_hf(ours: Tokenizer, hf: PreTrainedTokenizerBase) -> None:
    expected = hf.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True,
                                      return_dict=True)["input_ids"]
    assert ours.encode_chat(CONVERSATIONS[1]) == expected


@pytest.fixture(scope="module")
def hf_dir(hf: PreTrainedTokenizerBase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf_tokenizer")
    hf.save_pretrained(path)
    return path


def test_hf_dir_round_trip(hf_dir: Path, hf: PreTrainedTokenizerBase) -> None:
    tok = Tokenizer.from_hf_dir(str(hf_dir))
    assert_same_as_hf(tok, hf, TEXTS)
    assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token_ids) == (1, 2, (2,))
    for messages in CONVERSATIONS:
        for generation in (True, False):
            expected = hf_chat(hf, messages, generation)
            assert tok.apply_chat_template(messages, generation) == expected
    assert load_tokenizer(str(hf_dir)).encode("x 1") == tok.encode("x 1")


def write_hf_dir(path: Path, backend: BackendTokenizer, config: dict,
                 generation: dict | None = None, jinja: str | None = None) -> str:
    path.mkdir()
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    if jinja is not None:
        (path / "chat_template.jinja").write_text(jinja)
    return str(path)


def test_hf_dir_config_variants(ours: Tokenizer, tmp_path: Path) -> None:
    config = {"bos_token": {"content": "<|im_start|>", "special": True},
              "eos_token": {"content": "<|endoftext|>", "lstrip": False},
              "chat_template": [{"name": "tool_use", "template": "T"},
                                {"name": "default", "template": "{{ '<|eot_id|>' }}D"}]}
    tok = Tokenizer.from_hf_dir(write_hf_dir(tmp_path / "a", ours.backend, config,
                                             generation={"eos_token_id": [0, 2, 5]}))
    assert (tok.bos_token, tok.eos_token, tok.eos_token_id) == ("<|im_start|>", "<|endoftext|>", 0)
    assert tok.chat_template == "{{ '<|eot_id|>' }}D"
    assert tok.eos_token_ids == (0, 2, 5)
    jinja = "{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}"
    tok = Tokenizer.from_hf_dir(write_hf_dir(tmp_path / "b", ours.backend,
                                             {"eos_token": "<|endoftext|>", "chat_template": "old"},
                                             jinja=jinja))
    assert tok.chat_template == jinja
    assert tok.eos_token_ids == (0, 2), "<|im_end|> ends a turn in the template"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x<|im_end|>"
    legacy = tmp_path / "c"
    write_hf_dir(legacy, ours.backend, {"eos_token": "<|im_end|>"})
    (legacy / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|endoftext|>"}))
    tok = Tokenizer.from_hf_dir(str(legacy))
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>"), "config wins"


def test_hf_dir_errors(ours: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="eos_token '<nope>' is not in the tokenizer's vocabulary"):
        Tokenizer.from_hf_dir(write_hf_dir(tmp_path / "a", ours.backend, {"eos_token": "<nope>"}))
    with pytest.raises(ValueError, match="eos_token_id must be an int or a list of ints"):
        Tokenizer.from_hf_dir(write_hf_dir(tmp_path / "b", ours.backend, {},
                                           generation={"eos_token_id": "2"}))
    no_template = Tokenizer.from_hf_dir(write_hf_dir(tmp_path / "c", ours.backend, {}))
    with pytest.raises(ValueError, match="has no chat template"):
        no_template.apply_chat_template([{"role": "user", "content": "x"}])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*has no tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "empty" / "model.Q4_0.gguf").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pass one of them: model.Q4_0.gguf"):
        load_tokenizer(str(tmp_path / "empty"))
    broken = Tokenizer.from_hf_dir(write_hf_dir(tmp_path / "d", ours.backend,
                                                {"chat_template": "{% if %}"}))
    assert broken.encode("ok") == ours.encode("ok"), "a broken template only fails chats"
    with pytest.raises(TemplateError, match="does not compile"):
        broken.apply_chat_template([{"role": "user", "content": "x"}])


def test_load_tokenizer_path_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.gguf' does not exist"):
        load_tokenizer(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="weights.bin' is a file but not a .gguf file"):
        load_tokenizer(str(tmp_path / "weights.bin"))


# ---- small GGUF files -------------------------------------------------------------------

CORPUS = [
    "The quick brown fox jumps over the lazy dog 12345 times, 678 more and 2024 again.",
    "def main():\n    return 42 + 1000\n\n", "I'm sure they're here, AREN'T THEY? We'll see.",
    "Les élèves étudient à l'école. Привет мир 你好世界 🌍",
    "    indented   spaces\t\ttabs\n\n\nnewlines 9876543210 3.14159 !!! ... ???",
] * 10
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|eot_id|>"]
SYNTHETIC_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                      "{{ m['content'] }}<|eot_id|>{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SYNTHETIC_TEXTS = [t for t in TEXTS if "<repo_name>" not in t] + [
    "12345 678 9 2024", "x<|eot_id|>y<think>z</think>", "I'M HERE", "a\n\n\n b\r\n\r\n c  \n"]


def write_gguf(path: Path, tokens: list[str], types: list[int], model: str,
               pre: str | None = None, merges: list[str] | None = None,
               scores: list[float] | None = None, **ids: int) -> str:
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges is not None:
        writer.add_token_merges(merges)
    if scores is not None:
        writer.add_token_scores(scores)
    for name, value in ids.items():
        getattr(writer, f"add_{name}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture(scope="module")
def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """A small byte-level BPE trained on CORPUS with GPT-2 splitting (so it has multi-digit
    tokens), plus control tokens and a user-defined `<think>`."""
    trained = BackendTokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=700, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(trained.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [" ".join(pair) for pair in model["merges"]]
    types = [gguf.TokenType.NORMAL] * len(tokens) + [gguf.TokenType.CONTROL] * len(SPECIALS)
    return tokens + SPECIALS + ["<think>"], types + [gguf.TokenType.USER_DEFINED], merges


def byte_level_gguf(directory: Path, vocab: tuple[list[str], list[int], list[str]],
                    pre: str) -> str:
    tokens, types, merges = vocab
    return write_gguf(directory / f"{pre}.gguf", tokens, types, "gpt2", pre=pre, merges=merges,
                      bos_token_id=tokens.index("<|begin_of_text|>"),
                      eos_token_id=tokens.index("<|end_of_text|>"),
                      eot_token_id=tokens.index("<|eot_id|>"), add_bos_token=True,
                      chat_template=SYNTHETIC_TEMPLATE)


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_byte_level_gguf_matches_hf(pre: str, byte_level_vocab: tuple, tmp_path: Path) -> None:
    path = byte_level_gguf(tmp_path, byte_level_vocab, pre)
    tok = Tokenizer.from_gguf(path)
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path))
    assert_same_as_hf(tok, hf_tok, SYNTHETIC_TEXTS)
    assert tok.encode("hi")[0] == tok.bos_token_id
    assert tok.eos_token_ids == (tok.eos_token_id, byte_level_vocab[0].index("<|eot_id|>"))
    conversation = CONVERSATIONS[2]
    assert tok.apply_chat_template(conversation) == hf_chat(hf_tok, conversation, True)


def test_pre_tokenizer_types_split_differently(byte_level_vocab: tuple, tmp_path: Path) -> None:
    text = "x 12345 it's"
    toks = {pre: Tokenizer.from_gguf(byte_level_gguf(tmp_path, byte_level_vocab, pre))
            for pre in ("gpt2", "smollm", "llama-bpe", "qwen2")}
    pieces = {pre: tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))
              for pre, tok in toks.items()}
    assert "Ġ12345" in pieces["gpt2"]
    assert pieces["smollm"][:7] == ["x", "Ġ", "1", "2", "3", "4", "5"]
    llama_digits = [piece for piece in pieces["llama-bpe"] if piece.isdigit()]
    assert "".join(llama_digits) == "12345" and pieces["llama-bpe"][:2] == ["x", "Ġ"]
    assert 3 in itertools.accumulate(map(len, llama_digits)), "digits are split in threes"
    assert pieces["qwen2"][:7] == ["x", "Ġ", "1", "2", "3", "4", "5"]
    composed, decomposed = "café", unicodedata.normalize("NFD", "café")
    assert toks["qwen2"].encode(decomposed) == toks["qwen2"].encode(composed), "qwen2 is NFC"
    assert toks["llama-bpe"].encode(decomposed) != toks["llama-bpe"].encode(composed)


def test_unsupported_gguf_tokenizers_are_named(byte_level_vocab: tuple, tmp_path: Path) -> None:
    tokens, types, merges = byte_level_vocab
    path = write_gguf(tmp_path / "a.gguf", tokens, types, "gpt2", pre="made-up", merges=merges)
    with pytest.raises(ValueError, match="pre-tokenizer type 'made-up' is not supported; "
                                         "supported: .*llama-bpe.*qwen2.*smollm"):
        Tokenizer.from_gguf(path)
    path = write_gguf(tmp_path / "b.gguf", tokens, types, "bert")
    with pytest.raises(ValueError,
                       match="tokenizer model 'bert' is not supported; supported: gpt2, llama"):
        Tokenizer.from_gguf(path)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[sentencepiece.SentencePieceProcessor, str]:
    """A SentencePiece BPE model with byte fallback (Llama 2 style), and a GGUF of its
    vocabulary."""
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=proto, vocab_size=500, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, user_defined_symbols=["<think>"], character_coverage=1.0,
        minloglevel=2)
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto.getvalue())
    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    kinds = [(sp.is_unknown, gguf.TokenType.UNKNOWN), (sp.is_control, gguf.TokenType.CONTROL),
             (sp.is_byte, gguf.TokenType.BYTE)]
    types = [next((kind for test, kind in kinds if test(i)), gguf.TokenType.USER_DEFINED
                  if tokens[i] == "<think>" else gguf.TokenType.NORMAL) for i in range(len(tokens))]
    directory = tmp_path_factory.mktemp("spm")
    path = write_gguf(directory / "spm.gguf", tokens, types, "llama",
                      scores=[sp.get_score(i) for i in range(len(tokens))],
                      bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(), unk_token_id=sp.unk_id())
    return sp, path


def test_sentencepiece_gguf_matches_hf(spm_model: tuple) -> None:
    _, path = spm_model
    tok = Tokenizer.from_gguf(path)
    hf_tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file="spm.gguf")
    assert_same_as_hf(tok, hf_tok, SYNTHETIC_TEXTS)
    assert tok.encode("Hi")[0] == tok.bos_token_id == 1, "SentencePiece GGUFs add BOS by default"


def test_sentencepiece_gguf_matches_sentencepiece(spm_model: tuple) -> None:
    sp, path = spm_model
    tok = Tokenizer.from_gguf(path)
    # Text that does not start with whitespace: there HF's (and our) Metaspace does not add a
    # second "▁" before a leading space as SentencePiece's dummy prefix does.
    texts = [t for t in SYNTHETIC_TEXTS if t and not t[0].isspace() and "<" not in t]
    assert len(texts) > 10
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids), text
    assert "<0xF0>" in tok.convert_ids_to_tokens(tok.encode("🎉")), "byte fallback"
