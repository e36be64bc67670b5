"""Static structured-pruning baselines for Probe Pruning: the other rows of the paper's table.

Each scores the heads and channels once, keeps the best ones and slices the weights for good, so
it runs the same forward as PP (`probe_prune.run`) on smaller matrices. They prune what PP prunes
(heads with their o_proj columns, MLP channels), in the same layers (the first
`PPConfig.dense_layers` stay dense), at the same ratio, so a table compares metrics.

- Wanda-sp, the structured Wanda (Sun et al., ICLR 2024) that FLAP and PP compare against.
- FLAP (An et al., AAAI 2024): its default variant, WIFV metric + AL-AM adaptive structure
  search + bias compensation, as the PP authors ran it.
- Second-moment (Li, Dong, Lei 2024, "Greedy Output Approximation", arXiv 2407.19126): the
  second-moment channel score of depth-2 modules, similar attention heads pruned first, uniform
  per layer; its pre-pruning recovery (least-squares refit before scoring) as an option.
- LLM-Pruner (Ma et al., NeurIPS 2023) and LoRAPrune (Zhang et al., 2023) without their LoRA
  fine-tuning: gradient (Taylor) importance from one forward/backward pass on calibration text.
- GRIFFIN (Dong et al., COLM 2024), for generation only: the prompt runs dense and its own MLP
  activations choose the neurons every generated token runs on; attention stays dense.

Reading order: calibration statistics, similar heads, the statistics-based scores, the gradient
scores (each method's element importance, then the micro-batched backward pass that calls it), the
method table, choosing and slicing, the optional recovery, GRIFFIN.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

import probe_prune as pp

# -----------------------------------------------------------------------------------------
# Calibration statistics


@dataclass
class Stats:
    """One block's statistics over all real calibration tokens."""

    n: Tensor  # () number of tokens
    z_sum: Tensor  # (Cz,) sum of z, the output projection's input
    z_sq: Tensor  # (Cz,) sum of z^2
    h_gram: Tensor | None  # (C+1, C+1) sum of [h, 1][h, 1]^T of an MLP's normalized input
    head_div: Tensor | None  # (nh, nh) sum over query tokens of heads' JS distances (second-moment)
    head_rows: Tensor | None  # () number of query tokens in head_div
    seqlen: int  # tokens per calibration sample (for FLAP's cost of a head)

    @property
    def mean(self) -> Tensor:
        """Mean of z per channel (Cz,)."""
        return self.z_sum / self.n

    @property
    def var(self) -> Tensor:
        """Variance of z per channel over calibration tokens (Cz,)."""
        # E[z^2] - E[z]^2 in fp32 is off by about 1e-6 (mean / std)^2 of the variance: negligible unless
        # a channel is nearly constant (|mean| >> std), where a running (Welford) update would do better.
        return (self.z_sq / self.n - self.mean.square()).clamp(min=0)


def stat_sums(blk: pp.Block, h: Tensor, z: Tensor, ctx: pp.Context, compare: int = 0) -> list[Tensor | None]:
    """One batch's sums for a block's Stats, fp32, real tokens only; an attention block also
    compares the attention maps of its first `compare` samples' heads."""
    m = ctx.mask.reshape(-1)
    zf = z.reshape(-1, z.shape[-1])[m].float()  # (N, Cz)
    gram = div = rows = None
    if isinstance(blk, pp.MLP):  # the constant 1 makes w1/w3 biases one more column
        hf = torch.cat([h.reshape(-1, h.shape[-1])[m].float(), zf.new_ones(len(zf), 1)], dim=1)
        gram = hf.T @ hf
    elif compare > 0:
        part = pp.Context(*(t[:compare] for t in ctx[:2]), None if ctx.rope is None else
                          (ctx.rope[0][:compare], ctx.rope[1][:compare]),
                          None if ctx.attn_mask is None else ctx.attn_mask[:compare])
        div = js_distance_sums(attention_maps(blk, h[:compare], part), part.mask)
        rows = part.mask.sum()
    return [m.sum(), zf.sum(0), zf.square().sum(0), gram, div, rows]


def add_sums(acc: list | None, new: list) -> list:
    """Element-wise sum of two stat_sums lists (None stays None)."""
    if acc is None:
        return new
    return [x if a is None else a if x is None else a + x for a, x in zip(acc, new)]


# The second-moment paper compares heads' attention maps on 16 calibration samples (Sec. 4.1);
# the (B, nh, T, T) maps and their pairwise divergences are the costly part of its calibration.
SIMILARITY_SAMPLES = 16


def collect_stats(dec: pp.Decoder, batches: Iterable[pp.Batch], similarity: bool = False) -> list[Stats]:
    """One dense pass over calibration batches, accumulating every block's Stats (fp32);
    `similarity` also compares every pair of heads' attention maps on the first samples."""
    acc: dict[int, list] = {}
    compare = SIMILARITY_SAMPLES if similarity else 0  # samples still to compare

    def observe(b: int, blk: pp.Block, h: Tensor, z: Tensor, ctx: pp.Context) -> None:
        acc[b] = add_sums(acc.get(b), stat_sums(blk, h, z, ctx, compare))

    seqlen = 0
    for batch in batches:
        ids, mask = batch if isinstance(batch, (tuple, list)) else (batch, None)
        seqlen = max(seqlen, ids.shape[1])
        pp.run(dec, ids, mask, observe=observe, logits=False)  # only the blocks' states are wanted
        compare = max(0, compare - len(ids))
    return [Stats(*acc[b], seqlen=seqlen) for b in range(len(dec.blocks))]


# -----------------------------------------------------------------------------------------
# Similar attention heads (second-moment paper, Sec. 3.2.2 and Algorithm 1)


def attention_maps(blk: pp.Attention, h: Tensor, ctx: pp.Context) -> Tensor:
    """Every head's attention probabilities softmax(q k^T / sqrt(hd)) (B, nh, T, T), fp32."""
    q, k, _ = blk.qkv(h, ctx)
    if k.shape[1] != q.shape[1]:  # GQA: each query head reads its group's keys
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    T = h.shape[1]
    allowed = ctx.attn_mask if ctx.attn_mask is not None else torch.ones(
        T, T, dtype=torch.bool, device=h.device).tril()
    logits = q.float() @ k.float().transpose(-1, -2) / math.sqrt(blk.head_dim)  # (B, nh, T, T)
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1)


def js_distance_sums(p: Tensor, mask: Tensor) -> Tensor:
    """Eq. (1) before the mean: sum over real query rows of sqrt(JS(P_i || P_j)), (nh, nh)."""
    # JS(P, Q) = H(M) - (H(P) + H(Q)) / 2 with M = (P + Q) / 2 and H a row's entropy (nats).
    entropy = lambda t: -torch.special.xlogy(t, t).sum(-1)  # (..., T, T) -> (..., T)
    h = entropy(p)  # (B, nh, T)
    rows = mask[:, None, :].float()  # (B, 1, T) only real tokens' rows count
    nh = p.shape[1]
    d = p.new_zeros(nh, nh)
    for i in range(nh):  # head i against heads i.., so one (B, nh, T, T) temporary at a time
        js = entropy((p[:, i:i + 1] + p[:, i:]) / 2) - (h[:, i:i + 1] + h[:, i:]) / 2  # (B, nh - i, T)
        d[i, i:] = (js.clamp(min=0).sqrt() * rows).sum((0, 2))  # clamp: rounding can dip below 0
    return d.triu(1) + d.triu(1).T  # symmetric, 0 on the diagonal


def similar_heads(div: Tensor, tau: float) -> Tensor:
    """Algorithm 1: from each pair of heads closer than tau, one head becomes a candidate (nh,) bool."""
    close = (div < tau).tolist()  # (nh, nh): pruning-time bookkeeping on the host
    n = len(close)
    candidate = [False] * n
    for i in range(n):
        for j in range(n):
            if i != j and close[i][j] and not candidate[i] and not candidate[j]:
                candidate[i] = True  # i goes, j stays: a group of k alike heads keeps at least one
    return torch.tensor(candidate, device=div.device)


# -----------------------------------------------------------------------------------------
# Scores, one per pruning unit (head or channel); higher = keep


def per_unit(channel_scores: Tensor, blk: pp.Block, reduce: Callable = torch.sum) -> Tensor:
    """Channel scores (Cz,) -> unit scores: a head reduces over its channels."""
    return reduce(channel_scores.view(-1, blk.unit), dim=-1)


def wanda_sp_scores(blk: pp.Block, st: Stats) -> Tensor:
    """Wanda-sp: s_j = ||X_j||_2 * sum_i |W_ij| at the output projection; a head sums its channels."""
    return per_unit(st.z_sq.sqrt() * blk.out.weight.float().abs().sum(0), blk)


def flap_scores(blk: pp.Block, st: Stats, square_attention: bool = False) -> Tensor:
    """FLAP's WIFV: s_j = Var(X_j) * ||W[:, j]||^2, standardized (s - mean(s)) / std(s) within the block."""
    s = st.var * blk.out.weight.float().square().sum(0)
    # FLAP's own code squares o_proj's scores again; the PP authors' FLAP, whose numbers PP reports, does not.
    if square_attention and isinstance(blk, pp.Attention):
        s = s.square()
    # Standardized so that one ranking can set heads against channels of every layer; a head is its channels' mean.
    return per_unit((s - s.mean()) / s.std(), blk, torch.mean)


# Heads whose attention maps are closer than this (mean JS distance, eq. 1) are "alike"; the
# paper draws its head graphs at 0.20 (Fig. 3) and prunes LLaMA-7B's heads with 0.16-0.19 (Table 2).
SIMILARITY_TAU = 0.2


def second_moment_scores(blk: pp.Block, st: Stats) -> Tensor:
    """Second-moment score M_j = ||B_j||^2 * A_j^T Sigma A_j of the depth-2 module B act(A x)."""
    b_norm = blk.out.weight.float().square().sum(0)  # ||B_j||^2 (Cz,)
    if isinstance(blk, pp.Attention):
        # Appendix B.1: a head is W_O^h W_V^h x~ on the attention-mixed x~, so A_j^T Sigma A_j = E[z_j^2].
        scores = per_unit(b_norm * st.z_sq / st.n, blk)
        if st.head_div is None:
            return scores
        # Sec. 3.2.2: alike heads go before any other; lifting the others above them keeps each group's order.
        candidate = similar_heads(st.head_div / st.head_rows, SIMILARITY_TAU)
        return scores + (~candidate) * (scores.max() - scores.min() + 1)

    sigma = st.h_gram / st.n  # (C+1, C+1) E[x x^T] of x = [h, 1], uncentered

    def moment(lin: pp.Linear) -> Tensor:
        """A_j^T Sigma A_j for every row j of A = [W | b] (the bias meets the constant 1)."""
        bias = lin.weight.new_zeros(len(lin.weight)) if lin.bias is None else lin.bias
        a = torch.cat([lin.weight, bias[:, None]], dim=1).float()  # (I, C+1)
        return ((a @ sigma) * a).sum(1)

    act_score = 0.5 * b_norm * moment(blk.w1)  # 1/2: a ReLU-like activation halves the moment (eq. 3)
    if blk.w3 is None:
        return act_score
    # Appendix B.2: a gated W_D (W_U x * act(W_G x)) scores as W_D act(W_G x)'s score times W_D W_U x's.
    return act_score * (b_norm * moment(blk.w3))


# -----------------------------------------------------------------------------------------
# Gradient scores: LLM-Pruner and LoRAPrune without their LoRA fine-tuning
#
# First each method's importance of a weight's elements, as its paper writes it (* element-wise,
# juxtaposition a matrix product); then the micro-batched backward pass that calls them.


def taylor_importance(w: Tensor, g: Tensor) -> Tensor:
    """LLM-Pruner's element-wise first-order Taylor importance |W * dL/dW| (out, in), fp32."""
    return (w.float() * g.float()).abs()


def adapter_grads(g: Tensor, a: Tensor, b: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """dL/dB (out, r) and dL/dA (r, in) of a LoRA adapter W + scale * B A, from dL/dW (out, in)."""
    # Chain rule: the adapter adds scale * B A to W, so dL/dB = scale * G A^T, dL/dA = scale * B^T G.
    # LoRAPrune gets them from the adapters' own backward; from G they are the same numbers.
    return scale * g @ a.T, scale * b.T @ g


def lora_gradient(grad_b: Tensor, grad_a: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """LoRAPrune's estimate of dL/dW (out, in) from the adapters: G_B A + B G_A - G_B G_A."""
    return grad_b @ a + b @ grad_a - grad_b @ grad_a


def lora_importance(w: Tensor, grad_b: Tensor, grad_a: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """LoRAPrune's element-wise importance |(W + s B A) * G_hat| (out, in), G_hat its lora_gradient, fp32."""
    return ((w.float() + scale * b @ a) * lora_gradient(grad_b, grad_a, a, b)).abs()


@dataclass(frozen=True)
class WeightScorer:
    """A method's importance of one weight W, split for micro-batches: parts add up `project(G)`,
    linear in G so that the sum is the whole pass's; `finish(sums)` is the importance (out, in)."""

    project: Callable[[Tensor], tuple[Tensor, ...]]
    finish: Callable[[tuple[Tensor, ...]], Tensor]


# A backward pass keeps every layer's activations: about 6.5 MB per token on LLaMA-2-7B in fp16
# (README, *Gradient memory*). 640 tokens per pass keep that near 4 GB beside its 13.5 GB of
# weights, one 24 GB GPU: LLM-Pruner's 10 x 64 tokens in a single pass (which never holds a
# model's worth of gradients), LoRAPrune's 512-token windows one at a time.
GRAD_TOKENS = 640


def default_grad_batch(window: int) -> int:
    """Calibration windows of `window` tokens per backward pass: as many as fit in GRAD_TOKENS."""
    return max(1, GRAD_TOKENS // window)


def sliced_linears(blk: pp.Block) -> list[tuple[str, int]]:
    """(field, axis) of each linear the block slices: a unit's weights are rows (0) or columns (1)."""
    if isinstance(blk, pp.MLP):
        fields = [("w1", 0), ("w3", 0), ("w2", 1)]
    elif blk.group == 1:
        fields = [("wq", 0), ("wk", 0), ("wv", 0), ("wo", 1)]
    else:  # GQA: a k/v head serves several query heads, so k/v stay whole
        fields = [("wq", 0), ("wo", 1)]
    return [(name, axis) for name, axis in fields if getattr(blk, name) is not None]


def gradient_scores(dec: pp.Decoder, ids: Tensor, scorer: Callable[[Tensor], WeightScorer],
                    normalize: bool = False, batch: int | None = None) -> dict[int, Tensor]:
    """Unit scores of every block from the gradient of the mean next-token loss on `ids` (N, T),
    taken `batch` windows per backward pass (default: all at once): a unit sums its weights'
    scores; `normalize` scales each linear's unit scores to unit L2 norm before a block adds them
    up. `scorer(W)` (taylor_scorer, lora_scorer) says how W's gradient becomes its scores."""
    scores: dict[int, Tensor] = {}
    sums: dict[Tensor, tuple[Tensor, ...]] = {}  # leaf -> its projected gradients so far
    blocks = list(dec.blocks)
    parts = ids.split(batch or len(ids))
    n_targets = ids[:, 1:].numel()  # each part's summed loss over this is its share of the mean
    last = False  # whether the running backward pass is the last part's (the hooks read it)

    def reduce(w: Tensor, b: int, axis: int, score: WeightScorer) -> None:
        """Add a weight's projected gradient to its sum the moment it exists, then free the
        gradient; after the last part, fold the sum into the block's unit scores."""
        new = score.project(w.grad)
        w.grad = None  # one weight's full gradient alive at a time, unless a projection is the gradient
        if w in sums:
            for acc, x in zip(sums[w], new):
                acc.add_(x)
        else:
            sums[w] = new
        if last:
            s = per_unit(score.finish(sums.pop(w)).sum(1 - axis), dec.blocks[b])  # (units,)
            scores[b] += s / s.norm() if normalize else s

    for b, blk in enumerate(dec.blocks):
        scores[b] = torch.zeros(blk.out.weight.shape[1] // blk.unit, device=pp.block_device(blk))
        leaves = {}
        for name, axis in sliced_linears(blk):
            lin = getattr(blk, name)
            w = lin.weight.detach().requires_grad_()  # a leaf on the same storage: no copy
            w.register_post_accumulate_grad_hook(partial(reduce, b=b, axis=axis, score=scorer(lin.weight)))
            leaves[name] = lin._replace(weight=w)
        blocks[b] = replace(blk, **leaves)
    graded = replace(dec, blocks=blocks)
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        logits = pp.run(graded, part, grad=True)  # (n, T, V)
        targets = part[:, 1:].flatten().to(logits.device)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, reduction="sum") / n_targets
        del logits  # the graph keeps what the backward needs
        loss.backward()
    return scores


def taylor_scorer(w: Tensor) -> WeightScorer:
    """LLM-Pruner's scorer: parts add up the gradient G itself, then taylor_importance(W, G)."""
    # fp32 sums, lest bf16/fp16 round small parts away; a model's worth of them only with several parts.
    return WeightScorer(project=lambda g: (g.float(),), finish=lambda s: taylor_importance(w, *s))


def taylor_scores(dec: pp.Decoder, ids: Tensor, batch: int | None = None) -> dict[int, Tensor]:
    """LLM-Pruner (element-wise first-order Taylor): a unit sums |W * dL/dW| over its weights."""
    # Its second-order variant subtracts 1/2 W^2 H_ii with the Hessian's diagonal H_ii taken from
    # per-sample squared gradients (a Fisher estimate): one backward pass per calibration sample.
    return gradient_scores(dec, ids, taylor_scorer, batch=batch)


def lora_adapter(w: Tensor, generator: torch.Generator, rank: int) -> tuple[Tensor, Tensor]:
    """A fresh rank-r adapter on W as LoRA initializes it: A (r, in) ~ U(+-1/sqrt(in)) (nn.Linear's), B = 0."""
    out_f, in_f = w.shape
    a = ((torch.rand(rank, in_f, generator=generator) * 2 - 1) / math.sqrt(in_f)).to(w.device)
    return a, torch.zeros(out_f, rank, device=w.device)


def lora_scorer(w: Tensor, generator: torch.Generator, rank: int = 8, scale: float = 2.0) -> WeightScorer:
    """LoRAPrune's scorer through a fresh adapter on W: parts add up only the adapters' small
    gradients (r x (out + in)), as LoRA's micro-batches would, then lora_importance."""
    a, b = lora_adapter(w, generator, rank)
    return WeightScorer(project=lambda g: adapter_grads(g.float(), a, b, scale),
                        finish=lambda s: lora_importance(w, *s, a, b, scale))


def loraprune_scores(dec: pp.Decoder, ids: Tensor, rank: int = 8, alpha: float = 16.0,
                     seed: int = 0, batch: int | None = None) -> dict[int, Tensor]:
    """LoRAPrune, one shot: |(W + s B A) * G_hat| summed per unit, G_hat estimated from rank-8 adapters."""
    scorer = partial(lora_scorer, generator=torch.Generator().manual_seed(seed), rank=rank,
                     scale=alpha / rank)  # scale 2, as LoRAPrune's LoRA
    return gradient_scores(dec, ids, scorer, normalize=True, batch=batch)


# -----------------------------------------------------------------------------------------
# The methods


@dataclass(frozen=True)
class Method:
    """A static baseline: where its unit scores come from, and whether it uses FLAP's extra steps."""

    score: Callable[[pp.Block, Stats], Tensor] | None = None  # from calibration statistics, or
    gradient: Callable[..., dict[int, Tensor]] | None = None  # from gradients: (dec, ids, batch)
    windows: tuple[int, int] = (0, 0)  # (samples, tokens) of the gradient pass's calibration windows
    similarity: bool = False  # statistics also compare attention heads' maps
    adaptive: bool = False  # one global ranking across layers and modules (else uniform per layer)
    compensate_bias: bool = False  # add the pruned channels' mean output back as a bias


METHODS = {
    "wanda-sp": Method(wanda_sp_scores),
    "flap": Method(flap_scores, adaptive=True, compensate_bias=True),
    "second-moment": Method(second_moment_scores, similarity=True),
    # As the PP authors ran them: 10 C4 windows of 64 tokens (LLM-Pruner), of 512 (LoRAPrune).
    "llm-pruner": Method(gradient=taylor_scores, windows=(10, 64)),
    "loraprune": Method(gradient=loraprune_scores, windows=(10, 512)),
}


def unit_scores(dec: pp.Decoder, method: Method, stats: list[Stats] | None = None,
                ids: Tensor | None = None, grad_batch: int | None = None) -> dict[int, Tensor]:
    """Every block's unit scores (higher = keep): from `stats`, or from the gradients on `ids`,
    `grad_batch` windows per backward pass (default: as many as fit in GRAD_TOKENS tokens)."""
    if method.gradient is not None:
        return method.gradient(dec, ids, batch=grad_batch or default_grad_batch(ids.shape[1]))
    return {b: method.score(blk, stats[b]) for b, blk in enumerate(dec.blocks)}


# -----------------------------------------------------------------------------------------
# Choosing units, and pruning for good


def unit_cost(blk: pp.Block, seqlen: int) -> float:
    """Multiply-adds per token saved by removing one unit of the block."""
    weights = len(sliced_linears(blk)) * blk.out.weight.shape[0]  # C per sliced matrix (C: the hidden size)
    attention = seqlen * blk.unit if isinstance(blk, pp.Attention) else 0  # q.k and attn.v, causal
    return weights * blk.unit + attention


def adaptive_keep(dec: pp.Decoder, scores: dict[int, Tensor], n_keep: dict[int, int],
                  seqlen: int, mlp_multiple: int = 1) -> dict[int, Tensor]:
    """FLAP's AL-AM search: one ranking of all units of all blocks, kept best-first within budget."""
    blocks = list(scores)
    costs = {b: unit_cost(dec.blocks[b], seqlen) for b in blocks}
    budget = sum(n_keep[b] * costs[b] for b in blocks)  # what the uniform ratio keeps, in multiply-adds
    # One ranking of every unit of every pruned block, on one device (a model may span several GPUs).
    flat = torch.cat([scores[b].to(scores[blocks[0]].device) for b in blocks])
    # Integer costs keep the running sum exact, so ratio 0 keeps every unit.
    cost = torch.cat([torch.full(scores[b].shape, costs[b], dtype=torch.long) for b in blocks]).to(flat.device)
    order = flat.argsort(descending=True)
    kept = torch.zeros_like(flat, dtype=torch.bool)
    kept[order[cost[order].cumsum(0) <= budget]] = True
    keep = {}
    for b, mine in zip(blocks, kept.split([len(scores[b]) for b in blocks])):
        n = max(1, int(mine.sum()))  # at least one unit per block: no zero-head attention
        if isinstance(dec.blocks[b], pp.MLP):  # kept MLP channels rounded as for every method
            n = pp.round_up(n, mlp_multiple, len(mine))
        keep[b] = pp.top_units(scores[b], n)  # a block's kept units are its best ones
    return keep


def compensate_bias(blk: pp.Block, kept: pp.Block, st: Stats) -> pp.Block:
    """FLAP's bias compensation: add the pruned channels' mean contribution W[:, pruned] mean(z)."""
    pruned = torch.ones(len(st.z_sum), dtype=torch.bool, device=st.z_sum.device)
    pruned[kept.kept] = False
    if not pruned.any():
        return kept
    w = blk.out.weight
    extra = (w[:, pruned].float() @ st.mean[pruned]).to(w.dtype)  # (C,)
    out = kept.out._replace(bias=extra if kept.out.bias is None else kept.out.bias + extra)
    return replace(kept, **{out_field(kept): out})


def prune_static(dec: pp.Decoder, method: Method, cfg: pp.PPConfig, scores: dict[int, Tensor],
                 stats: list[Stats] | None = None) -> pp.Decoder:
    """A copy of `dec` whose pruned layers are sliced for good at cfg.ratio, by the method's
    `unit_scores` (and its `stats`, for FLAP's allocation and bias)."""
    n_keep = pp.kept_counts(dec, cfg)
    scores = {b: scores[b] for b in n_keep}
    if method.adaptive:
        keep = adaptive_keep(dec, scores, n_keep, stats[0].seqlen, cfg.mlp_multiple)
    else:
        keep = {b: pp.top_units(s, n_keep[b]) for b, s in scores.items()}  # PP's counts, per block
    blocks = list(dec.blocks)
    for b, units in keep.items():
        blocks[b] = dec.blocks[b].keep(units)
        if method.compensate_bias:
            blocks[b] = compensate_bias(dec.blocks[b], blocks[b], stats[b])
    return replace(dec, blocks=blocks)


# -----------------------------------------------------------------------------------------
# Second-moment's pre-pruning recovery (Sec. 3.3, Algorithms 2-4): optional, off by default


def out_field(blk: pp.Block) -> str:
    """Name of the block's output projection field."""
    return "wo" if isinstance(blk, pp.Attention) else "w2"


def first_level(blk: pp.Block) -> list[str]:
    """Names of the block's first-level linears (the depth-2 module's A): q/k/v, or gate/up."""
    names = ["wq", "wk", "wv"] if isinstance(blk, pp.Attention) else ["w1", "w3"]
    return [name for name in names if getattr(blk, name) is not None]


def correction_sums(x_hat: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """G = X^T X and K = X^T (x - x_hat) summed over tokens, X = [x_hat, 1] (N, C+1), fp32."""
    xh = x_hat.reshape(-1, x_hat.shape[-1]).float()
    diff = x.reshape(-1, x.shape[-1]).float() - xh  # (N, C)
    xh = torch.cat([xh, xh.new_ones(len(xh), 1)], dim=1)
    return xh.T @ xh, xh.T @ diff


def solve_correction(g: Tensor, k: Tensor, damp: float) -> Tensor:
    """T (C+1, C) of the least-squares fit x - x_hat ~ [x_hat, 1] T, damped (ridge) for stability."""
    lam = damp * g.diagonal().mean()  # as GPTQ/SparseGPT damp their Hessians (1% of its mean diagonal)
    return torch.linalg.solve(g + lam * torch.eye(len(g), device=g.device), k)


def corrected(lin: pp.Linear, t: Tensor) -> pp.Linear:
    """The linear refit so that its output on x_hat fits its dense output on x (least squares)."""
    # lin(x) ~ lin(x_hat + x_hat T_x + T_1) = x_hat (W + W T_x^T)^T + (b + W T_1): the solution of
    # min ||[x_hat, 1] [W~ | b~]^T - lin(x)||^2 (Algorithm 2's W~ = (X^T X)^-1 X^T Y), written as a
    # correction of W, so that the damping pulls towards W and x_hat = x returns W itself.
    w = lin.weight.float()
    t_x, t_1 = t[:-1], t[-1]
    bias = w @ t_1 if lin.bias is None else lin.bias.float() + w @ t_1
    return pp.Linear((w + w @ t_x.T).to(lin.weight.dtype), bias.to(lin.weight.dtype))


def recover_and_prune(dec: pp.Decoder, blk: pp.Block, streams: list[list], n_keep: int,
                      damp: float) -> pp.Block:
    """Algorithms 3-4 on one block (first level refit, then the output projection), then its
    second-moment pruning on the inputs the pruned model gives it."""
    def sums(pairs):
        g, k = zip(*pairs)
        return sum(g), sum(k)

    inputs = [(pp.block_input(dec, blk, x), pp.block_input(dec, blk, x_hat), ctx) for x, x_hat, ctx in streams]
    t = solve_correction(*sums(correction_sums(h_hat, h) for h, h_hat, _ in inputs), damp)
    fixed = replace(blk, **{name: corrected(getattr(blk, name), t) for name in first_level(blk)})
    pairs, stat, compare = [], None, SIMILARITY_SAMPLES
    for h, h_hat, ctx in inputs:
        z, z_hat = blk.inner(h, ctx), fixed.inner(h_hat, ctx)  # dense, and refit on the pruned input
        pairs.append(correction_sums(z_hat, z))
        stat = add_sums(stat, stat_sums(fixed, h_hat, z_hat, ctx, compare))
        compare = max(0, compare - len(h))
    fixed = replace(fixed, **{out_field(blk): corrected(blk.out, solve_correction(*sums(pairs), damp))})
    st = Stats(*stat, seqlen=streams[0][0].shape[1])
    return fixed.keep(pp.top_units(second_moment_scores(fixed, st), n_keep))


@torch.no_grad()
def prune_recovered(dec: pp.Decoder, cfg: pp.PPConfig, batches: Iterable[Tensor], damp: float = 0.01,
                    progress: Callable[[list], Iterable] = iter) -> pp.Decoder:
    """Second-moment with pre-pruning recovery at cfg.ratio: module by module, each block is refit
    to its dense outputs on the inputs the already pruned blocks give it, then scored and pruned.
    `progress` wraps the list of blocks (e.g. a progress bar: the refit is slow)."""
    n_keep = pp.kept_counts(dec, cfg)
    streams = []  # per calibration batch: [dense residual stream x, pruned stream x_hat, context]
    for ids in batches:
        ids = ids.to(dec.embed.device)
        mask = torch.ones_like(ids, dtype=torch.bool)
        ctx = pp.make_context(dec, mask, pp.positions(mask), padded=False)
        x = pp.embed(dec, ids, ctx)
        streams.append([x, x, ctx])
    blocks = list(dec.blocks)
    for b, blk in enumerate(progress(dec.blocks)):
        device = pp.block_device(blk)  # a model split across GPUs: the streams follow the blocks
        streams = [[x.to(device), x_hat.to(device), ctx.to(device)] for x, x_hat, ctx in streams]
        if b in n_keep:
            blocks[b] = recover_and_prune(dec, blk, streams, n_keep[b], damp)
        for s in streams:
            x, x_hat, ctx = s
            s[0] = pp.add_residual(dec, blk, x, blk.inner(pp.block_input(dec, blk, x), ctx))
            if x_hat is x and blocks[b] is blk:  # nothing pruned yet: the two streams are one
                s[1] = s[0]
            else:
                small = blocks[b]
                s[1] = pp.add_residual(dec, small, x_hat, small.inner(pp.block_input(dec, small, x_hat), ctx))
    return replace(dec, blocks=blocks)


# -----------------------------------------------------------------------------------------
# GRIFFIN (Dong et al., COLM 2024): the prompt's own top neurons, for generation only


def griffin_scores(z: Tensor, mask: Tensor) -> Tensor:
    """GRIFFIN's neuron scores (Cz,) from a prompt's MLP states z (B, T, Cz): each token's row
    divided by its L2 norm over the neurons, then each neuron's L2 norm over the real tokens."""
    # GRIFFIN, Sec. 3: z_bar[t] = z[t] / ||z[t]||_2, s_j = ||z_bar[:, j]||_2. Over a batch the
    # tokens of every prompt count alike: one structure per batch, as PP's.
    norms = torch.linalg.vector_norm(z, dim=-1, keepdim=True, dtype=torch.float32)  # (B, T, 1)
    s, _ = pp.square_sums(z / norms.clamp(min=torch.finfo(torch.float32).tiny), mask)  # (T, Cz)
    return s.sum(0).sqrt()


def griffin_counts(dec: pp.Decoder, cfg: pp.PPConfig) -> dict[int, int]:
    """Neurons GRIFFIN keeps per pruned MLP block: PP's kept channels at cfg.ratio, less as many as
    hold the weights of the heads PP prunes before it (GRIFFIN's attention stays dense), rounded up
    to cfg.mlp_multiple: both then decode about the same weights per token."""
    n_keep = pp.kept_counts(dec, cfg)
    counts = {}
    for b, n in n_keep.items():
        mlp, attn = dec.blocks[b], dec.blocks[b - 1]
        if not isinstance(mlp, pp.MLP):
            continue
        C, n_channels = mlp.out.weight.shape
        # A pruned head drops q and o slices (and k, v without GQA); a channel is a row of each MLP linear.
        head_weights = (2 if attn.group > 1 else 4) * attn.head_dim * C
        pruned_heads = attn.out.weight.shape[1] // attn.unit - n_keep[b - 1]
        channels = math.ceil(n - pruned_heads * head_weights / (len(pp.block_linears(mlp)) * C))
        if channels < 1:
            raise ValueError(f"GRIFFIN at ratio {cfg.ratio}: the heads PP prunes in layer {b // 2} hold more "
                             "weights than the MLP channels PP keeps, so no neuron count matches PP's decoding")
        counts[b] = pp.round_up(channels, cfg.mlp_multiple, n_channels)
    return counts


def griffin_prefill(dec: pp.Decoder, cfg: pp.PPConfig) -> pp.PrefillFn:
    """GRIFFIN as a prefill function (`pp.prefill`'s): the prompt runs dense into the cache, and
    each pruned MLP block keeps its top neurons by the prompt's states for every later token."""
    counts = griffin_counts(dec, cfg)

    def choose(b: int, blk: pp.Block, h: Tensor, z: Tensor, ctx: pp.Context) -> pp.Block:
        if b not in counts:
            return blk
        scores = griffin_scores(z, ctx.mask)
        return blk.keep(pp.top_units(scores, counts[b]))

    return partial(pp.prefill, dec, choose=choose)
