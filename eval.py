"""WikiText-2 perplexity and wall time of dense and pruned models, one row per method and ratio.

    python eval.py --ratio 0.4                       # bundled SmolLM2-135M, hub WikiText-2 and C4
    python eval.py --data ../shared/data/wikitext-2-raw/wiki.test.raw \\
                   --calib ../shared/data/c4/c4_sample.jsonl --ratio 0.2 0.4 --json results.json

Protocol: the test text is tokenized once and cut into sequential, non-overlapping windows of
--seqlen tokens; perplexity = exp(mean next-token NLL over all windows). Wall time covers
everything a method does per batch up to the logits (PP: probe, scoring, slicing, the full
forward and the LM head; not the loss), with the first batch untimed as a warm-up.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import transformers
from tqdm import tqdm

import baselines
import probe_prune as pp

METHODS = ("dense", "pp", "fullbatch") + tuple(baselines.METHODS)
HUB_DATA = {  # name -> (dataset, config or data file, split)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test"),
    "c4": ("allenai/c4", "en/c4-train.00000-of-01024.json.gz", "train"),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage dump) and exit with status 2."""

    def error(self, message):
        raise UsageError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = Parser(description="Perplexity and timing of Probe Pruning against the dense model.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="hub id, local folder or .gguf file (default: bundled SmolLM2-135M GGUF, "
                        f"else {pp.HUB_DEFAULT})")
    p.add_argument("--ratio", type=float, nargs="+", default=[0.4],
                   help="fraction of heads and MLP channels pruned, in [0, 1); several allowed")
    p.add_argument("--method", nargs="+", default=["dense", "pp"], choices=METHODS + ("all",),
                   help="methods to run; 'all' runs every one")
    p.add_argument("--data", default="wikitext2",
                   help="'wikitext2' (hub test split) or a local .txt/.raw/.jsonl/.parquet file")
    p.add_argument("--calib", default="c4",
                   help="'c4' or 'wikitext2' (hub) or a local .txt/.raw/.jsonl/.parquet file")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=1024, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=20, help="windows per batch")
    p.add_argument("--max-batches", type=int, default=None, help="evaluate only the first N batches")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=("auto",) + tuple(DTYPES),
                   help="auto = float16 on CUDA, float32 on CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)
    if "all" in args.method:
        args.method = list(METHODS)
    for r in args.ratio:
        if not 0 <= r < 1:
            raise UsageError(f"--ratio must be in [0, 1), got {r}")
    for name in ("nsamples", "seqlen", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer")
    if args.max_batches is not None and args.max_batches < 1:
        raise UsageError("--max-batches must be a positive integer")
    for name in ("data", "calib"):
        source = getattr(args, name)
        if source not in HUB_DATA and not os.path.isfile(source):
            raise UsageError(f"--{name}: no such file: {source} (or use one of: {', '.join(HUB_DATA)})")
    if args.model is not None and args.model.endswith(".gguf") and not os.path.isfile(args.model):
        raise UsageError(f"--model: no such GGUF file: {args.model}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} asked for, but CUDA is not available here")
    if args.dtype == "auto":
        args.dtype = "float16" if args.device.startswith("cuda") else "float32"
    return args


# -----------------------------------------------------------------------------------------
# Data


def read_documents(source: str) -> list[str]:
    """Documents from a hub name (see HUB_DATA) or a local text, JSONL or Parquet file."""
    if source in HUB_DATA:
        import datasets

        name, config, split = HUB_DATA[source]
        try:
            if config.endswith(".json.gz"):
                rows = datasets.load_dataset(name, data_files=config, split=split)
            else:
                rows = datasets.load_dataset(name, config, split=split)
        except Exception as e:  # offline, or the hub refused: say so in one line
            raise UsageError(f"could not load '{source}' from the Hugging Face hub ({type(e).__name__}); "
                             "pass a local file instead") from e
        return list(rows["text"])
    if source.endswith(".jsonl"):
        with open(source, encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f if line.strip()]
    if source.endswith(".parquet"):
        import datasets

        return list(datasets.load_dataset("parquet", data_files=source, split="train")["text"])
    with open(source, encoding="utf-8-sig") as f:  # plain text: one document
        return [f.read()]


def eval_windows(tokenizer, docs: list[str], seqlen: int) -> torch.Tensor:
    """Tokenize the joined text once; sequential non-overlapping windows (N, seqlen)."""
    ids = tokenizer("\n\n".join(docs), return_tensors="pt").input_ids[0]
    n = ids.numel() // seqlen
    if n == 0:
        raise UsageError(f"the evaluation text has {ids.numel()} tokens, fewer than --seqlen {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def calib_windows(tokenizer, docs: list[str], n: int, seqlen: int, seed: int) -> torch.Tensor:
    """n random windows of seqlen tokens, each from a random document longer than that (C4 style)."""
    rng = random.Random(seed)
    encoded = [tokenizer(d, return_tensors="pt").input_ids[0] for d in docs]
    long_docs = [ids for ids in encoded if ids.numel() > seqlen]
    if not long_docs:
        raise UsageError(f"no calibration document is longer than --seqlen {seqlen} tokens")
    windows = []
    for _ in range(n):
        ids = rng.choice(long_docs)
        start = rng.randrange(ids.numel() - seqlen)
        windows.append(ids[start: start + seqlen])
    return torch.stack(windows)


# -----------------------------------------------------------------------------------------
# Measurement


@dataclass
class Row:
    """One result line: a method at a ratio (the JSON keys are these field names)."""

    method: str
    ratio: float
    ppl: float
    seconds: float  # wall time of the timed batches
    tokens_per_s: float
    speedup: float | None = None  # dense seconds / these seconds, same run
    probe_flops_pct: float | None = None  # probe FLOPs as % of the dense forward's
    prr: float | None = None  # PPL increase per unit of relative runtime reduction


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so wall-clock times are real."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def progress(batches: list[torch.Tensor], desc: str):
    """A progress bar over batches, on stderr."""
    return tqdm(batches, desc=desc, leave=False, file=sys.stderr)


def measure(logits_fn: Callable[[torch.Tensor], torch.Tensor], batches: list[torch.Tensor],
            device: str, desc: str) -> tuple[float, float, int]:
    """Perplexity over all batches, and seconds and tokens of the timed ones (all but the first)."""
    nll, n_pred, seconds, timed_tokens = 0.0, 0, 0.0, 0
    for i, ids in enumerate(progress(batches, desc)):
        ids = ids.to(device)
        synchronize(device)
        start = time.perf_counter()
        logits = logits_fn(ids)
        synchronize(device)
        if i > 0 or len(batches) == 1:  # the first batch warms up kernels and caches
            seconds += time.perf_counter() - start
            timed_tokens += ids.numel()
        nll += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                               reduction="sum").item()
        n_pred += ids[:, 1:].numel()
    return math.exp(nll / n_pred), seconds, timed_tokens


def print_table(rows: list[Row]) -> None:
    """The rows as an aligned plain-text table."""
    header = (f"{'method':<14} {'ratio':>5} {'ppl':>9} {'seconds':>8} {'tokens/s':>9} {'speedup':>7} "
              f"{'PRR':>8} {'probe FLOPs':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        speedup = "" if r.speedup is None else f"{r.speedup:.2f}x"
        prr = "n/a" if r.prr is None else f"{r.prr:.1f}"
        probe = "" if r.probe_flops_pct is None else f"{r.probe_flops_pct:.2f}%"
        print(f"{r.method:<14} {r.ratio:>5.2f} {r.ppl:>9.3f} {r.seconds:>8.2f} {r.tokens_per_s:>9.1f} "
              f"{speedup:>7} {prr if r.method != 'dense' else '':>8} {probe:>11}")


def calibration_batches(args, tokenizer) -> list[torch.Tensor]:
    """The calibration windows, batched and on the device; every method sees the same ones."""
    calib = calib_windows(tokenizer, read_documents(args.calib), args.nsamples, args.seqlen, args.seed)
    print(f"# calibration: {len(calib)} windows of {args.seqlen} tokens from {args.calib} (seed {args.seed})")
    return [b.to(args.device) for b in calib.split(args.batch_size)]


def run_methods(args, model, tokenizer) -> list[Row]:
    """Evaluate every requested method and ratio on the same batches."""
    windows = eval_windows(tokenizer, read_documents(args.data), args.seqlen)
    batches = list(windows.split(args.batch_size))[: args.max_batches]
    n_windows = sum(len(b) for b in batches)
    print(f"# {args.model or pp.default_model()} on {args.device} ({args.dtype}); "
          f"{n_windows} windows x {args.seqlen} tokens, sequential and non-overlapping, "
          f"batch {args.batch_size}; time = batches 2..{len(batches)} (first one warms up)")
    dec = pp.read_weights(model)
    dense_flops = pp.dense_flops(dec, args.batch_size * args.seqlen)

    history, stats = None, None
    if "pp" in args.method or any(m in baselines.METHODS for m in args.method):
        calib = calibration_batches(args, tokenizer)
        if "pp" in args.method:
            history = pp.collect_history(dec, progress(calib, "calibration (PP history)"))
        if any(m in baselines.METHODS for m in args.method):
            stats = baselines.collect_stats(dec, progress(calib, "calibration (baselines)"))

    rows, dense = [], None
    jobs = [("dense", 0.0)] if "dense" in args.method else []
    jobs += [(m, r) for r in args.ratio for m in args.method if m != "dense"]
    for method, ratio in jobs:
        probe_pct = None
        try:
            if method == "dense":
                fn = lambda ids: pp.run(dec, ids)
            elif method in baselines.METHODS:  # static: pruned once, before the timed runs
                pruned = baselines.prune_static(dec, baselines.METHODS[method], pp.PPConfig(ratio), stats)
                fn = lambda ids, pruned=pruned: pp.run(pruned, ids)
            else:
                cfg = pp.PPConfig(ratio) if method == "pp" else pp.PPConfig.full_batch(ratio)
                fn = pp.ProbePruner(model, cfg, history if cfg.use_history else None)
                probe_pct = 100 * pp.probe_flops(dec, cfg, args.batch_size, args.seqlen) / dense_flops
        except ValueError as e:  # e.g. a ratio too high for the layers left to prune
            raise UsageError(str(e)) from e
        ppl, seconds, tokens = measure(fn, batches, args.device, f"{method} {ratio}")
        row = Row(method, ratio, ppl, seconds, tokens / seconds, probe_flops_pct=probe_pct)
        dense = row if method == "dense" else dense
        if dense is not None:
            row.speedup = dense.seconds / seconds
            # PRR (the paper's performance degradation per unit of runtime reduction):
            # (PPL - PPL_dense) / (1 - time / time_dense); undefined when nothing got faster.
            row.prr = (ppl - dense.ppl) / (1 - seconds / dense.seconds) if seconds < dense.seconds else None
        rows.append(row)
        print(f"# done: {method} ratio {ratio}: ppl {ppl:.3f}, {seconds:.2f} s", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    try:
        args = parse_args(argv)
        torch.manual_seed(args.seed)
        transformers.logging.set_verbosity_error()  # keep library chatter out of the results
        try:
            model, tokenizer = pp.load_model(args.model, args.device, DTYPES[args.dtype])
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot load model {args.model or pp.default_model()!r}: {e}".splitlines()[0]) from e
        context = getattr(model.config, "max_position_embeddings", None)
        if context is not None and args.seqlen > context:
            raise UsageError(f"--seqlen {args.seqlen} is beyond the model's context of {context} tokens")
        rows = run_methods(args, model, tokenizer)
    except UsageError as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
