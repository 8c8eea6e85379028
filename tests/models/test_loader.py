"""Loader tests: GGUF dequantization of every supported type, GGUF vs safetensors loads of the
same weights (q/k permutation, biases, q/k norms, rope_freqs, tied embeddings), random weights
for every named shape, dtypes, and the clear error of every bad input."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file, save_file
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from taskloom.config import ModelConfig
from taskloom.models.arch import ArchConfig
from taskloom.models import gguf_weights
from taskloom.models.gguf_weights import SUPPORTED_QUANT_TYPES, dequantize_tensor
from taskloom.models.llama import LlamaForCausalLM
from taskloom.models.loader import load_model, resolve_model_path
from taskloom.models.shapes import SHAPES, shape_config
from tests.models.gguf_files import write_gguf_from_hf
from tests.models.single_seq import forward_batch
from tests.models.tiny_models import TINY_CASES, build_tiny_hf, random_prompts

# Parameter counts published for the real models.
PUBLISHED_PARAMS = {
    "llama-3.1-8b": 8_030_261_248, "qwen2.5-7b": 7_615_616_512, "qwen3-8b": 8_190_735_360,
    "mistral-7b": 7_248_023_552, "smollm2-135m": 134_515_008,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def write_gguf_tensors(path: Path, tensors: dict[str, tuple[np.ndarray, Q]],
                       arch: str = "llama") -> None:
    """A GGUF file holding raw (already quantized) tensors and nothing else but the arch."""
    w = gguf.GGUFWriter(str(path), arch)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_back(path: Path, name: str) -> torch.Tensor:
    reader = gguf.GGUFReader(str(path))
    return dequantize_tensor(next(t for t in reader.tensors if t.name == name))


# ---------------------------------------------------------------- dequantization

def _block_bound(x: np.ndarray, qtype: Q) -> np.ndarray:
    """Largest error a correct quantize/dequantize round trip can make, per element."""
    blocks = x.reshape(x.shape[0], -1, 32)                   # [rows, n_blocks, 32]
    absmax = np.abs(blocks).max(-1, keepdims=True)
    spread = blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)
    bound = {Q.Q8_0: 0.6 * absmax / 127,                   # half a step, fp16 scale
             Q.Q4_0: 1.05 * absmax / 8,                     # one step (the clipped end)
             Q.Q4_1: 0.6 * spread / 15 + 1e-3 * absmax}[qtype]
    return np.broadcast_to(bound, blocks.shape).reshape(x.shape)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_dequantize_round_trip(tmp_path: Path, qtype: Q) -> None:
    rng = np.random.default_rng(int(qtype))
    x = (rng.standard_normal((6, 128)) * rng.uniform(0.01, 3, (6, 1))).astype(np.float32)
    write_gguf_tensors(tmp_path / "t.gguf", {"w": (gguf.quants.quantize(x, qtype), qtype)})
    got = read_back(tmp_path / "t.gguf", "w").numpy()
    assert got.shape == x.shape and got.dtype == np.float32
    err = np.abs(got - x)
    if qtype == Q.F32:
        assert np.array_equal(got, x)
    elif qtype in (Q.F16, Q.BF16):
        rel = 2.0 ** -11 if qtype == Q.F16 else 2.0 ** -8
        assert (err <= np.abs(x) * rel + 1e-7).all()
    else:
        assert (err <= _block_bound(x, qtype)).all()
        assert err.max() > 0                                 # it really was quantized


def _fp16(b: bytes) -> float:
    return float(np.frombuffer(b, dtype=np.float16)[0])


def _scale_min_k4(j: int, q: bytes) -> tuple[int, int]:
    # ggml-quants.c get_scale_min_k4
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def ref_q4_k(b: bytes) -> list[float]:
    """ggml-quants.c dequantize_row_q4_K, one 144-byte block, scalar."""
    d, dmin, scales, qs = _fp16(b[0:2]), _fp16(b[2:4]), b[4:16], b[16:144]
    y: list[float] = []
    for j in range(4):
        (sc1, m1), (sc2, m2) = _scale_min_k4(2 * j, scales), _scale_min_k4(2 * j + 1, scales)
        chunk = qs[32 * j:32 * j + 32]
        y += [d * sc1 * (q & 0xF) - dmin * m1 for q in chunk]
        y += [d * sc2 * (q >> 4) - dmin * m2 for q in chunk]
    return y


def ref_q5_k(b: bytes) -> list[float]:
    """ggml-quants.c dequantize_row_q5_K, one 176-byte block, scalar."""
    d, dmin, scales, qh, ql = _fp16(b[0:2]), _fp16(b[2:4]), b[4:16], b[16:48], b[48:176]
    y: list[float] = []
    u1, u2 = 1, 2
    for j in range(4):
        (sc1, m1), (sc2, m2) = _scale_min_k4(2 * j, scales), _scale_min_k4(2 * j + 1, scales)
        chunk = ql[32 * j:32 * j + 32]
        y += [d * sc1 * ((chunk[i] & 0xF) + (16 if qh[i] & u1 else 0)) - dmin * m1
              for i in range(32)]
        y += [d * sc2 * ((chunk[i] >> 4) + (16 if qh[i] & u2 else 0)) - dmin * m2
              for i in range(32)]
        u1, u2 = u1 << 2, u2 << 2
    return y


def ref_q6_k(b: bytes) -> list[float]:
    """ggml-quants.c dequantize_row_q6_K, one 210-byte block, scalar."""
    ql, qh = b[0:128], b[128:192]
    sc, d = np.frombuffer(b[192:208], dtype=np.int8).tolist(), _fp16(b[208:210])
    y = [0.0] * 256
    for n in range(2):
        lo, hi, s = ql[64 * n:64 * n + 64], qh[32 * n:32 * n + 32], sc[8 * n:8 * n + 8]
        for i in range(32):
            k = i // 16
            q1 = ((lo[i] & 0xF) | ((hi[i] & 3) << 4)) - 32
            q2 = ((lo[i + 32] & 0xF) | (((hi[i] >> 2) & 3) << 4)) - 32
            q3 = ((lo[i] >> 4) | (((hi[i] >> 4) & 3) << 4)) - 32
            q4 = ((lo[i + 32] >> 4) | (((hi[i] >> 6) & 3) << 4)) - 32
            for j, q in enumerate((q1, q2, q3, q4)):
                y[128 * n + i + 32 * j] = d * s[k + 2 * j] * q
    return y


K_QUANTS = {Q.Q4_K: (ref_q4_k, (0, 2)), Q.Q5_K: (ref_q5_k, (0, 2)), Q.Q6_K: (ref_q6_k, (208,))}


@pytest.mark.parametrize("qtype", list(K_QUANTS))
def test_dequantize_k_quants_against_ggml_reference(tmp_path: Path, qtype: Q) -> None:
    """gguf cannot quantize K-quants: random blocks (with sane fp16 scales) are written raw and
    compared with a scalar port of llama.cpp's reference dequantization."""
    ref, scale_offsets = K_QUANTS[qtype]
    type_size = gguf.GGML_QUANT_SIZES[qtype][1]
    rng = np.random.default_rng(int(qtype))
    rows, blocks_per_row = 3, 2
    raw = rng.integers(0, 256, (rows * blocks_per_row, type_size), dtype=np.uint8)
    for off in scale_offsets:                                # d (and dmin): small positive fp16
        scales = rng.uniform(1e-3, 1e-2, (len(raw), 1)).astype(np.float16)
        raw[:, off:off + 2] = scales.view(np.uint8)
    write_gguf_tensors(tmp_path / "k.gguf",
                       {"w": (raw.reshape(rows, blocks_per_row * type_size), qtype)})
    got = read_back(tmp_path / "k.gguf", "w")
    expected = torch.tensor([ref(bytes(block)) for block in raw]).reshape(rows, -1)
    assert got.shape == (rows, blocks_per_row * 256) and expected.abs().max() > 0
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("qtype", SUPPORTED_QUANT_TYPES, ids=lambda q: q.name)
def test_dequantized_in_chunks_of_rows_bit_for_bit_as_gguf_does(
        tmp_path: Path, qtype: Q, monkeypatch: pytest.MonkeyPatch) -> None:
    """taskloom dequantizes many rows at a time where gguf takes 16: over chunks that split
    the rows unevenly (3 rows, then the 2 left), every value is gguf's own, NaNs included
    (random blocks hold any bit pattern in their fp16 scales)."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, blocks_per_row = 5, 2
    raw = np.random.default_rng(int(qtype)).integers(
        0, 256, (rows, blocks_per_row * type_size), dtype=np.uint8)
    if qtype in (Q.F32, Q.F16, Q.BF16):
        raw = raw.view({Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint16}[qtype])
    write_gguf_tensors(tmp_path / "t.gguf", {"w": (raw, qtype)})
    monkeypatch.setattr(gguf_weights, "DEQUANT_CHUNK_BYTES", 3 * blocks_per_row * type_size)
    got = read_back(tmp_path / "t.gguf", "w").numpy()
    want = gguf.quants.dequantize(np.asarray(gguf.GGUFReader(str(tmp_path / "t.gguf"))
                                             .tensors[0].data), qtype)
    assert got.shape == (rows, blocks_per_row * block)
    assert np.array_equal(got.view(np.uint32), np.asarray(want, np.float32).reshape(
        got.shape).view(np.uint32))


# ---------------------------------------------------------------- GGUF vs safetensors

def save_tiny(case: str, directory: Path, seed: int = 0) -> transformers.PreTrainedModel:
    """The tiny HF model of `case` saved as safetensors and as an F32 GGUF beside it."""
    hf = build_tiny_hf(case, seed)
    hf.save_pretrained(directory / "hf", safe_serialization=True)
    scaling = None
    if hf.config.rope_parameters.get("rope_type") == "llama3":
        scaling = ArchConfig.from_hf_dict(hf.config.to_dict()).rope_scaling
    write_gguf_from_hf(str(directory / "model.gguf"), hf.config, hf.state_dict(),
                       rope_scaling=scaling)
    return hf


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_gguf_load_matches_safetensors_load(tmp_path: Path, case: str) -> None:
    hf = save_tiny(case, tmp_path)
    st = load_model(ModelConfig(model=str(tmp_path / "hf")))
    gg = load_model(ModelConfig(model=str(tmp_path / "model.gguf")))
    assert gg.path == str(tmp_path / "model.gguf")
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "rope_theta",
                  "tie_word_embeddings", "attention_bias", "qk_norm", "rms_norm_eps"):
        assert getattr(gg.arch, field) == pytest.approx(getattr(st.arch, field)), field
    assert (gg.arch.rope_freq_factors is not None) == (st.arch.rope_scaling is not None)
    st_params, gg_params = dict(st.model.named_parameters()), dict(gg.model.named_parameters())
    assert st_params.keys() == gg_params.keys()
    for name, param in st_params.items():
        assert torch.equal(param, gg_params[name]), name   # F32 and exact un-permutation
    prompts = random_prompts(hf.config.vocab_size, seed=5)
    for a, b in zip(forward_batch(st.model, prompts), forward_batch(gg.model, prompts)):
        # rope_freqs divisors reproduce Llama-3 scaling to float32 rounding
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


def test_gguf_writer_permutation_is_what_hf_undoes(tmp_path: Path) -> None:
    """The test writer's q/k permutation is llama.cpp's: HF's GGUF reader recovers HF weights."""
    hf = save_tiny("llama-llama3-gqa", tmp_path)
    tensors = load_gguf_checkpoint(str(tmp_path / "model.gguf"), return_tensors=True,
                                   model_to_load=hf)["tensors"]
    for proj in ("q_proj", "k_proj"):
        name = f"model.layers.1.self_attn.{proj}.weight"
        assert torch.equal(torch.as_tensor(tensors[name]), hf.state_dict()[name])


def test_quantized_gguf_loads_dequantized_weights(tmp_path: Path) -> None:
    hf = build_tiny_hf("qwen2-bias")
    write_gguf_from_hf(str(tmp_path / "q8.gguf"), hf.config, hf.state_dict(), qtype=Q.Q8_0)
    ours = dict(load_model(ModelConfig(model=str(tmp_path / "q8.gguf"))).model.named_parameters())
    reader = gguf.GGUFReader(str(tmp_path / "q8.gguf"))
    assert reader.tensors[0].tensor_type == Q.Q8_0
    expected = gguf.quants.dequantize(
        gguf.quants.quantize(hf.model.layers[0].mlp.down_proj.weight.detach().numpy(), Q.Q8_0),
        Q.Q8_0)
    assert torch.equal(ours["model.layers.0.mlp.down_proj.weight"], torch.from_numpy(expected))
    assert not torch.equal(ours["model.layers.0.mlp.down_proj.weight"],
                           hf.model.layers[0].mlp.down_proj.weight)


# ---------------------------------------------------------------- random weights and shapes

@pytest.mark.parametrize("shape", list(SHAPES))
def test_named_shapes_build_on_meta(shape: str) -> None:
    arch = ArchConfig.from_hf_dict(shape_config(shape))
    with torch.device("meta"):
        model = LlamaForCausalLM(arch)
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) == PUBLISHED_PARAMS[shape]
    assert all(p.is_meta for p in params.values())
    qkv = params["model.layers.0.self_attn.qkv_proj.weight"]
    assert qkv.shape == (arch.q_size + 2 * arch.kv_size, arch.hidden_size)
    assert ("lm_head.weight" in params) == (not arch.tie_word_embeddings)
    assert ("model.layers.0.self_attn.qkv_proj.bias" in params) == (shape == "qwen2.5-7b")
    assert ("model.layers.0.self_attn.q_norm.weight" in params) == (shape == "qwen3-8b")
    assert (arch.rope_scaling is not None) == (shape == "llama-3.1-8b")


def test_random_smollm2_materialises_and_runs() -> None:
    loaded = load_model(ModelConfig(model="smollm2-135m", random_weights=True, seed=1))
    assert loaded.path is None and loaded.arch.num_hidden_layers == 30
    params = dict(loaded.model.named_parameters())
    assert sum(p.numel() for p in params.values()) == PUBLISHED_PARAMS["smollm2-135m"]
    assert torch.equal(params["model.norm.weight"], torch.ones(576))
    std = params["model.embed_tokens.weight"].std().item()
    assert 0.019 < std < 0.021
    logits = forward_batch(loaded.model, [[1, 2, 3, 4, 5]])[0]
    assert logits.shape == (5, 49152) and torch.isfinite(logits).all()


def test_random_weights_from_config_json_are_seeded(tmp_path: Path) -> None:
    build_tiny_hf("qwen3-qk-norm-mqa").config.save_pretrained(tmp_path)
    cfg = ModelConfig(model=str(tmp_path / "config.json"), random_weights=True, seed=3)
    a, b = load_model(cfg), load_model(cfg)
    c = load_model(ModelConfig(model=str(tmp_path), random_weights=True, seed=4))
    assert a.path == str(tmp_path) and a.arch.qk_norm
    w = "model.layers.1.self_attn.qkv_proj.weight"
    pa, pb, pc = (dict(m.model.named_parameters())[w] for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


# ---------------------------------------------------------------- dtypes, tied embeddings

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_load(tmp_path: Path, dtype: str) -> None:
    save_tiny("qwen2-bias", tmp_path)
    full = load_model(ModelConfig(model=str(tmp_path / "hf")))
    half = load_model(ModelConfig(model=str(tmp_path / "hf"), dtype=dtype))
    assert all(p.dtype == getattr(torch, dtype) for p in half.model.parameters())
    prompts = random_prompts(256, seed=2)[:2]
    for a, b in zip(forward_batch(full.model, prompts), forward_batch(half.model, prompts)):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=0, atol=0.05 * a.abs().max().item())


def test_tied_and_untied_embeddings(tmp_path: Path) -> None:
    save_tiny("llama-tied-bias-mha", tmp_path / "tied")
    save_tiny("llama-llama3-gqa", tmp_path / "untied")
    tied = load_model(ModelConfig(model=str(tmp_path / "tied" / "hf"))).model
    untied = load_model(ModelConfig(model=str(tmp_path / "untied" / "hf"))).model
    assert tied.lm_head is None and "lm_head.weight" not in dict(tied.named_parameters())
    hidden = torch.randn(3, 64)
    embed = tied.model.embed_tokens.weight
    torch.testing.assert_close(tied.compute_logits(hidden), hidden @ embed.T)
    assert untied.lm_head is not None
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)
    torch.testing.assert_close(untied.compute_logits(hidden), hidden @ untied.lm_head.weight.T)
    # A tied checkpoint that still stores lm_head.weight loads (the copy is ignored).
    weights = dict(_state(tmp_path / "tied" / "hf"))
    weights["lm_head.weight"] = torch.zeros(256, 64)
    tied.load_weights(weights.items())
    assert torch.equal(tied.model.embed_tokens.weight, embed)


def _state(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    yield from load_file(directory / "model.safetensors").items()


# ---------------------------------------------------------------- errors

def test_missing_path() -> None:
    with pytest.raises(FileNotFoundError, match="'/no/such/model' does not exist"):
        resolve_model_path("/no/such/model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(ModelConfig(model="/no/such/model.gguf"))
    with pytest.raises(FileNotFoundError, match="named shapes need random weights"):
        load_model(ModelConfig(model="smollm2-135m"))


def test_default_path_is_the_embedded_gguf() -> None:
    path = resolve_model_path(None)
    assert os.path.isfile(path)
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_directory_without_config_or_weights(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"has no config.json; expected a Hugging Face model"):
        load_model(ModelConfig(model=str(tmp_path)))
    build_tiny_hf("qwen2-bias").config.save_pretrained(tmp_path)
    with pytest.raises(ValueError,
                       match="has no weights: expected model.safetensors or "
                             "model.safetensors.index.json"):
        load_model(ModelConfig(model=str(tmp_path)))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors listed in"):
        load_model(ModelConfig(model=str(tmp_path)))


def test_truncated_or_foreign_gguf(tmp_path: Path) -> None:
    save_tiny("qwen2-bias", tmp_path)
    data = (tmp_path / "model.gguf").read_bytes()
    for name, content in {"half.gguf": data[:len(data) // 2], "header.gguf": data[:100],
                          "text.gguf": b"definitely not a model\n"}.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name} is not a valid GGUF file"):
            load_model(ModelConfig(model=str(tmp_path / name)))


def test_corrupt_safetensors(tmp_path: Path) -> None:
    save_tiny("qwen2-bias", tmp_path)
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="model.safetensors is not a valid safetensors file"):
        load_model(ModelConfig(model=str(tmp_path / "hf")))


def test_unsupported_architectures(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 10}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unsupported architecture \['GPT2LMHeadModel'\]"):
        load_model(ModelConfig(model=str(tmp_path)))
    write_gguf_tensors(tmp_path / "gpt2.gguf", {"w": (np.zeros((2, 32), np.float32), Q.F32)},
                       arch="gpt2")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'; taskloom runs "
                                         "llama, qwen2, qwen3"):
        load_model(ModelConfig(model=str(tmp_path / "gpt2.gguf")))


def test_unsupported_quant_type_is_named(tmp_path: Path) -> None:
    x = np.ones((2, 64), np.float32)
    write_gguf_tensors(tmp_path / "q5.gguf", {"blk.0.attn_q.weight": (
        gguf.quants.quantize(x, Q.Q5_0), Q.Q5_0)})
    with pytest.raises(ValueError, match="'blk.0.attn_q.weight' has unsupported GGUF "
                                         "quantization type Q5_0; taskloom supports F32, F16, "
                                         "BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K"):
        load_model(ModelConfig(model=str(tmp_path / "q5.gguf")))


def test_gguf_without_required_metadata(tmp_path: Path) -> None:
    write_gguf_tensors(tmp_path / "bare.gguf", {"w": (np.zeros((2, 32), np.float32), Q.F32)})
    with pytest.raises(ValueError, match="GGUF metadata lacks 'llama.embedding_length'"):
        load_model(ModelConfig(model=str(tmp_path / "bare.gguf")))


def _tiny_weights(tmp_path: Path) -> tuple[LlamaForCausalLM, dict[str, torch.Tensor]]:
    save_tiny("llama-llama3-gqa", tmp_path)
    model = load_model(ModelConfig(model=str(tmp_path / "hf"))).model
    return model, dict(_state(tmp_path / "hf"))


def test_wrong_shape_unexpected_and_missing_weights(tmp_path: Path) -> None:
    model, weights = _tiny_weights(tmp_path)
    bad = {**weights, "model.layers.0.self_attn.k_proj.weight": torch.zeros(31, 64)}
    with pytest.raises(ValueError, match=r"weight 'model.layers.0.self_attn.k_proj.weight': "
                                         r"expected shape \(32, 64\), got \(31, 64\)"):
        model.load_weights(bad.items())
    for name in ("model.layers.0.mlp.extra.weight", "model.layers.2.input_layernorm.weight"):
        with pytest.raises(ValueError, match=f"unexpected weight '{name}'"):
            model.load_weights({**weights, name: torch.zeros(64)}.items())
    partial = {k: v for k, v in weights.items()
               if k not in ("lm_head.weight", "model.layers.1.self_attn.v_proj.weight")}
    with pytest.raises(ValueError, match=r"checkpoint lacks 2 weights: "
                                         r"model.layers.1.self_attn.qkv_proj.weight \(shards v\), "
                                         r"lm_head.weight"):
        model.load_weights(partial.items())
    model.load_weights(weights.items())                       # the full set still loads


def test_random_weights_needs_a_shape_and_max_model_len_fits() -> None:
    with pytest.raises(ValueError, match="named shape .*llama-3.1-8b.* got 'llama-9b'"):
        load_model(ModelConfig(model="llama-9b", random_weights=True))
    with pytest.raises(ValueError, match=r"max_model_len \(9000\) exceeds the model's "
                                         r"max_position_embeddings \(8192\)"):
        load_model(ModelConfig(model="smollm2-135m", random_weights=True, max_model_len=9000))


@pytest.mark.parametrize("overrides,window", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, 4096),  # HF default
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"],
      "sliding_window": None}, None),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"],
      "sliding_window": 1024}, 1024),
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "sliding_window": 512},
     None),                                           # use_sliding_window is off
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "sliding_window": 512,
      "use_sliding_window": True, "max_window_layers": 0}, 512),
    ({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "sliding_window": 512,
      "use_sliding_window": True, "layer_types": ["full_attention"] * 2}, None),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "sliding_window": 64},
     None),                                           # Llama has none
])
def test_sliding_window_is_read_as_hf_reads_it(overrides: dict, window: int | None) -> None:
    cfg = {**shape_config("smollm2-135m"), "num_hidden_layers": 2, **overrides}
    assert ArchConfig.from_hf_dict(cfg).sliding_window == window


def test_a_window_on_some_layers_only_is_refused() -> None:
    cfg = {**shape_config("smollm2-135m"), "model_type": "qwen2", "num_hidden_layers": 4,
           "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True,
           "sliding_window": 512, "max_window_layers": 2}
    with pytest.raises(ValueError, match="on 2 of 4 layers"):
        ArchConfig.from_hf_dict(cfg)
