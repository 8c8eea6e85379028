"""Adapter merging (taskloom.lora.merge): linear, TIES and DARE against an independent
entry-by-entry computation written here, and against PEFT's `add_weighted_adapter` on a tiny
random Llama (every merged A and B tensor), plus the errors a bad merge raises."""
from __future__ import annotations

import math
import re

import pytest
import torch
import transformers

from taskloom.lora.adapter import TARGETS, LoRAAdapter, LoRAWeights
from taskloom.lora.merge import merge_adapters

RANK = 4
# module -> (in_features, out_features) of the small hand-made adapters
SHAPES = {"q_proj": (8, 8), "v_proj": (8, 4), "down_proj": (12, 8)}
MODEL_ORDER = {module: i for i, module in enumerate(TARGETS)}


pytestmark = pytest.mark.usefixtures("one_thread")


def random_adapter(name: str, scaling: float, seed: int, missing: tuple = (),
                   rank: int = RANK) -> LoRAAdapter:
    """Two layers, three projections; `missing` lists (layer, module) the adapter lacks."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(2):
        for module, (in_f, out_f) in SHAPES.items():
            if (layer, module) not in missing:
                weights[(layer, module)] = LoRAWeights(
                    torch.randn(rank, in_f, generator=gen), torch.randn(out_f, rank, generator=gen))
    return LoRAAdapter(name, rank, scaling, weights)


@pytest.fixture(scope="module")
def sources() -> list[tuple[LoRAAdapter, float]]:
    """Weights and scalings != 1; the second source lacks layer 1's down_proj."""
    return [(random_adapter("x", 2.0, seed=1), 0.7),
            (random_adapter("y", 0.5, seed=2, missing=((1, "down_proj"),)), 1.3),
            (random_adapter("z", 1.0, seed=3), 0.4)]


# ---- the independent computation: plain loops over sources and entries ----------------------

def ref_side_weights(adapter: LoRAAdapter, weight: float) -> tuple[float, float]:
    product = weight * adapter.scaling
    root = math.sqrt(abs(product))
    return (root if product >= 0 else -root), root


def ref_present(sources: list, key: tuple) -> list[tuple[list[float], list[float], float, float]]:
    """Per source adapting `key`: (A entries, B entries, A weight, B weight)."""
    rows = []
    for adapter, weight in sources:
        if key in adapter.weights:
            wa, wb = ref_side_weights(adapter, weight)
            w = adapter.weights[key]
            rows.append((w.a.flatten().tolist(), w.b.flatten().tolist(), wa, wb))
    return rows


def ref_linear(tensors: list[list[float]], weights: list[float]) -> list[float]:
    out = [0.0] * len(tensors[0])
    for values, w in zip(tensors, weights):
        for j, v in enumerate(values):
            out[j] += w * v
    return out


def ref_top_k(values: list[float], density: float) -> list[float]:
    k = int(density * len(values))
    keep = set(sorted(range(len(values)), key=lambda j: -abs(values[j]))[:k])
    return [v if j in keep else 0.0 for j, v in enumerate(values)]


def sign(v: float) -> int:
    return (v > 0) - (v < 0)


def ref_ties(tensors: list[list[float]], weights: list[float], density: float,
             sign_method: str) -> list[float]:
    pruned = [ref_top_k(values, density) for values in tensors]
    out = []
    for j in range(len(tensors[0])):
        column = [values[j] for values in pruned]
        votes = sum(column) if sign_method == "total" else sum(sign(v) for v in column)
        elected = 1 if votes >= 0 else -1
        agreeing = [w * v for v, w in zip(column, weights) if sign(v) == elected]
        out.append(sum(agreeing) / max(len(agreeing), 1))
    return out


def ref_dare(tensors: list[list[float]], weights: list[float], density: float,
             gen: torch.Generator) -> list[float]:
    kept = []
    for values in tensors:
        mask = torch.bernoulli(torch.full((len(values),), density), generator=gen).tolist()
        kept.append([v * m / density for v, m in zip(values, mask)])
    return ref_linear(kept, weights)


def ref_merge(sources: list, method: str, density: float = 1.0, sign_method: str = "total",
              seed: int = 0) -> dict[tuple, tuple[list[float], list[float]]]:
    """(layer, module) -> (merged A entries, merged B entries), keys in model order."""
    keys = sorted({k for a, _ in sources for k in a.weights},
                  key=lambda k: (k[0], MODEL_ORDER[k[1]]))
    gen = torch.Generator().manual_seed(seed)
    merged = {}
    for key in keys:
        rows = ref_present(sources, key)
        sides = []
        for half in (0, 1):
            tensors, weights = [r[half] for r in rows], [r[2 + half] for r in rows]
            if method == "linear":
                sides.append(ref_linear(tensors, weights))
            elif method == "ties":
                sides.append(ref_ties(tensors, weights, density, sign_method))
            else:
                sides.append(ref_dare(tensors, weights, density, gen))
        merged[key] = (sides[0], sides[1])
    return merged


def assert_matches_ref(merged: LoRAAdapter, ref: dict) -> None:
    assert set(merged.weights) == set(ref)
    for key, (a, b) in ref.items():
        got = merged.weights[key]
        torch.testing.assert_close(got.a.flatten(), torch.tensor(a), msg=f"A of {key}")
        torch.testing.assert_close(got.b.flatten(), torch.tensor(b), msg=f"B of {key}")


# ---- against the independent computation ---------------------------------------------------

def test_linear_matches_reference(sources: list) -> None:
    merged = merge_adapters("m", sources, "linear")
    assert (merged.name, merged.rank, merged.scaling) == ("m", RANK, 1.0)
    assert_matches_ref(merged, ref_merge(sources, "linear"))


def test_linear_negative_weight_signs_a_only(sources: list) -> None:
    signed = [(sources[0][0], -0.7), sources[1]]
    merged = merge_adapters("m", signed, "linear")
    assert_matches_ref(merged, ref_merge(signed, "linear"))
    # The update B A of a lone source with weight -w is -w * scaling times its own.
    alone = merge_adapters("m", [(sources[0][0], -0.7)], "linear")
    w = sources[0][0].weights[(0, "q_proj")]
    torch.testing.assert_close(alone.weights[(0, "q_proj")].b @ alone.weights[(0, "q_proj")].a,
                               -0.7 * 2.0 * (w.b @ w.a))


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.5, 1.0])
def test_ties_matches_reference(sources: list, sign_method: str, density: float) -> None:
    merged = merge_adapters("m", sources, "ties", density=density,
                            majority_sign_method=sign_method)
    assert_matches_ref(merged, ref_merge(sources, "ties", density, sign_method))


def test_ties_sign_methods_differ(sources: list) -> None:
    total = merge_adapters("m", sources, "ties", density=0.5, majority_sign_method="total")
    freq = merge_adapters("m", sources, "ties", density=0.5, majority_sign_method="frequency")
    assert any(not torch.equal(total.weights[k].a, freq.weights[k].a) for k in total.weights)


def test_dare_linear_matches_reference(sources: list) -> None:
    merged = merge_adapters("m", sources, "dare_linear", density=0.5, seed=7)
    assert_matches_ref(merged, ref_merge(sources, "dare_linear", 0.5, seed=7))
    again = merge_adapters("m", sources, "dare_linear", density=0.5, seed=7)
    other = merge_adapters("m", sources, "dare_linear", density=0.5, seed=8)
    for key, w in merged.weights.items():
        assert torch.equal(w.a, again.weights[key].a) and torch.equal(w.b, again.weights[key].b)
    assert any(not torch.equal(w.a, other.weights[k].a) for k, w in merged.weights.items())


def test_dare_linear_at_density_one_is_linear(sources: list) -> None:
    dare = merge_adapters("m", sources, "dare_linear", density=1.0, seed=3)
    linear = merge_adapters("m", sources, "linear")
    for key, w in linear.weights.items():
        assert torch.equal(dare.weights[key].a, w.a) and torch.equal(dare.weights[key].b, w.b)


def test_dare_linear_is_unbiased_and_drops_half(sources: list) -> None:
    """Over many seeds the mean merge is the linear one (within 5 sigma per entry) and a lone
    source keeps about half its entries, each scaled by 1 / density."""
    n, density = 400, 0.5
    linear = merge_adapters("m", sources, "linear")
    runs = [merge_adapters("m", sources, "dare_linear", density=density, seed=s) for s in range(n)]
    for key, lin in linear.weights.items():
        rows = ref_present(sources, key)
        for half, name in ((0, "a"), (1, "b")):
            mean = torch.stack([getattr(r.weights[key], name) for r in runs]).mean(dim=0)
            var = sum((r[2 + half] * torch.tensor(r[half])) ** 2 for r in rows) * (1 / density - 1)
            sigma = (var / n).sqrt().view(mean.shape)
            assert ((mean - getattr(lin, name)).abs() <= 5 * sigma + 1e-5).all(), (key, name)
    lone = torch.stack([r.weights[(1, "down_proj")].a for r in runs])  # only x and z there
    frac_zero = (lone == 0).float().mean().item()
    assert 0.2 < frac_zero < 0.3  # both dropped: 0.5 * 0.5


def test_single_source_is_always_linear(sources: list) -> None:
    """PEFT merges a single adapter with "linear" whatever method and density are asked."""
    one = [sources[1]]
    linear = merge_adapters("m", one, "linear")
    for method in ("ties", "dare_linear"):
        merged = merge_adapters("m", one, method, density=0.5)
        for key, w in linear.weights.items():
            assert torch.equal(merged.weights[key].a, w.a), (method, key)
            assert torch.equal(merged.weights[key].b, w.b), (method, key)


# ---- errors ---------------------------------------------------------------------------------

def test_different_ranks_name_both() -> None:
    with pytest.raises(ValueError, match=r"'r4' has rank 4.*'r8' has rank 8"):
        merge_adapters("m", [(random_adapter("r4", 1.0, 1), 1.0),
                             (random_adapter("r8", 1.0, 2, rank=8), 1.0)], "ties", density=0.5)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "svd"}, "merge method must be one of linear, ties, dare_linear, got 'svd'"),
    ({"method": "ties", "density": 0.0}, r"density must be in \(0, 1\], got 0.0"),
    ({"method": "ties", "majority_sign_method": "mean"},
     "majority_sign_method must be one of total, frequency, got 'mean'"),
])
def test_bad_arguments(sources: list, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        merge_adapters("m", sources, **kwargs)


def test_no_sources() -> None:
    with pytest.raises(ValueError, match="at least one adapter"):
        merge_adapters("m", [], "linear")


# ---- against PEFT's add_weighted_adapter ----------------------------------------------------

_PEFT_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)$")


@pytest.fixture(scope="module")
def peft_model():
    """A tiny random Llama with LoRA adapters one (alpha 8), two (alpha 16) on q, v, down and
    three (rsLoRA, alpha 4) on q, v only; all rank 4 with random, non-zero A and B."""
    peft = pytest.importorskip("peft", reason="peft (a test-only dependency) is not installed")
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    lora = dict(r=RANK, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"])
    wrapped = peft.get_peft_model(model, peft.LoraConfig(lora_alpha=8, **lora), adapter_name="one")
    wrapped.add_adapter("two", peft.LoraConfig(lora_alpha=16, **lora))
    wrapped.add_adapter("three", peft.LoraConfig(**{**lora, "target_modules": ["q_proj", "v_proj"]},
                                             lora_alpha=4, use_rslora=True))
    return wrapped


def peft_adapter(model, name: str) -> LoRAAdapter:
    """One adapter of a PEFT model as a LoRAAdapter (scaling read from the layers)."""
    weights, scalings = {}, set()
    for module_name, module in model.named_modules():
        match = _PEFT_KEY.search(module_name)
        if match and hasattr(module, "lora_A") and name in module.lora_A:
            weights[(int(match.group(1)), match.group(2))] = LoRAWeights(
                module.lora_A[name].weight.detach().clone().float(),
                module.lora_B[name].weight.detach().clone().float())
            scalings.add(module.scaling[name])
    assert len(scalings) == 1, scalings
    return LoRAAdapter(name, RANK, scalings.pop(), weights)


def assert_same_adapter(ours: LoRAAdapter, theirs: LoRAAdapter) -> None:
    assert (ours.rank, ours.scaling) == (theirs.rank, theirs.scaling)
    assert set(ours.weights) == set(theirs.weights)
    for key, w in theirs.weights.items():
        torch.testing.assert_close(ours.weights[key].a, w.a, msg=f"A of {key}")
        torch.testing.assert_close(ours.weights[key].b, w.b, msg=f"B of {key}")


PEFT_CASES = {
    "linear-ab": (["one", "two"], [0.7, 1.3], "linear", {}),
    "linear-abc-negative": (["one", "two", "three"], [0.7, -0.4, 1.5], "linear", {}),
    "ties-total": (["one", "two", "three"], [0.7, 1.3, 0.5], "ties",
                   {"density": 0.5, "majority_sign_method": "total"}),
    "ties-frequency": (["one", "two", "three"], [0.7, 1.3, 0.5], "ties",
                       {"density": 0.5, "majority_sign_method": "frequency"}),
    "ties-single": (["two"], [0.6], "ties", {"density": 0.5}),
    "dare-density-1": (["one", "two", "three"], [0.7, 1.3, 0.5], "dare_linear", {"density": 1.0}),
}


@pytest.mark.filterwarnings("ignore:The density 1.0 is greater than or equal to 1")
@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_matches_peft(peft_model, case: str) -> None:
    names, weights, method, kwargs = PEFT_CASES[case]
    merged_name = f"merged-{case}"
    peft_model.add_weighted_adapter(names, weights, merged_name, combination_type=method,
                                    **kwargs)
    sources = [(peft_adapter(peft_model, n), w) for n, w in zip(names, weights)]
    ours = merge_adapters(merged_name, sources, method, **kwargs)
    assert_same_adapter(ours, peft_adapter(peft_model, merged_name))
    if method == "dare_linear":
        assert_same_adapter(merge_adapters("lin", sources, "linear"), ours)


def test_dare_linear_matches_peft_masks(peft_model, monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT draws its DARE masks from torch's global generator after initialising the new
    adapter's layers; seeding it right there makes PEFT draw the masks merge_adapters draws
    from its own generator (same order: model order, A then B, sources in order)."""
    seed, lora_model = 11, peft_model.base_model
    inject = lora_model.inject_adapter

    def inject_then_seed(*args, **kwargs):
        inject(*args, **kwargs)
        torch.manual_seed(seed)

    monkeypatch.setattr(lora_model, "inject_adapter", inject_then_seed)
    names, weights = ["one", "two", "three"], [0.7, 1.3, 0.5]
    peft_model.add_weighted_adapter(names, weights, "merged-dare", combination_type="dare_linear",
                                    density=0.5)
    sources = [(peft_adapter(peft_model, n), w) for n, w in zip(names, weights)]
    ours = merge_adapters("merged-dare", sources, "dare_linear", density=0.5, seed=seed)
    assert_same_adapter(ours, peft_adapter(peft_model, "merged-dare"))
