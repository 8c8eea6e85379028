"""Vectorised token sampling with per-request parameters and per-request seeds.

The model runner calls `Sampler` once per step with the logits of the rows that sample (one
row per sequence, in an order that changes from step to step). Every row carries its own
`SamplingParams`; the maths runs on whole-batch tensors built from per-row parameter tensors.

Per row, in order:
  1. min_tokens: the stop ids (eos + stop_token_ids) are masked while the output is shorter
     than `min_tokens`;
  2. penalties: repetition (HF: over prompt and output tokens, positive logits divided and
     negative ones multiplied), presence and frequency (OpenAI: over output tokens only);
  3. greedy rows (temperature 0) take the argmax of the penalised logits;
  4. the other rows divide by temperature, apply top-k, top-p and min-p, and sample with the
     exponential race `argmax(probs / q)`, `q ~ Exp(1)`.

A seeded request draws the `q` row of its output token i from a generator seeded with a mix of
its seed and i, so each of its tokens depends on its seed, its position and its logits alone:
not on what else shares the batch, on preemption, or on how many positions a step samples at
once (speculative decoding samples every draft position and keeps the same tokens).
Reported logprobs are those of the raw logits, before penalties, temperature and filtering.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from taskloom.engine.outputs import Logprobs
from taskloom.runtime.transfer import to_device, to_host
from taskloom.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Exponential draws are clamped to this so that `probs / q` never divides 0 by 0.
_MIN_EXPONENTIAL = torch.finfo(torch.float32).tiny


@dataclass
class LogprobsTensors:
    """Logprobs of one token per row: the chosen token, then the top-k of the distribution."""

    token_ids: torch.Tensor   # [num_rows, 1 + max_k] int64: chosen token then top-k ids
    logprobs: torch.Tensor    # [num_rows, 1 + max_k] float32
    ranks: torch.Tensor       # [num_rows] int64: 1-based rank of the chosen token
    _host: tuple[list[list[int]], list[list[float]], list[int]] | None = field(
        default=None, init=False, repr=False)

    def to_host(self) -> "LogprobsTensors":
        """Host copies, on their way (see `taskloom.runtime.transfer.to_host`)."""
        return LogprobsTensors(to_host(self.token_ids), to_host(self.logprobs),
                               to_host(self.ranks))

    def to_list(self, row: int, k: int) -> Logprobs:
        """Row `row` as plain data: the chosen token and its top `k` alternatives.

        The tensors are copied to the host once, on the first call, and shared by later calls.
        """
        max_k = self.token_ids.shape[1] - 1
        if not 0 <= k <= max_k:
            raise ValueError(f"k must be between 0 and {max_k} (the top-k computed), got {k}")
        if self._host is None:
            self._host = (self.token_ids.tolist(), self.logprobs.tolist(), self.ranks.tolist())
        token_ids, logprobs, ranks = self._host
        return Logprobs(token_ids=token_ids[row][:1 + k], logprobs=logprobs[row][:1 + k],
                        rank=ranks[row])


@dataclass
class SamplerOutput:
    """One step's samples: a token per row, and logprobs when any row asked for them."""

    sampled: torch.Tensor                 # [num_rows] int64
    logprobs: LogprobsTensors | None      # None when no row asked for logprobs


def logprobs_tensors(logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> LogprobsTensors:
    """Gather the chosen token's logprob and rank and the top-`k` of each row of `logprobs`.

    The rank is 1 + the number of tokens strictly more likely than the chosen one, so a
    greedy choice always has rank 1.
    """
    chosen = chosen.to(torch.int64).unsqueeze(1)                   # [num_rows, 1]
    chosen_logprobs = logprobs.gather(1, chosen)                   # [num_rows, 1]
    ranks = (logprobs > chosen_logprobs).sum(dim=1) + 1            # [num_rows]
    if k == 0:
        return LogprobsTensors(chosen, chosen_logprobs, ranks)
    top_values, top_ids = logprobs.topk(k, dim=1)                  # [num_rows, k]
    return LogprobsTensors(token_ids=torch.cat([chosen, top_ids], dim=1),
                           logprobs=torch.cat([chosen_logprobs, top_values], dim=1),
                           ranks=ranks)


def compute_prompt_logprobs(logits: torch.Tensor, target_ids: torch.Tensor,
                            k: int) -> LogprobsTensors:
    """Logprobs of the prompt tokens `target_ids` under `logits` (raw), with the top-`k`.

    `logits` [num_positions, vocab] are the raw model outputs at the positions that predict
    `target_ids` [num_positions].
    """
    if logits.dim() != 2 or target_ids.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [n, vocab] and target_ids [n], got "
                         f"{tuple(logits.shape)} and {tuple(target_ids.shape)}")
    if not 0 <= k <= logits.shape[1]:
        raise ValueError(f"k must be between 0 and the vocab size {logits.shape[1]}, got {k}")
    logprobs = torch.log_softmax(logits.float(), dim=-1)           # [num_positions, vocab]
    return logprobs_tensors(logprobs, target_ids, k)


def output_token_counts(output_token_ids: list[list[int]], vocab_size: int,
                        device: torch.device) -> torch.Tensor:
    """Per-row counts of each token in `output_token_ids`, by one scatter_add.

    Returns [num_rows, vocab_size] float32.
    """
    num_rows = len(output_token_ids)
    counts = torch.zeros(num_rows * vocab_size, dtype=torch.float32, device=device)
    flat = [t for tokens in output_token_ids for t in tokens]
    if flat:
        lengths = to_device([len(tokens) for tokens in output_token_ids], torch.int64, device)
        # output_size given: repeat_interleave need not read the lengths' sum back
        rows = torch.repeat_interleave(torch.arange(num_rows, device=device), lengths,
                                       output_size=len(flat))
        ids = to_device(flat, torch.int64, device)              # [num_tokens]
        counts.scatter_add_(0, rows * vocab_size + ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts.view(num_rows, vocab_size)


def apply_token_bitmask(logits: torch.Tensor, rows: Sequence[int], masks: Sequence[bytes]
                        ) -> None:
    """Structured outputs: set to -inf, in place, the logits of the tokens each row's mask
    forbids. Row rows[i] may sample the tokens whose bits are set in masks[i], little-endian
    int32 words (bit b of word w: token 32 * w + b; taskloom.engine.structured)."""
    n, vocab = len(rows), logits.shape[1]
    words = np.frombuffer(bytearray(b"".join(masks)), dtype="<i4").reshape(n, -1)  # [n, words]
    words_t = to_device(words, torch.int32, logits.device)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = (words_t.unsqueeze(-1) >> shifts) & 1                          # [n, words, 32]
    allowed = bits.view(n, -1)[:, :vocab].bool()                          # [n, vocab]
    idx = to_device(list(rows), torch.int64, logits.device)
    logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))


def apply_penalties(logits: torch.Tensor, prompt_mask: torch.Tensor, counts: torch.Tensor,
                    repetition: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor) -> torch.Tensor:
    """Repetition (HF), presence and frequency (OpenAI) penalties, out of place.

    logits, counts [num_rows, vocab]; prompt_mask [num_rows, vocab] bool (token in the
    prompt); repetition, presence, frequency [num_rows]. Repetition applies to tokens in the
    prompt or the output: logit / p where logit > 0, logit * p otherwise. Presence and
    frequency apply to output tokens: logit -= presence * (count > 0) + frequency * count.
    """
    in_output = counts > 0                                         # [num_rows, vocab]
    rep = repetition.unsqueeze(1)                                  # [num_rows, 1]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(prompt_mask | in_output, penalised, logits)
    return (logits - frequency.unsqueeze(1) * counts
            - presence.unsqueeze(1) * in_output.to(logits.dtype))


def _top_k_threshold(sorted_desc: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """The k-th largest logit of each row ([num_rows, 1]); -inf where top_k is 0 (off)."""
    width = sorted_desc.shape[1]
    index = (top_k.clamp(min=1, max=width) - 1).unsqueeze(1)       # [num_rows, 1]
    kth = sorted_desc.gather(1, index)                             # [num_rows, 1]
    return kth.masked_fill((top_k == 0).unsqueeze(1), float("-inf"))


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_k: int | None = None
                ) -> torch.Tensor:
    """Drop logits below each row's k-th largest (ties with it are kept); top_k 0 is off.

    logits [num_rows, vocab]; top_k [num_rows] int64; `max_k`, the largest of top_k when the
    caller knows it (else it is read from the device, which waits for it).
    """
    if max_k is None:
        max_k = int(top_k.max())
    max_k = min(max_k, logits.shape[1])
    if max_k == 0:
        return logits
    top_values = logits.topk(max_k, dim=1).values                  # [num_rows, max_k]
    threshold = _top_k_threshold(top_values, top_k)                # [num_rows, 1]
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor) -> torch.Tensor:
    """Top-k (optional) then top-p on one descending sort of each row.

    Top-p keeps the smallest set of most likely tokens whose probability (after top-k,
    renormalised) adds up to at least top_p: a token is dropped when the tokens ranked above
    it already reach top_p. The most likely token is always kept; top_p 1 keeps everything.
    logits [num_rows, vocab]; top_k [num_rows] int64 (0 = off); top_p [num_rows].
    """
    sorted_logits, order = logits.sort(dim=1, descending=True)     # [num_rows, vocab]
    if top_k is not None:
        threshold = _top_k_threshold(sorted_logits, top_k)         # [num_rows, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < threshold, float("-inf"))
    cumulative = sorted_logits.softmax(dim=1).cumsum(dim=1)        # [num_rows, vocab]
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)       # [num_rows, vocab]
    drop[:, 1:] = cumulative[:, :-1] >= top_p.unsqueeze(1)
    drop &= (top_p < 1).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero the probabilities below min_p * (the row's largest) and renormalise.

    probs [num_rows, vocab]; min_p [num_rows] (0 = off).
    """
    threshold = min_p.unsqueeze(1) * probs.max(dim=1, keepdim=True).values  # [num_rows, 1]
    probs = probs.masked_fill(probs < threshold, 0.0)
    return probs / probs.sum(dim=1, keepdim=True)


def sampling_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None,
                   top_p: torch.Tensor | None, min_p: torch.Tensor | None,
                   max_top_k: int | None = None) -> torch.Tensor:
    """The distribution a non-greedy row samples from: temperature, top-k, top-p, min-p.

    logits [num_rows, vocab] (already penalised); temperature [num_rows] > 0; top_k, top_p,
    min_p [num_rows] or None when no row uses them; `max_top_k`, the largest top_k, if known.
    Returns [num_rows, vocab] probabilities,
    zero outside the kept set and summing to 1.
    """
    logits = logits / temperature.unsqueeze(1)                     # [num_rows, vocab]
    if top_p is not None:
        logits = apply_top_k_top_p(logits, top_k, top_p)
    elif top_k is not None:
        logits = apply_top_k(logits, top_k, max_top_k)
    probs = logits.softmax(dim=1)                                  # [num_rows, vocab]
    if min_p is not None:
        probs = apply_min_p(probs, min_p)
    return probs


_MASK64 = (1 << 64) - 1


def draw_seed(seed: int, index: int) -> int:
    """The generator seed of a seeded request's output token `index`: splitmix64 of the pair,
    so that neighbouring seeds and positions give unrelated streams."""
    x = (seed * 0x9E3779B97F4A7C15 + index) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@dataclass
class _RequestState:
    params: SamplingParams
    prompt_token_ids: list[int]
    stop_ids_for_min_tokens: tuple[int, ...]
    # what _build_batch asks of every row whenever the batch changes, worked out once
    greedy: bool = field(init=False)
    penalized: bool = field(init=False)
    masks_stop_ids: bool = field(init=False)     # min_tokens with stop ids to mask

    def __post_init__(self) -> None:
        p = self.params
        self.greedy = p.greedy
        self.penalized = p.penalized
        self.masks_stop_ids = p.min_tokens > 0 and bool(self.stop_ids_for_min_tokens)


@dataclass
class _PenaltyParams:
    """Rows that use any penalty, with their parameters and prompt-token masks."""

    rows: list[int]
    rows_tensor: torch.Tensor   # [num_pen] int64
    repetition: torch.Tensor    # [num_pen]
    presence: torch.Tensor      # [num_pen]
    frequency: torch.Tensor     # [num_pen]
    prompt_mask: torch.Tensor   # [num_pen, vocab] bool: token occurs in the prompt


@dataclass
class _SampleParams:
    """Non-greedy rows and their parameters; positions are within `rows`."""

    rows: torch.Tensor                     # [num_sample] int64 row indices in the batch
    temperature: torch.Tensor              # [num_sample] float32
    top_k: torch.Tensor | None             # [num_sample] int64, None when no row uses it
    max_top_k: int                         # the largest of top_k
    top_p: torch.Tensor | None             # [num_sample] float32
    min_p: torch.Tensor | None             # [num_sample] float32
    seeded: list[tuple[int, int, int]]     # (position in rows, batch row, the request's seed)
    unseeded: torch.Tensor | None          # [num_unseeded] int64; None when all rows are
    all_unseeded: bool


@dataclass
class _BatchParams:
    """Everything the sampler derives from the batch composition alone (cached by req ids)."""

    greedy_rows: torch.Tensor              # [num_greedy] int64
    sample: _SampleParams | None
    penalties: _PenaltyParams | None
    min_tokens: list[tuple[int, int, tuple[int, ...]]]  # (row, min_tokens, stop ids)
    max_logprobs: int | None               # largest top-k asked for; None when no row asks


class Sampler:
    """Samples one token per row with each row's own SamplingParams, in batched tensor ops.

    The runner registers each request with `add_request` (again after a preemption, which
    changes nothing: a seeded draw depends on the seed and the position), drops it with `remove_request` when it finishes or is
    aborted, and calls the sampler once per step on the logits of the sampling rows.
    """

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._requests: dict[str, _RequestState] = {}
        self._cached_ids: tuple[str, ...] | None = None
        self._cached_batch: _BatchParams | None = None
        self._generator = torch.Generator(device=self.device)   # reseeded for every draw

    def add_request(self, req_id: str, params: SamplingParams, prompt_token_ids: list[int],
                    stop_ids_for_min_tokens: tuple[int, ...]) -> None:
        """Register (or re-register) a request.

        `stop_ids_for_min_tokens` (eos ids and params.stop_token_ids) are masked while the
        request has generated fewer than `params.min_tokens` tokens. Re-adding a known id with
        the same seed is harmless: a seeded token's draw depends on the seed and its position.
        """
        self._check_token_ids("stop_ids_for_min_tokens", stop_ids_for_min_tokens)
        if params.repetition_penalty != 1.0:
            self._check_token_ids("prompt_token_ids", prompt_token_ids)
        self._requests[req_id] = _RequestState(params, list(prompt_token_ids),
                                               tuple(stop_ids_for_min_tokens))
        self._invalidate(req_id)

    def remove_request(self, req_id: str) -> None:
        """Forget a finished or aborted request; unknown ids are ignored."""
        if self._requests.pop(req_id, None) is not None:
            self._invalidate(req_id)

    def __call__(self, logits: torch.Tensor, req_ids: list[str],
                 output_token_ids: list[list[int]],
                 output_index: list[int] | None = None) -> SamplerOutput:
        """Sample a token for each row of `logits` [num_rows, vocab] (raw model output).

        Row i belongs to `req_ids[i]`, which has generated `output_token_ids[i]` so far (the
        history its penalties and min_tokens read), and samples its output token number
        `output_index[i]` (by default `len(output_token_ids[i])`; with async scheduling the
        history lags the tokens in flight). A request may own several rows: speculative
        decoding samples each draft position, with the drafts before it in its history.
        """
        self._check_call(logits, req_ids, output_token_ids)
        if output_index is None:
            output_index = [len(h) for h in output_token_ids]
        logits = logits.float()                                    # [num_rows, vocab]
        batch = self._batch_params(req_ids)
        raw_logprobs = (torch.log_softmax(logits, dim=-1)          # [num_rows, vocab]
                        if batch.max_logprobs is not None else None)
        logits = self._penalise(logits, batch, output_token_ids)
        if batch.sample is None:
            sampled = logits.argmax(dim=-1)                        # [num_rows]
        else:
            sampled = torch.empty(len(req_ids), dtype=torch.int64, device=logits.device)
            if batch.greedy_rows.numel():
                sampled[batch.greedy_rows] = logits[batch.greedy_rows].argmax(dim=-1)
            sampled[batch.sample.rows] = self._sample(logits[batch.sample.rows], batch.sample,
                                                      output_index)
        logprobs = (logprobs_tensors(raw_logprobs, sampled, batch.max_logprobs)
                    if raw_logprobs is not None else None)
        return SamplerOutput(sampled=sampled, logprobs=logprobs)

    def _check_token_ids(self, name: str, token_ids: list[int] | tuple[int, ...]) -> None:
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{name} must be in [0, {self.vocab_size}), got {bad[:5]}")

    def _check_call(self, logits: torch.Tensor, req_ids: list[str],
                    output_token_ids: list[list[int]]) -> None:
        if logits.dim() != 2 or logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits must be [num_rows, {self.vocab_size}], "
                             f"got {tuple(logits.shape)}")
        if not logits.shape[0] == len(req_ids) == len(output_token_ids):
            raise ValueError(f"logits has {logits.shape[0]} rows but {len(req_ids)} req_ids "
                             f"and {len(output_token_ids)} output_token_ids were given")
        unknown = [r for r in req_ids if r not in self._requests]
        if unknown:
            raise KeyError(f"requests not added to the sampler: {unknown[:5]}")

    def _invalidate(self, req_id: str) -> None:
        if self._cached_ids is not None and req_id in self._cached_ids:
            self._cached_ids = None
            self._cached_batch = None

    def _batch_params(self, req_ids: list[str]) -> _BatchParams:
        key = tuple(req_ids)
        if key != self._cached_ids or self._cached_batch is None:
            self._cached_batch = self._build_batch(key)
            self._cached_ids = key
        return self._cached_batch

    def _build_batch(self, req_ids: tuple[str, ...]) -> _BatchParams:
        """What the batch's rows ask for. Continuous batching changes the rows most steps
        (a request finishes, another joins), so this runs about as often as the sampler: one
        pass over the rows, and tensors only for what some row uses."""
        requests = self._requests
        states = [requests[r] for r in req_ids]
        greedy: list[int] = []
        sampled: list[int] = []
        penalized: list[int] = []
        min_tokens: list[tuple[int, int, tuple[int, ...]]] = []
        max_logprobs: int | None = None
        for i, s in enumerate(states):
            (greedy if s.greedy else sampled).append(i)
            if s.penalized:
                penalized.append(i)
            if s.masks_stop_ids:
                min_tokens.append((i, s.params.min_tokens, s.stop_ids_for_min_tokens))
            k = s.params.logprobs
            if k is not None and (max_logprobs is None or k > max_logprobs):
                max_logprobs = k
        return _BatchParams(
            # the greedy rows are indexed only beside sampled ones (all greedy: one argmax)
            greedy_rows=to_device(greedy if sampled else [], torch.int64, self.device),
            sample=self._build_sample(sampled, states) if sampled else None,
            penalties=self._build_penalties(penalized, states) if penalized else None,
            min_tokens=min_tokens, max_logprobs=max_logprobs)

    def _build_sample(self, rows: list[int], states: list[_RequestState]) -> _SampleParams:
        def column(values: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
            return to_device(values, dtype, self.device)

        temperature: list[float] = []
        top_k: list[int] = []
        top_p: list[float] = []
        min_p: list[float] = []
        seeded: list[tuple[int, int, int]] = []
        unseeded: list[int] = []
        for j, i in enumerate(rows):            # one pass: this runs most steps
            state = states[i]
            p = state.params
            temperature.append(p.temperature)
            top_k.append(p.top_k)
            top_p.append(p.top_p)
            min_p.append(p.min_p)
            if p.seed is None:
                unseeded.append(j)
            else:
                seeded.append((j, i, p.seed))
        return _SampleParams(
            rows=column(rows, torch.int64),
            temperature=column(temperature, torch.float32),
            top_k=column(top_k, torch.int64) if any(k > 0 for k in top_k) else None,
            max_top_k=max(top_k),
            top_p=column(top_p, torch.float32) if any(p < 1 for p in top_p) else None,
            min_p=column(min_p, torch.float32) if any(p > 0 for p in min_p) else None,
            seeded=seeded,
            unseeded=column(unseeded, torch.int64) if unseeded and seeded else None,
            all_unseeded=not seeded)

    def _build_penalties(self, rows: list[int], states: list[_RequestState]) -> _PenaltyParams:
        """The penalised `rows` (of `states`) and their parameters."""
        params = [states[i].params for i in rows]
        prompts = [states[i].prompt_token_ids if states[i].params.repetition_penalty != 1.0
                   else [] for i in rows]
        prompt_mask = output_token_counts(prompts, self.vocab_size, self.device) > 0

        def column(values: Sequence[float]) -> torch.Tensor:
            return to_device(values, torch.float32, self.device)

        return _PenaltyParams(
            rows=rows,
            rows_tensor=to_device(rows, torch.int64, self.device),
            repetition=column([p.repetition_penalty for p in params]),
            presence=column([p.presence_penalty for p in params]),
            frequency=column([p.frequency_penalty for p in params]),
            prompt_mask=prompt_mask)

    def _penalise(self, logits: torch.Tensor, batch: _BatchParams,
                  output_token_ids: list[list[int]]) -> torch.Tensor:
        """Steps 1 and 2: min_tokens masking and penalties (the input is left untouched)."""
        mask_rows: list[int] = []
        mask_ids: list[int] = []
        for row, min_tokens, stop_ids in batch.min_tokens:
            if len(output_token_ids[row]) < min_tokens:
                mask_rows.extend([row] * len(stop_ids))
                mask_ids.extend(stop_ids)
        if mask_rows:
            logits = logits.index_put(
                (to_device(mask_rows, torch.int64, logits.device),
                 to_device(mask_ids, torch.int64, logits.device)),
                torch.full((), float("-inf"), device=logits.device))
        pen = batch.penalties
        if pen is not None:
            counts = output_token_counts([output_token_ids[i] for i in pen.rows],
                                         self.vocab_size, logits.device)  # [num_pen, vocab]
            penalised = apply_penalties(logits[pen.rows_tensor], pen.prompt_mask, counts,
                                        pen.repetition, pen.presence, pen.frequency)
            logits = logits.index_copy(0, pen.rows_tensor, penalised)
        return logits

    def _sample(self, logits: torch.Tensor, sample: _SampleParams,
                output_index: list[int]) -> torch.Tensor:
        """Step 4 on the non-greedy rows: filter, then race `probs / q` with q ~ Exp(1); a
        seeded row's q comes from `draw_seed(seed, output index)`."""
        probs = sampling_probs(logits, sample.temperature, sample.top_k, sample.top_p,
                               sample.min_p, sample.max_top_k)     # [num_sample, vocab]
        q = torch.empty_like(probs)                                # [num_sample, vocab]
        if sample.all_unseeded:
            q.exponential_()
        elif sample.unseeded is not None:
            q[sample.unseeded] = torch.empty(
                (sample.unseeded.numel(), probs.shape[1]), device=probs.device).exponential_()
        generator = self._generator
        for j, row, seed in sample.seeded:
            generator.manual_seed(draw_seed(seed, output_index[row]))
            q[j].exponential_(generator=generator)
        return (probs / q.clamp_(min=_MIN_EXPONENTIAL)).argmax(dim=-1)
