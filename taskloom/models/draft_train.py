"""Train draft heads for a model by self-distillation: `taskloom train-medusa` and
`taskloom train-hydra`.

Medusa-1 (Cai et al., 2024) trains only the heads, the base model frozen; the paper's
self-distillation recipe trains them on the base model's own answers, so that what the heads
learn to guess is what the base will in fact generate. Hydra (Ankner et al., 2024) trains its
sequentially dependent heads the same way, teacher-forced: each head reads the true tokens
before the one it guesses. Here:

1. the engine answers the training prompts greedily (`max_tokens` each, batched), or with
   `samples_per_prompt` N and a `temperature`, N sampled answers each (seeded), more of
   the model's own continuations for heads that are short of data;
2. one forward per few sequences gives the base model's final hidden states of every
   prompt-and-answer (through a private paged KV cache, as the runner would);
3. head k learns, at every answer position p (and the prompt's last), the token at
   p + 1 + k (a Hydra head also reading the tokens at p + 1 .. p + k), by cross-entropy
   (or, with `loss` "distill", against the base's softmax there) weighted `decay ** k` (the
   paper's 0.8), with AdamW; the heads start as the base's next-token guess (Medusa's blocks
   at zero; Hydra's first block passing the hidden state through), and they use the base
   model's lm_head, frozen (nothing of it is saved: see taskloom.models.medusa and
   taskloom.models.hydra), or its rows of the `draft_vocab_size` tokens the answers use
   most (taskloom.models.draft_vocab).

Heads that guess the base's greedy continuation pay for greedy decoding most; sampled
outputs are unchanged by them too (drafts are verified), only accepted less often.

`rank_accuracy` measures trained heads the same way on other prompts: how often each head's
guess of each rank is the base's token there, which `taskloom draft-tree` turns into the
token tree (taskloom.engine.draft_tree.best_tree) to draft with.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from taskloom.models.draft_heads import DRAFT_HEAD_METHODS, DraftHeads
from taskloom.models.draft_vocab import IGNORE, most_frequent
from taskloom.models.hydra import HydraConfig, HydraHeads, save_hydra
from taskloom.models.llama import LlamaForCausalLM
from taskloom.models.medusa import MedusaConfig, MedusaHeads, save_medusa
from taskloom.runtime.attention import flat_batch_metadata
from taskloom.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


TRAIN_LOSSES = ("ce", "distill")


@dataclass(frozen=True)
class DraftTrainConfig:
    """How heads of `method` ("medusa" or "hydra") are trained: Medusa-1's recipe (AdamW,
    cosine schedule, loss weights 0.8 ** k), with steps and rates that fit the embedded model
    on a CPU in minutes. `loss` "ce" fits each head to the answer's token; "distill" to the
    base model's whole distribution there (its softmax: teacher distillation, which Hydra's
    paper trains its best heads with). `draft_vocab_size` N: the heads guess among the N
    tokens the answers use most (taskloom.models.draft_vocab); None: among all."""

    method: str = "medusa"
    num_heads: int = 4
    num_layers: int = 1
    max_tokens: int = 128          # answer length per prompt
    epochs: int = 3
    lr: float = 3e-3
    batch_tokens: int = 128        # training positions per optimizer step
    decay: float = 0.8             # head k's loss weight: decay ** k
    weight_decay: float = 0.0
    seed: int = 0
    loss: str = "ce"
    draft_vocab_size: int | None = None
    samples_per_prompt: int = 1    # answers per prompt; more than 1 needs a temperature
    temperature: float = 0.0       # of the answers: 0 greedy

    def __post_init__(self) -> None:
        if self.method not in DRAFT_HEAD_METHODS:
            raise ValueError(f"method must be one of {', '.join(DRAFT_HEAD_METHODS)}, got "
                             f"{self.method!r}")
        if self.loss not in TRAIN_LOSSES:
            raise ValueError(f"loss must be one of {', '.join(TRAIN_LOSSES)}, got "
                             f"{self.loss!r}")
        for name in ("num_heads", "max_tokens", "epochs", "batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            raise ValueError(f"draft_vocab_size must be >= 1, got {self.draft_vocab_size}")
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.samples_per_prompt > 1 and self.temperature == 0:
            raise ValueError(f"samples_per_prompt {self.samples_per_prompt} needs a temperature "
                             "> 0: greedy answers to one prompt are all the same")


def self_distill(llm, prompts: Sequence[list[int]], max_tokens: int, samples: int = 1,
                 temperature: float = 0.0, seed: int = 0) -> list[tuple[list[int], int]]:
    """The base model's answers, greedy or `samples` sampled ones per prompt at
    `temperature` (seeded): (prompt + answer token ids, prompt length) each."""
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, n=samples,
                            seed=seed if temperature > 0 else None)
    outs = llm.generate(list(prompts), params, use_tqdm=False)
    return [(list(p) + list(c.token_ids), len(p)) for p, o in zip(prompts, outs)
            for c in o.outputs]


@torch.inference_mode()
def final_hidden_states(model: LlamaForCausalLM, seqs: Sequence[list[int]], block_size: int,
                        max_batch_tokens: int = 4096) -> list[torch.Tensor]:
    """The model's final hidden states [len, hidden] of each sequence (on the host, float32):
    a few sequences a forward, each prefilled whole into a private KV cache."""
    param = model.model.embed_tokens.weight
    arch, out = model.config, []
    i = 0
    while i < len(seqs):
        batch = [seqs[i]]
        while (i + len(batch) < len(seqs)
               and sum(map(len, batch)) + len(seqs[i + len(batch)]) <= max_batch_tokens):
            batch.append(seqs[i + len(batch)])
        i += len(batch)
        tables, next_block = [], 0
        for s in batch:
            n = -(-len(s) // block_size)
            tables.append(list(range(next_block, next_block + n)))
            next_block += n
        shape = (2, next_block, block_size, arch.num_key_value_heads, arch.head_dim)
        caches = [torch.zeros(shape, dtype=param.dtype, device=param.device)
                  for _ in range(arch.num_hidden_layers)]
        meta, positions = flat_batch_metadata(tables, [0] * len(batch),
                                              [len(s) for s in batch], block_size,
                                              param.device)
        ids = torch.tensor([t for s in batch for t in s], device=param.device)
        hidden = model(ids, positions, caches, meta)                 # [tokens, hidden]
        out += [h.float().cpu() for h in hidden.split([len(s) for s in batch])]
    return out


def training_pairs(seqs: Sequence[tuple[list[int], int]], hiddens: Sequence[torch.Tensor],
                   num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The base's states of every sequence, one after another [T, hidden]; the row there of
    each answer position p (and the prompt's last) [n]; and its tokens p + 1 .. p + 1 + K
    [n, K + 1] (-100 where past the end), the first what the base made of state p, the
    others the heads' targets. The state the base read target j from is row + j."""
    rows, ys = [], []
    offset = 0                  # where the sequence's states start
    for (ids, prompt_len), h in zip(seqs, hiddens):
        first, end = prompt_len - 1, len(ids) - 3      # p + 2 must exist
        if end >= first:
            tokens = torch.tensor(ids)
            idx = torch.arange(first, end + 1)                          # [m]
            offsets = idx[:, None] + torch.arange(1, num_heads + 2)     # [m, K + 1]
            target = torch.full(offsets.shape, -100, dtype=torch.int64)
            ok = offsets < len(ids)
            target[ok] = tokens[offsets[ok]]
            rows.append(idx + offset)
            ys.append(target)
        offset += len(h)
    if not rows:
        raise ValueError("no training positions: every answer is shorter than 2 tokens")
    return torch.cat(list(hiddens)), torch.cat(rows), torch.cat(ys)


def new_heads(model: LlamaForCausalLM, cfg: DraftTrainConfig,
              token_map: torch.Tensor | None = None) -> DraftHeads:
    """Untrained float32 heads of `cfg.method` on the model's device, each the base model's
    next-token guess (among the tokens of `token_map` [N], where given): Medusa's blocks at
    zero; Hydra's first block passing the hidden state through its res_connection, its
    later blocks at zero. Both use the model's lm head."""
    arch = model.config
    lm = model.lm_head_weight().detach().float()                        # [vocab, hidden]
    n = None if token_map is None else len(token_map)
    if cfg.method == "medusa":
        mcfg = MedusaConfig(cfg.num_heads, cfg.num_layers, arch.hidden_size, arch.vocab_size,
                            bias=True, num_lm_heads=0, truncated_vocab_size=n)
        return MedusaHeads(mcfg, lm, torch.float32, lm.device, token_map)
    embed = model.model.embed_tokens.weight.detach().float()            # [vocab, hidden]
    hcfg = HydraConfig(cfg.num_heads, cfg.num_layers, arch.hidden_size, arch.vocab_size,
                       truncated_vocab_size=n)
    heads = HydraHeads(hcfg, embed, lm, torch.float32, lm.device, token_map)
    heads.start_as_base_guess()
    return heads


def train_heads(model: LlamaForCausalLM, states: torch.Tensor, rows: torch.Tensor,
                y: torch.Tensor, cfg: DraftTrainConfig, token_map: torch.Tensor | None = None
                ) -> tuple[DraftHeads, list[dict]]:
    """Heads fitted to the positions `rows` of `states` and their tokens y (see
    `training_pairs`), in float32 on the model's device (the tensors stay on the host, a
    batch at a time goes over), guessing among the tokens of `token_map` where given; and a
    log entry per epoch: loss and top-1 accuracy of each head (a target outside the draft
    vocabulary counts as a miss)."""
    heads = new_heads(model, cfg, token_map)
    params = heads.trainable()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = math.ceil(len(rows) / cfg.batch_tokens)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    teacher = (heads.vocab.rows(model.lm_head_weight().detach().float())
               if cfg.loss == "distill" else None)                      # [N, hidden]
    log = []
    for epoch in range(cfg.epochs):
        start = time.perf_counter()
        order = torch.randperm(len(rows), generator=gen)
        batches = (order[b * cfg.batch_tokens:(b + 1) * cfg.batch_tokens] for b in range(steps))
        loss, top1 = _epoch(heads, states, rows, y, batches, opt, sched, cfg.decay, teacher,
                            params[0].device)
        entry = {"epoch": epoch + 1, "seconds": round(time.perf_counter() - start, 1),
                 "loss": loss, "top1": top1}
        logger.info("%s epoch %d: %s", cfg.method, epoch + 1, entry)
        log.append(entry)
    for p in params:
        p.requires_grad_(False)
    return heads, log


def _head_loss(logits: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor | None,
               states: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """A head's loss summed over its valid targets: cross-entropy against the target
    tokens, or with `teacher` (the base's lm head) against the base's softmax at the states
    it read them from (rows `at`, where target is valid)."""
    if teacher is None:
        return F.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
    valid = target != -100
    with torch.no_grad():
        read = states[at[valid.to(at.device)]].to(logits.device)         # [valid, hidden]
        soft = F.softmax(F.linear(read, teacher), -1)                   # [valid, vocab]
    return -(soft * F.log_softmax(logits[valid], -1)).sum()


def _epoch(heads: DraftHeads, states: torch.Tensor, rows: torch.Tensor, y: torch.Tensor,
           batches: Iterator[torch.Tensor], opt: torch.optim.Optimizer,
           sched: torch.optim.lr_scheduler.LRScheduler, decay: float,
           teacher: torch.Tensor | None, device: torch.device
           ) -> tuple[list[float], list[float]]:
    """One pass over the batches (indexes of training positions: their rows of `states`
    and of `y`, see `training_pairs`); each head's mean loss and top-1 accuracy over the
    positions it had a target at (the loss over those in the draft vocabulary). A head's
    loss is a sum over its targets divided by their count, so a batch where it has none adds
    nothing (not a NaN)."""
    k = heads.num_heads
    weights = [decay ** i for i in range(1, k + 1)]
    sums = torch.zeros(4, k, device=device)   # loss sum, hits, fitted, targets, per head
    for batch in batches:
        at = rows[batch]                                                # [B] rows of states
        tokens = y[batch].to(device)                                    # [B, K + 1]
        hidden = states[at].to(device)                                  # [B, hidden]
        head_states = heads.train_states(hidden, tokens[:, :k])         # [K, B, hidden]
        target = heads.vocab.index(tokens[:, 1:])                       # [B, K] draft indexes
        loss = torch.zeros((), device=device)
        for i in range(k):
            logits = heads.head_logits(i, head_states[i])               # [B, N]
            fit = target[:, i] != IGNORE
            n = fit.sum()
            total = _head_loss(logits, target[:, i], teacher, states, at + 1 + i)
            loss = loss + weights[i] * total / n.clamp(min=1)
            hits = (logits.argmax(-1) == target[:, i]).logical_and(fit).sum()
            sums[:, i] += torch.stack([total.detach(), hits, n, (tokens[:, 1 + i] >= 0).sum()])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    total, hits, fitted, counts = sums.tolist()
    return ([round(t / max(c, 1), 4) for t, c in zip(total, fitted)],
            [round(h / max(c, 1), 4) for h, c in zip(hits, counts)])


@torch.inference_mode()
def rank_accuracy(heads: DraftHeads, states: torch.Tensor, rows: torch.Tensor,
                  y: torch.Tensor, num_ranks: int, batch_tokens: int = 512
                  ) -> list[list[float]]:
    """How often head d's guess of rank r is the base's token, [K][num_ranks], over the
    positions `rows` of `states` with tokens y (see `training_pairs`): teacher-forced, as a
    Hydra head reads its path in a tree where the path so far is right. A position counts
    for a head where it has a target; a target outside the draft vocabulary is a miss."""
    k = heads.num_heads
    param = heads.trainable()[0]
    hits = torch.zeros(k, num_ranks + 1, dtype=torch.int64)
    counts = torch.zeros(k, dtype=torch.int64)
    for b in range(0, len(rows), batch_tokens):
        at = rows[b:b + batch_tokens]
        tokens = y[b:b + batch_tokens].to(param.device)                 # [B, K + 1]
        hidden = states[at].to(param.device, param.dtype)               # [B, hidden]
        head_states = heads.train_states(hidden, tokens[:, :k])
        target = heads.vocab.index(tokens[:, 1:])                       # [B, K]
        for i in range(k):
            logits = heads.head_logits(i, head_states[i]).float()        # [B, N]
            fit = target[:, i] != IGNORE
            mine = logits.gather(1, target[:, i:i + 1].clamp(min=0))    # [B, 1]
            rank = (logits > mine).sum(dim=1)[fit].clamp(max=num_ranks)  # [fitted]
            hits[i] += torch.bincount(rank, minlength=num_ranks + 1).cpu()
            counts[i] += int((tokens[:, 1 + i] >= 0).sum())
    return [[round(int(h) / max(int(c), 1), 4) for h in row[:num_ranks]]
            for row, c in zip(hits, counts)]


# ShareGPT's speakers, as chat roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
                  "bard": "assistant", "bing": "assistant", "assistant": "assistant",
                  "system": "system"}


def sharegpt_prompts(turns: list, where: str) -> list[list[dict]]:
    """A ShareGPT conversation's prompts: each user turn with the conversation before it
    (its answers those of the dataset), as chat messages."""
    messages: list[dict] = []
    out = []
    for turn in turns:
        role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) \
            else None
        if role is None or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: a ShareGPT turn needs \"from\" (one of "
                             f"{', '.join(sorted(SHAREGPT_ROLES))}) and a \"value\" string, "
                             f"got {turn!r}")
        messages.append({"role": role, "content": turn["value"]})
        if role == "user":
            out.append(list(messages))
    return out


def read_prompts(path: str, llm) -> list[list[int]]:
    """Token ids of a JSONL file's prompts: `{"prompt": str}` or `{"messages": [...]}` (through
    the chat template), `{"conversations": [{"from": "human", "value": ...}, ...]}`
    (ShareGPT's: each human turn with what came before it), or `{"prompt_token_ids": [...]}`
    (a model without a tokenizer)."""
    from taskloom.bench.spec import jsonl_rows
    prompts = []
    for n, row in jsonl_rows(path):
        if isinstance(row.get("prompt_token_ids"), list):
            prompts.append([int(t) for t in row["prompt_token_ids"]])
        elif isinstance(row.get("messages"), list):
            prompts.append(llm.encode_chat(row["messages"]))
        elif isinstance(row.get("conversations"), list):
            prompts += [llm.encode_chat(m)
                        for m in sharegpt_prompts(row["conversations"], f"{path}:{n}")]
        elif isinstance(row.get("prompt"), str):
            prompts.append(llm.encode_chat([{"role": "user", "content": row["prompt"]}]))
        else:
            raise ValueError(f"{path}:{n}: expected \"prompt\", \"messages\", "
                             f"\"conversations\" or \"prompt_token_ids\"")
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def train_draft_heads(llm, prompts: Sequence[list[int]], cfg: DraftTrainConfig, output: str
                      ) -> dict:
    """Self-distil heads of `cfg.method` for the LLM's model from its answers to `prompts`,
    save them at `output` (vLLM's Medusa layout, or Hydra's) and return what was done,
    timed."""
    runner = llm.engine.runner
    start = time.perf_counter()
    seqs = self_distill(llm, prompts, cfg.max_tokens, cfg.samples_per_prompt, cfg.temperature,
                        cfg.seed)
    generated = time.perf_counter()
    hiddens = final_hidden_states(runner.model, [s for s, _ in seqs], runner.block_size)
    states, rows, y = training_pairs(seqs, hiddens, cfg.num_heads)
    del hiddens                 # `states` holds them all, one after another
    token_map = None
    if cfg.draft_vocab_size is not None:
        vocab_size = runner.model.config.vocab_size
        if cfg.draft_vocab_size >= vocab_size:
            raise ValueError(f"draft_vocab_size {cfg.draft_vocab_size} is not below the "
                             f"model's vocabulary of {vocab_size}")
        token_map = most_frequent([s[n:] for s, n in seqs], vocab_size, cfg.draft_vocab_size)
    encoded = time.perf_counter()
    heads, log = train_heads(runner.model, states, rows, y, cfg, token_map)
    if isinstance(heads, HydraHeads):
        save_hydra(heads, output)
    else:
        assert isinstance(heads, MedusaHeads)
        save_medusa(heads, output)
    return {"output": output, "num_prompts": len(prompts), "num_answers": len(seqs),
            "num_positions": len(rows),
            "answer_tokens": sum(len(s) - n for s, n in seqs),
            "generate_s": round(generated - start, 1),
            "hidden_states_s": round(encoded - generated, 1),
            "train_s": round(time.perf_counter() - encoded, 1), "epochs": log,
            "config": {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}}
