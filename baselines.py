"""Static structured-pruning baselines for Probe Pruning: Wanda-sp, FLAP and second-moment.

Each calibrates once, chooses the kept attention heads and MLP channels once, and slices the
weights for good, so it runs the same forward as PP (`probe_prune.run`) on smaller matrices.
They prune what PP prunes (heads with their o_proj columns, MLP channels), in the same layers
(the first `PPConfig.dense_layers` stay dense), at the same ratio, so a table compares metrics.

- Wanda-sp, the structured Wanda (Sun et al., ICLR 2024) that FLAP and PP compare against.
- FLAP (An et al., AAAI 2024): its default variant, WIFV metric + AL-AM adaptive structure
  search + bias compensation.
- Second-moment (Li, Dong, Lei 2024, "Greedy Output Approximation", arXiv 2407.19126): the
  second-moment channel score of depth-2 modules, uniform per layer; no weight reconstruction.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
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
    seqlen: int  # tokens per calibration sample (for FLAP's cost of a head)

    @property
    def mean(self) -> Tensor:
        """Mean of z per channel (Cz,)."""
        return self.z_sum / self.n

    @property
    def var(self) -> Tensor:
        """Variance of z per channel over calibration tokens (Cz,)."""
        return (self.z_sq / self.n - self.mean.square()).clamp(min=0)


def collect_stats(dec: pp.Decoder, batches: Iterable[pp.Batch]) -> list[Stats]:
    """One dense pass over calibration batches, accumulating every block's Stats (fp32)."""
    acc: dict[int, list] = {}

    def observe(b: int, blk: pp.Block, h: Tensor, z: Tensor, ctx: pp.Context) -> None:
        m = ctx.mask.reshape(-1)
        zf = z.reshape(-1, z.shape[-1])[m].float()  # (N, Cz) real tokens only
        gram = None
        if isinstance(blk, pp.MLP):  # the constant 1 makes w1/w3 biases one more column
            hf = torch.cat([h.reshape(-1, h.shape[-1])[m].float(), zf.new_ones(len(zf), 1)], dim=1)
            gram = hf.T @ hf
        new = [m.sum(), zf.sum(0), zf.square().sum(0), gram]
        acc[b] = new if b not in acc else [a + x if a is not None else None for a, x in zip(acc[b], new)]

    seqlen = 0
    for batch in batches:
        ids, mask = batch if isinstance(batch, (tuple, list)) else (batch, None)
        seqlen = max(seqlen, ids.shape[1])
        pp.run(dec, ids, mask, observe=observe)
    return [Stats(*acc[b], seqlen=seqlen) for b in range(len(dec.blocks))]


# -----------------------------------------------------------------------------------------
# Scores, one per pruning unit (head or channel); higher = keep


def per_unit(channel_scores: Tensor, blk: pp.Block, reduce: Callable = torch.sum) -> Tensor:
    """Channel scores (Cz,) -> unit scores: a head reduces over its channels."""
    return reduce(channel_scores.view(-1, blk.unit), dim=-1)


def wanda_sp_scores(blk: pp.Block, st: Stats) -> Tensor:
    """Wanda-sp: s_j = ||X_j||_2 * sum_i |W_ij| at the output projection; a head sums its channels."""
    return per_unit(st.z_sq.sqrt() * blk.out.weight.float().abs().sum(0), blk)


def flap_scores(blk: pp.Block, st: Stats) -> Tensor:
    """FLAP's WIFV: fluctuation Var(X_j) * ||W[:, j]||^2, standardized within the block."""
    s = st.var * blk.out.weight.float().square().sum(0)
    if isinstance(blk, pp.Attention):
        s = s.square()  # as FLAP does for o_proj, before standardizing
    # Standardizing each block's scores (zero mean, unit std) is what lets FLAP rank attention
    # heads against MLP channels of every layer in one list; a head is the mean of its channels.
    return per_unit((s - s.mean()) / s.std(), blk, torch.mean)


def second_moment_scores(blk: pp.Block, st: Stats) -> Tensor:
    """Second-moment score M_j = ||B_j||^2 * A_j^T Sigma A_j of the depth-2 module B act(A x)."""
    b_norm = blk.out.weight.float().square().sum(0)  # ||B_j||^2 (Cz,)
    if isinstance(blk, pp.Attention):
        # A head is (W_O^h)(W_V^h x~) on the attention-mixed input x~; A_j^T Sigma_x~ A_j is the
        # second moment of the j-th attention output, i.e. E[z_j^2] at o_proj's input.
        return per_unit(b_norm * st.z_sq / st.n, blk)

    sigma = st.h_gram / st.n  # (C+1, C+1) E[x x^T] of x = [h, 1], uncentered

    def moment(lin: pp.Linear) -> Tensor:
        """A_j^T Sigma A_j for every row j of A = [W | b] (the bias meets the constant 1)."""
        bias = lin.weight.new_zeros(len(lin.weight)) if lin.bias is None else lin.bias
        a = torch.cat([lin.weight, bias[:, None]], dim=1).float()  # (I, C+1)
        return ((a @ sigma) * a).sum(1)

    act_score = 0.5 * b_norm * moment(blk.w1)  # 1/2: a ReLU-like activation halves the moment
    if blk.w3 is None:
        return act_score
    return act_score * (b_norm * moment(blk.w3))  # gated: product of the two branches' scores


@dataclass(frozen=True)
class Method:
    """A static baseline: its unit score, and whether it uses FLAP's two extra steps."""

    score: Callable[[pp.Block, Stats], Tensor]
    adaptive: bool = False  # one global ranking across layers and modules (else uniform per layer)
    compensate_bias: bool = False  # add the pruned channels' mean output back as a bias


METHODS = {
    "wanda-sp": Method(wanda_sp_scores),
    "flap": Method(flap_scores, adaptive=True, compensate_bias=True),
    "second-moment": Method(second_moment_scores),
}


# -----------------------------------------------------------------------------------------
# Choosing units, and pruning for good


def unit_cost(blk: pp.Block, seqlen: int) -> float:
    """Multiply-adds per token saved by removing one unit of the block."""
    sliced = [blk.w1, blk.w3, blk.w2] if isinstance(blk, pp.MLP) else (
        [blk.wq, blk.wk, blk.wv, blk.wo] if blk.group == 1 else [blk.wq, blk.wo])
    weights = sum(min(lin.weight.shape) for lin in sliced if lin is not None)  # C per matrix
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
    return replace(kept, **{"wo" if isinstance(kept, pp.Attention) else "w2": out})


def prune_static(dec: pp.Decoder, method: Method, cfg: pp.PPConfig, stats: list[Stats]) -> pp.Decoder:
    """A copy of `dec` whose pruned layers are sliced for good by a static method at cfg.ratio."""
    n_keep = pp.kept_counts(dec, cfg)
    scores = {b: method.score(dec.blocks[b], stats[b]) for b in n_keep}
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
