"""taskloom's GGUF reader (gguf's GGUFReader, reading arrays whole from a plain view of its
mapping) reads every field and tensor exactly as gguf's own reader does: names, types,
values, tensor data; a file cut short in a string array is refused."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from taskloom.models.gguf_reader import _Reader, open_gguf


def write_file(path: Path) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" * (1 + i % 3) for i in range(3000)])
    w.add_token_merges([f"a{i} b{i}" for i in range(2000)])
    w.add_token_scores([float(i) / 7 for i in range(3000)])
    w.add_token_types([1 + i % 3 for i in range(3000)])
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_string("general.name", "tiny")
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((64, 32), dtype=np.float32))
    q8 = gguf.quants.quantize(rng.standard_normal((8, 64), dtype=np.float32),
                              gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_reads_what_ggufs_own_reader_reads(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_file(path)
    ours, theirs = _Reader(str(path)), gguf.GGUFReader(str(path))
    assert list(ours.fields) == list(theirs.fields)
    for name, field in theirs.fields.items():
        mine = ours.fields[name]
        assert (mine.types, mine.data, mine.offset) == (field.types, field.data, field.offset)
        assert len(mine.parts) == len(field.parts)
        for a, b in zip(mine.parts, field.parts):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.tensor_type, list(a.shape), a.data_offset) == \
            (b.tensor_type, list(b.shape), b.data_offset)
        assert np.array_equal(a.data, b.data)
    tokens = ours.fields["tokenizer.ggml.tokens"]
    assert bytes(tokens.parts[tokens.data[2999]]).decode() == "tok2999" * 3


def test_a_file_cut_inside_its_token_list_is_refused(tmp_path: Path) -> None:
    """Cut where the string array runs on: a clear error, not a short list (nor a loop over
    the rest of a bogus length)."""
    path = tmp_path / "tiny.gguf"
    write_file(path)
    cut_at = gguf.GGUFReader(str(path)).fields["tokenizer.ggml.tokens"].offset + 5000
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:cut_at])
    with pytest.raises(ValueError, match=r"cut.gguf is not a valid GGUF file: ValueError: "
                                         r"string \d+ of an array of 3000 at offset \d+ runs "
                                         r"past the end of the file"):
        open_gguf(str(cut))
