"""WikiText-2 perplexity, zero-shot accuracy and wall time of dense and pruned models, one row
per method and ratio.

    python eval.py --ratio 0.4                       # bundled SmolLM2-135M-Instruct, hub WikiText-2 and C4
    python eval.py --data ../shared/data/wikitext-2-raw/wiki.test.raw \\
                   --calib ../shared/data/c4/c4_sample.jsonl --ratio 0.2 0.4 --json results.json
    python eval.py --tasks all --task-data ../shared/data/zeroshot --limit 200 --no-ppl ...

Perplexity: the test text is tokenized once and cut into sequential, non-overlapping windows of
--seqlen tokens; perplexity = exp(mean next-token NLL over all windows). Wall time covers
everything a method does per batch (PP: probe, scoring, slicing, the full forward), the LM head
and the loss, with the first batch untimed as a warm-up.

Zero-shot (--tasks): the seven commonsense tasks of the paper's table, with the prompts, choices
and scoring of lm-evaluation-harness 0.4.x at 0 shots (`TASKS` below).
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
import transformers
from tqdm import tqdm

import baselines
import probe_prune as pp

GENERATION_ONLY = ("griffin",)  # methods that choose their structure on a prompt: --generate rows only
METHODS = ("dense", "pp", "fullbatch") + tuple(baselines.METHODS) + GENERATION_ONLY
PROBING = ("pp", "fullbatch")
HUB_DATA = {  # name -> (dataset, config or data file, split)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test"),
    "c4": ("allenai/c4", "en/c4-train.00000-of-01024.json.gz", "train"),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_PROMPT_LEN = 128  # --generate's prompt tokens
MLP_MULTIPLE = 64  # kept MLP channels rounded up to a multiple of this (the official code's)
PLOT_FORMATS = (".png", ".pdf", ".svg")  # --plot's file types


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, unless there is none to show (None, [], an unset flag)."""

    def _get_help_string(self, action):
        nothing = action.default is None or action.default is False or action.default == []
        return action.help if nothing else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage dump) and exit with status 2."""

    def error(self, message):
        raise UsageError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options, checked as far as they can be without the model."""
    p = Parser(description="Perplexity, zero-shot accuracy and timing of Probe Pruning against the "
                           "dense model and the baselines.",
               formatter_class=HelpFormatter)
    p.add_argument("--model", default=None,
                   help="hub id, local folder or .gguf file (default: the bundled SmolLM2-135M-Instruct GGUF, "
                        f"else the same model from the hub, {pp.HUB_DEFAULT})")
    p.add_argument("--ratio", type=float, nargs="+", default=[0.4],
                   help="fraction of heads and MLP channels pruned, in [0, 1); several allowed")
    p.add_argument("--method", nargs="+", default=["dense", "pp"], choices=METHODS + ("all",),
                   help="methods to run; 'all' runs every one (griffin: with --generate only)")
    p.add_argument("--data", default="wikitext2",
                   help="'wikitext2' (hub test split) or a local .txt/.raw/.jsonl/.parquet file")
    p.add_argument("--calib", default="c4",
                   help="'c4' or 'wikitext2' (hub) or a local .txt/.raw/.jsonl/.parquet file")
    p.add_argument("--nsamples", type=int, default=128,
                   help="calibration windows (the paper: 2000; 128 keeps a CPU run short)")
    p.add_argument("--seqlen", type=int, default=1024, help="tokens per window")
    p.add_argument("--save-history", default=None, metavar="FILE",
                   help="write PP's historical states, once calibrated, to FILE (safetensors, with the model, "
                        "the positions covered, the dtype and the calibration), for --history to reuse")
    p.add_argument("--history", default=None, metavar="FILE",
                   help="PP: use the historical states of a --save-history FILE instead of calibrating (no "
                        "--calib data needed unless a baseline needs it); refused unless it is this model's "
                        "and covers --seqlen positions")
    p.add_argument("--batch-size", type=int, default=20, help="windows per batch")
    p.add_argument("--max-batches", type=int, default=None, help="perplexity and --generate: only the first N batches")
    p.add_argument("--tasks", nargs="+", default=[], choices=tuple(TASKS) + ("all",),
                   help="also report zero-shot accuracy on these commonsense tasks ('all': the seven)")
    p.add_argument("--limit", type=int, default=None, help="zero-shot: only the first N examples of each task")
    p.add_argument("--task-data", default=None, metavar="DIR",
                   help="zero-shot: read DIR/<task>.jsonl (hub field layout) instead of the hub datasets")
    p.add_argument("--lm-eval", nargs="+", default=[], metavar="TASK",
                   help="also evaluate on these lm-evaluation-harness tasks (any task or group it knows, e.g. "
                        "arc_easy lambada_openai wikitext gsm8k), every method through this forward, PP "
                        "pruning each batch; needs lm-eval installed (pip install lm-eval)")
    p.add_argument("--lm-eval-include", default=None, metavar="DIR",
                   help="--lm-eval: also read the task YAML files in DIR (e.g. tasks on local files)")
    p.add_argument("--task-order", choices=TASK_ORDERS, default="dataset",
                   help="zero-shot batches: 'dataset' as the official PP code and the paper (each example's "
                        "choices adjacent, --batch-size consecutive inputs a batch, right-padded; requests that "
                        "read the same input, as BoolQ's one-token answers, share it); 'length' as "
                        "lm-evaluation-harness (longest first). PP's accuracy depends on what shares its batch; "
                        "the other methods' does not")
    p.add_argument("--merge", nargs="+", default=None, metavar="FILE",
                   help="no model: print the zero-shot tables and paired differences of the rows in these "
                        "--json files (e.g. one run per method, all on the same examples), write them merged "
                        "to --json if given, and exit")
    p.add_argument("--no-ppl", action="store_true",
                   help="skip perplexity (with --tasks / --generate: only those)")
    p.add_argument("--generate", type=int, default=None, metavar="N",
                   help="also measure generation: N new tokens after --prompt-len tokens of --data (the "
                        "continuation's perplexity, teacher-forced through the KV cache; prefill seconds; "
                        "decode tokens/s at --batch-size and at batch 1); PP and GRIFFIN choose the slices on "
                        "the prompt (PP: from its dense states; --pp-variant prefill=probe: by its probe)")
    p.add_argument("--prompt-len", type=int, default=None, metavar="P",
                   help=f"--generate: prompt tokens (default {DEFAULT_PROMPT_LEN})")
    p.add_argument("--show", type=int, default=0, metavar="K",
                   help="--generate: print the first K prompts' greedy continuations, for every method")
    p.add_argument("--recovery", action="store_true",
                   help="second-moment: refit each module by least squares before scoring it, as the "
                        "paper's optional pre-pruning recovery (rows 'second-moment+rec'; slower)")
    p.add_argument("--grad-batch", type=int, default=None, metavar="N",
                   help="llm-pruner, loraprune: calibration windows per backward pass; the scores are "
                        "those of one pass over all (default: as many as fit in "
                        f"{baselines.GRAD_TOKENS} tokens)")
    p.add_argument("--pp-variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE...]",
                   help="add a PP row with these PPConfig fields set, e.g. history=only or "
                        "probe_samples=0.25,probe_tokens=1.0 (repeatable); fields: " + ", ".join(VARIANT_FIELDS)
                        + f"; probe_select: {'/'.join(pp.PROBE_SELECTIONS)}, history: {'/'.join(pp.HISTORIES)}, "
                        f"score: {'/'.join(pp.SCORES)}, prefill: {'/'.join(pp.PREFILLS)} (with --generate "
                        "only; how the prompt chooses the decoding slices: by its probe, or, the default, "
                        "from its dense states)")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw perplexity against speedup over dense for every row, as a .png, .pdf or .svg "
                        "file (needs matplotlib)")
    p.add_argument("--mlp-multiple", type=int, default=MLP_MULTIPLE,
                   help="round kept MLP channels up to a multiple, for every method, on every device and "
                        "in every dtype, so one command keeps the same units everywhere (the official "
                        "code's; 1 = no rounding)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default here: %(default)s)")
    p.add_argument("--device-map", choices=("auto",), default=None,
                   help="'auto': spread the model over all visible GPUs with accelerate (big models)")
    p.add_argument("--dtype", default="auto", choices=("auto",) + tuple(DTYPES),
                   help="auto: the checkpoint's dtype, as transformers' dtype='auto' (its config's: "
                        "float16 for LLaMA-2, bfloat16 for LLaMA-3 and Qwen2.5; float32 where none is "
                        "recorded, as for a GGUF file), on every device; except where the device reports "
                        "no native matmul instructions for it (a GPU without bfloat16; a CPU without "
                        "AVX512-BF16/AMX for bfloat16, without AVX512-FP16/AMX-FP16 for float16), then "
                        "float32. An explicit float16 or bfloat16 that the CPU lacks runs, emulated and "
                        "slow, with a one-line warning")
    p.add_argument("--rounds", type=int, default=1,
                   help="time every method this many times, interleaved; report the median")
    p.add_argument("--profile", action="store_true",
                   help="also print where one PP batch's time goes, stage by stage, in an extra untimed "
                        "run of the second batch (the first if it is the only one): on CUDA the GPU time "
                        "of each stage's kernels (torch.profiler); on the CPU each stage's wall-clock time")
    p.add_argument("--estimate-memory", action="store_true",
                   help="print PP's peak GPU memory for --model, --batch-size, --seqlen, --dtype and the "
                        "first --ratio, computed from the config alone (no weights load), and exit")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the calibration windows (and of --lm-eval's sampled generations)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write the rows as JSON (rewritten after every row)")
    args = p.parse_args(argv)
    for option in ("method", "ratio"):  # a repeated value would run, and be reported, twice
        values = getattr(args, option)
        if len(set(values)) < len(values):
            raise UsageError(f"--{option}: {next(v for v in values if values.count(v) > 1)} is given twice")
    if "all" in args.method:
        args.method = [m for m in METHODS if m not in GENERATION_ONLY or args.generate is not None]
    if "all" in args.tasks:
        args.tasks = list(TASKS)
    args.tasks = list(dict.fromkeys(args.tasks))  # each task once, in the order given
    args.variants = dict(parse_variant(text, args) for text in args.pp_variant)  # label -> PPConfig fields
    check_task_args(args)
    check_generate_args(args)
    if args.recovery and "second-moment" not in args.method:
        raise UsageError("--recovery applies to --method second-moment, which is not among the methods")
    for r in args.ratio:
        if not 0 <= r < 1:
            raise UsageError(f"--ratio must be in [0, 1), got {r}")
    for name in ("nsamples", "seqlen", "batch_size", "rounds"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer")
    if args.seqlen < 2:
        raise UsageError("--seqlen must be at least 2: a window's first token predicts its second")
    for name in ("max_batches", "mlp_multiple", "limit", "grad_batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer")
    for name in (["data"] if needs_data(args) else []) + (["calib"] if needs_calib(args) else []):
        source = getattr(args, name)
        if source not in HUB_DATA and not os.path.isfile(source):
            raise UsageError(f"--{name}: no such file: {source} (or use one of: {', '.join(HUB_DATA)})")
    if args.model is not None and args.model.endswith(".gguf") and not os.path.isfile(args.model):
        raise UsageError(f"--model: no such GGUF file: {args.model}")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise UsageError(f"--device: not a device: {args.device!r} (use cpu, cuda or cuda:N)") from e
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device}: only cpu and cuda are supported")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} asked for, but CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {args.device}: this machine has {torch.cuda.device_count()} GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if args.device_map is not None and not torch.cuda.is_available():
        raise UsageError("--device-map auto spreads the model over GPUs, and none is visible here "
                         "(leave it out to run on the CPU)")
    for option in ("json", "plot", "save_history"):
        if getattr(args, option) is not None:
            check_output(getattr(args, option), f"--{option.replace('_', '-')}")
    check_history_args(args)
    if args.plot is not None and not args.plot.lower().endswith(PLOT_FORMATS):
        raise UsageError(f"--plot {args.plot}: the file name must end in {', '.join(PLOT_FORMATS)}")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib, which is not installed (pip install matplotlib)")
    if args.dtype == "bfloat16" and args.device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--dtype bfloat16: this GPU ({torch.cuda.get_device_name(args.device)}) cannot run "
                         "bfloat16; use --dtype float16 or float32")
    labels = list(METHODS) + list(args.variants)
    args.width = max(len(label) for label in labels) + len(RECOVERY_SUFFIX)  # the tables' method column
    return args


def check_task_args(args) -> None:
    """The zero-shot options make sense together, and every task file asked for exists."""
    if args.lm_eval and importlib.util.find_spec("lm_eval") is None:
        raise UsageError("--lm-eval needs lm-evaluation-harness, which is not installed (pip install lm-eval)")
    if args.lm_eval_include is not None and not args.lm_eval:
        raise UsageError("--lm-eval-include applies to --lm-eval only")
    if args.lm_eval_include is not None and not os.path.isdir(args.lm_eval_include):
        raise UsageError(f"--lm-eval-include: no such folder: {args.lm_eval_include}")
    if not args.tasks:
        if args.no_ppl and args.generate is None and not args.lm_eval:
            raise UsageError("--no-ppl leaves nothing to evaluate without --tasks, --lm-eval or --generate")
        if args.task_data is not None:
            raise UsageError("--task-data applies to --tasks only")
        if args.limit is not None and not args.lm_eval:
            raise UsageError("--limit applies to --tasks and --lm-eval only")
        return
    if args.task_data is None:
        return
    if not os.path.isdir(args.task_data):
        raise UsageError(f"--task-data: no such folder: {args.task_data}")
    for name in args.tasks:
        path = task_file(args.task_data, name)
        if not os.path.isfile(path):
            raise UsageError(f"--task-data: no such file: {path}")


def check_history_args(args) -> None:
    """--history and --save-history make sense for this run."""
    for option in ("history", "save_history"):
        if getattr(args, option) is not None and not uses_history(args):
            raise UsageError(f"--{option.replace('_', '-')} applies to PP's historical states, but no "
                             "method of the run keeps them (--method pp)")
    if args.history is not None and args.save_history is not None:
        raise UsageError("--history reuses a saved calibration and --save-history writes a new one: give one")
    if args.history is not None and not os.path.isfile(args.history):
        raise UsageError(f"--history: no such file: {args.history}")


def needs_data(args) -> bool:
    """Whether the run reads --data: for perplexity, or for --generate's prompts."""
    return not args.no_ppl or args.generate is not None


def needs_calib(args) -> bool:
    """Whether the run reads --calib: for a baseline's statistics, or PP's history unless --history."""
    return bool(set(args.method) & set(baselines.METHODS)) or (uses_history(args) and args.history is None)


def uses_history(args) -> bool:
    """Whether a PP row of the run keeps historical states (calibrated on --calib, --seqlen long)."""
    return "pp" in args.method or any(pp.PPConfig(**fields).use_history for fields in args.variants.values())


def generation_only(args, method: str) -> bool:
    """Whether a method (or PP variant) has rows in --generate's table only: GRIFFIN, or a variant
    that sets `prefill` (how generation chooses its slices; its batch path is that of the rest)."""
    return method in GENERATION_ONLY or "prefill" in args.variants.get(method, {})


def check_generate_args(args) -> None:
    """The generation options make sense together (the model's limits are checked with its config)."""
    if args.generate is None:
        if args.prompt_len is not None or args.show:
            raise UsageError("--prompt-len and --show apply to --generate only")
        for name in list(args.method) + list(args.variants):
            if generation_only(args, name):
                raise UsageError(f"{name} chooses the decoding structure on a prompt: it runs with --generate only")
        return
    if args.generate < 2:
        raise UsageError("--generate must be at least 2: the first new token comes with the prefill, "
                         "and decoding speed needs another")
    if args.prompt_len is not None and args.prompt_len < 1:
        raise UsageError("--prompt-len must be a positive integer")
    if args.show < 0:
        raise UsageError("--show must be 0 or more")
    args.prompt_len = args.prompt_len or DEFAULT_PROMPT_LEN
    if uses_history(args) and args.prompt_len > args.seqlen:
        raise UsageError(f"--prompt-len {args.prompt_len} is longer than PP's historical states, which cover "
                         f"--seqlen {args.seqlen} positions: use --seqlen {args.prompt_len} or more")


# PPConfig fields a --pp-variant may set (ratio and mlp_multiple are the run's, for every method).
VARIANT_FIELDS = ("probe_select", "history", "score", "probe_samples", "probe_tokens", "momentum",
                  "dense_layers", "seed", "prefill")


def parse_variant(text: str, args) -> tuple[str, dict]:
    """A --pp-variant 'key=value,...' as (its row label, its PPConfig fields), checked."""
    fields = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in VARIANT_FIELDS:
            raise UsageError(f"--pp-variant {text!r}: {item!r} is not KEY=VALUE with KEY one of "
                             + ", ".join(VARIANT_FIELDS))
        kind = type(getattr(pp.PPConfig(), key))  # str, float or int, as the field's default
        try:
            fields[key] = kind(value.strip())
        except ValueError:
            raise UsageError(f"--pp-variant {text!r}: {key} takes a {kind.__name__}, not {value!r}") from None
    try:
        for ratio in args.ratio:
            pp.PPConfig(ratio, **fields)
    except ValueError as e:
        raise UsageError(f"--pp-variant {text!r}: {e}") from None
    return "pp[" + ",".join(f"{key}={value}" for key, value in fields.items()) + "]", fields


def check_output(path: str, option: str = "--json") -> None:
    """Refuse an output file that could not be written, before any work is done."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{option}: {path} is a folder, not a file")
    if not os.path.isdir(folder):
        raise UsageError(f"{option}: no such folder: {folder}")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{option}: cannot write to {folder}")


def auto_dtype(config, device: str) -> str:
    """--dtype auto for a model on a device (see --help): the checkpoint's, where the device has it."""
    saved = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    saved = saved if saved in DTYPES else "float32"
    return saved if saved in native_dtypes(device) else "float32"


def native_dtypes(device: str) -> set[str]:
    """The dtypes whose matmuls the device runs with its own instructions, as it reports them."""
    if device.startswith("cuda"):
        return {"float32", "float16"} | ({"bfloat16"} if torch.cuda.is_bf16_supported(including_emulation=False)
                                         else set())
    has = lambda name: getattr(torch.cpu, name, lambda: False)()  # private but stable: cpuinfo's flags
    native = {"float32"}
    if has("_is_avx512_bf16_supported") or has("_is_amx_tile_supported"):
        native.add("bfloat16")
    if has("_is_amx_fp16_supported") or torch.ops.mkldnn._is_mkldnn_fp16_supported():
        native.add("float16")
    return native


def warn_if_emulated(device: str, dtype: str) -> None:
    """One line on stderr when an explicit half precision has no matmul instructions on this CPU."""
    # Emulated fp16 on a CPU without fp16 instructions (e.g. an AMD EPYC) is tens of times slower
    # than fp32: a run that looks hung. It still runs: a warning, not an error.
    if device.startswith("cpu") and dtype not in native_dtypes(device):
        print(f"eval.py: warning: this CPU has no {dtype} matrix instructions, so {dtype} runs emulated, "
              "many times slower than float32: expect a very slow run", file=sys.stderr)


def check_seqlen(config, seqlen: int) -> None:
    """Raise a clear ValueError if `seqlen` tokens exceed the model's context or attention window."""
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and seqlen > context:
        raise ValueError(f"--seqlen {seqlen} is beyond the model's context of {context} tokens")
    window = pp.sliding_window(config)
    if window is not None and seqlen > window:
        raise ValueError(f"--seqlen {seqlen} is beyond the model's sliding attention window of {window} "
                         "tokens (sliding-window attention is not implemented: use a shorter --seqlen)")


def check_ratio(config, cfg: pp.PPConfig) -> None:
    """Raise a clear ValueError, from the config alone, if cfg.ratio leaves a pruned block empty."""
    channels = getattr(config, "intermediate_size", None) or config.ffn_dim  # LLaMA-like / OPT
    r = cfg.layer_ratio(config.num_hidden_layers)
    pp.n_kept(config.num_attention_heads, r)
    pp.n_kept(channels, r, cfg.mlp_multiple)


def check_model(args) -> transformers.PretrainedConfig:
    """The model's config, after every check that needs it but not its weights; resolves the
    default that depends on it (--dtype auto)."""
    try:
        config = pp.load_config(args.model)
        if args.dtype == "auto":
            args.dtype = auto_dtype(config, args.device)
        check_seqlen(config, args.seqlen)
        # The longest window the model takes (gradient baselines calibrate on fixed lengths).
        limits = (getattr(config, "max_position_embeddings", None), pp.sliding_window(config))
        args.context = min((n for n in limits if n), default=math.inf)
        if args.generate is not None and args.prompt_len + args.generate > args.context:
            raise ValueError(f"--prompt-len {args.prompt_len} + --generate {args.generate} tokens are beyond "
                             f"the model's {'sliding attention window' if limits[1] == args.context else 'context'} "
                             f"of {args.context} tokens")
        pruned = set(args.method) - {"dense"} or args.estimate_memory
        for label, fields in (({"": {}} if pruned else {}) | args.variants).items():  # each PP config of the run
            for r in args.ratio:
                try:
                    check_ratio(config, pp.PPConfig(r, mlp_multiple=args.mlp_multiple, **fields))
                except ValueError as e:
                    raise ValueError(f"{label}: {e}" if label else str(e)) from e
    except (OSError, ValueError) as e:  # no such model, unsupported architecture, bad seqlen/ratio
        raise UsageError(str(e).strip().splitlines()[0]) from e
    return config


# -----------------------------------------------------------------------------------------
# Data


def read_documents(source: str) -> list[str]:
    """Documents from a hub name (see HUB_DATA) or a local text, JSONL or Parquet file."""
    if source in HUB_DATA:
        return read_hub(source)
    try:
        if source.endswith(".jsonl"):
            docs = read_jsonl(source)
        elif source.endswith(".parquet"):
            docs = read_parquet(source)
        else:
            with open(source, encoding="utf-8-sig") as f:  # plain text: one document
                docs = [f.read()]
    except UnicodeDecodeError as e:
        raise UsageError(f"{source}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    if not any(d.strip() for d in docs):
        raise UsageError(f"{source}: no text in it")
    return docs


def read_hub(source: str) -> list[str]:
    """The text column of a hub dataset (needs the internet)."""
    return list(hub_rows(*HUB_DATA[source], what=f"'{source}'", instead="pass a local file")["text"])


def hub_rows(name: str, config: str | None, split: str, what: str, instead: str):
    """A split of a hub dataset (needs the internet); a failure is one line saying what to do."""
    import datasets

    try:
        if config is not None and config.endswith(".json.gz"):
            return datasets.load_dataset(name, data_files=config, split=split)
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, or the hub refused: say so in one line
        raise UsageError(f"could not load {what} from the Hugging Face hub ({type(e).__name__}); "
                         f"{instead} instead") from e


def read_jsonl(path: str) -> list[str]:
    """The "text" field of every line of a JSONL file."""
    docs = []
    for n, row in json_lines(path):
        if not isinstance(row.get("text"), str):
            raise UsageError(f"{path}, line {n}: no \"text\" field with a string")
        docs.append(row["text"])
    return docs


def json_lines(path: str, limit: int | None = None) -> list[tuple[int, dict]]:
    """(line number, object) of the first `limit` (default: all) non-blank lines of a JSONL file."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if limit is not None and len(rows) == limit:
                    break
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}, line {n}: not valid JSON ({e.msg})") from e
                if not isinstance(row, dict):
                    raise UsageError(f"{path}, line {n}: not a JSON object")
                rows.append((n, row))
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    return rows


def read_parquet(path: str) -> list[str]:
    """The "text" column of a Parquet file."""
    import pyarrow.parquet  # a dependency of datasets

    try:
        table = pyarrow.parquet.read_table(path)
    except Exception as e:  # not Parquet, or unreadable
        raise UsageError(f"{path}: not a readable Parquet file ({type(e).__name__})") from e
    if "text" not in table.column_names:
        raise UsageError(f"{path}: no \"text\" column (columns: {', '.join(table.column_names)})")
    docs = table.column("text").to_pylist()
    bad = next((i for i, d in enumerate(docs) if not isinstance(d, str)), None)
    if bad is not None:
        raise UsageError(f"{path}, row {bad}: the \"text\" column holds {type(docs[bad]).__name__}, not a string")
    return docs


def eval_windows(tokenizer, docs: list[str], seqlen: int, options: str = "--seqlen") -> torch.Tensor:
    """Tokenize the joined text once; sequential non-overlapping windows (N, seqlen), `seqlen`
    being what `options` ask for."""
    ids = tokenizer("\n\n".join(docs), return_tensors="pt").input_ids[0]
    n = ids.numel() // seqlen
    if n == 0:
        raise UsageError(f"the evaluation text has {ids.numel()} tokens, fewer than {options} ({seqlen})")
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
# Zero-shot tasks: the paper's seven commonsense tasks, as lm-evaluation-harness 0.4.x
# defines and scores them at 0 shots. Each choice is the continuation " " + choice of the
# task's prompt; its score is the sum of the log-probabilities of the continuation's tokens.
# acc: the best score is the answer; acc_norm: the best score per character of the choice.


def clean_hellaswag(text: str) -> str:
    """lm-eval's HellaSwag cleanup: strip, " [title]" -> ". ", drop "[...]" tags, "  " -> " "."""
    return re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". ")).replace("  ", " ")


def blank(doc: dict) -> int:
    """Index of the blank "_" in a WinoGrande sentence."""
    return doc["sentence"].index("_")


class Task(NamedTuple):
    """One task as lm-eval defines it: its hub split, and each example's prompt, choices and answer."""

    hub: tuple[str, str | None, str]  # (dataset, config, split) that lm-eval reads
    prompt: Callable[[dict], str]  # the context (WinoGrande: the continuation both contexts share)
    choices: Callable[[dict], list[str]]  # the continuations (WinoGrande: the two contexts)
    gold: Callable[[dict], int]  # index of the right choice
    acc_norm: bool  # lm-eval also reports the length-normalized accuracy
    choices_are_contexts: bool = False  # WinoGrande: the choice fills the blank, the rest is scored


def arc(config: str) -> Task:
    """ARC-Easy or ARC-Challenge: the same prompt on two splits."""
    return Task(("allenai/ai2_arc", config, "test"), lambda d: f"Question: {d['question']}\nAnswer:",
                lambda d: d["choices"]["text"], lambda d: d["choices"]["label"].index(d["answerKey"]), True)


TASKS = {
    "boolq": Task(("aps/super_glue", "boolq", "validation"),
                  lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
                  lambda d: ["no", "yes"], lambda d: d["label"], acc_norm=False),
    "piqa": Task(("baber/piqa", None, "validation"), lambda d: f"Question: {d['goal']}\nAnswer:",
                 lambda d: [d["sol1"], d["sol2"]], lambda d: d["label"], acc_norm=True),
    "hellaswag": Task(("Rowan/hellaswag", None, "validation"),
                      lambda d: clean_hellaswag(f"{d['activity_label']}: {d['ctx_a']} {d['ctx_b'].capitalize()}"),
                      lambda d: [clean_hellaswag(e) for e in d["endings"]], lambda d: int(d["label"]),
                      acc_norm=True),
    "winogrande": Task(("allenai/winogrande", "winogrande_xl", "validation"),
                       lambda d: d["sentence"][blank(d) + 1:].strip(),
                       lambda d: [d["sentence"][:blank(d)] + d["option1"], d["sentence"][:blank(d)] + d["option2"]],
                       lambda d: {"1": 0, "2": 1}[d["answer"]], acc_norm=False, choices_are_contexts=True),
    "arc_easy": arc("ARC-Easy"),
    "arc_challenge": arc("ARC-Challenge"),
    "openbookqa": Task(("allenai/openbookqa", "main", "test"), lambda d: d["question_stem"],
                       lambda d: d["choices"]["text"],
                       lambda d: d["choices"]["label"].index(d["answerKey"].lstrip()), acc_norm=True),
}


# How a task's requests (one per choice of each example) are batched. dataset: the official code's,
# and so the paper's: in dataset order, each example's choices adjacent, batch_size consecutive ones a
# batch. length: lm-eval's, longest first. PP's accuracy depends on what shares its batch.
TASK_ORDERS = ("dataset", "length")


class Example(NamedTuple):
    """One example, ready to score: a (context, continuation) per choice, and the right one."""

    pairs: list[tuple[str, str]]
    choices: list[str]  # acc_norm divides each choice's score by its length in characters
    gold: int


def make_example(task: Task, doc: dict) -> Example:
    """The scored text of one example, as lm-eval builds it."""
    prompt, choices, gold = task.prompt(doc), task.choices(doc), task.gold(doc)
    if not all(isinstance(c, str) and c for c in choices):
        raise ValueError("a choice is empty or not text")
    if not (isinstance(gold, int) and 0 <= gold < len(choices)):
        raise ValueError(f"answer {gold!r} is not one of its {len(choices)} choices")
    if task.choices_are_contexts:
        return Example([(c, " " + prompt) for c in choices], choices, gold)
    return Example([(prompt, " " + c) for c in choices], choices, gold)


def task_file(folder: str, name: str) -> str:
    """Where --task-data keeps a task: DIR/<name>.jsonl."""
    return os.path.join(folder, f"{name}.jsonl")


def read_task(name: str, folder: str | None, limit: int | None) -> list[Example]:
    """The first `limit` examples (default: all) of a task, from folder/<name>.jsonl or the hub."""
    task = TASKS[name]
    if folder is None:
        rows = hub_rows(*task.hub, what=f"task '{name}'", instead="pass --task-data DIR")
        where, docs = task.hub[0], list(enumerate(rows, 1))[:limit]
    else:
        where = task_file(folder, name)
        docs = json_lines(where, limit)
    examples = []
    for n, doc in docs:
        try:
            examples.append(make_example(task, doc))
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise UsageError(f"{where}, line {n}: not a valid {name} example ({type(e).__name__}: {e})") from e
    if not examples:
        raise UsageError(f"{where}: no {name} examples in it")
    return examples


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's tokens of (context, continuation): the continuation's are those of
    encode(context + continuation) beyond encode(context)."""
    # Trailing spaces of the context move to the continuation, so that " word" stays one token.
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return ctx, whole[len(ctx):]


class TaskBatch(NamedTuple):
    """Distinct model inputs, right-padded, and where each request's continuation tokens lie."""

    ids: torch.Tensor  # (B, T) token ids, padding after each input
    mask: torch.Tensor  # (B, T) True at real tokens
    row: torch.Tensor  # (N,) for each continuation token in the batch: its input row,
    pos: torch.Tensor  # (N,) the position whose logits predict it,
    target: torch.Tensor  # (N,) the token itself,
    request: torch.Tensor  # (N,) and its request (a choice of an example, numbered across the task)


def task_batches(tokenizer, examples: list[Example], batch_size: int, max_len: int, device: str,
                 order: str) -> tuple[list[TaskBatch], int]:
    """The task's requests (every choice of every example) as right-padded batches of `batch_size`
    inputs in `order` (TASK_ORDERS), and their count."""
    requests = [encode_pair(tokenizer, ctx, cont) for ex in examples for ctx, cont in ex.pairs]
    return batch_requests(requests, batch_size, max_len, device, order), len(requests)


def batch_requests(requests: list[tuple[list[int], list[int]]], batch_size: int, max_len: int, device: str,
                   order: str) -> list[TaskBatch]:
    """Requests (context tokens, continuation tokens) as right-padded batches of `batch_size` inputs."""
    # The model reads context + continuation but its last token, at most max_len tokens (the last
    # ones, as lm-eval). Requests that read the same input (BoolQ's one-token " no"/" yes") share a row.
    readers: dict[tuple[int, ...], list[int]] = {}  # input -> its requests
    for r, (ctx, cont) in enumerate(requests):
        readers.setdefault(tuple((ctx + cont)[:-1][-max_len:]), []).append(r)
    if order == "dataset":  # the official code's: dataset order, so an example's choices are adjacent
        inputs = list(readers)  # (a dict keeps its first-seen order)
    else:  # lm-eval's, longest first: little padding; ties broken by the tokens, so it never varies
        inputs = sorted(readers, key=lambda t: (-len(t), t))
    batches = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        ids = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)
        row, pos, target, request = [], [], [], []  # one entry per continuation token
        for i, inp in enumerate(chunk):
            ids[i, :len(inp)] = torch.tensor(inp)
            for r in readers[inp]:
                cont = requests[r][1]  # predicted by the logits at the input's last len(cont) positions
                row += [i] * len(cont)
                pos += range(len(inp) - len(cont), len(inp))
                target += cont
                request += [r] * len(cont)
        mask = torch.arange(ids.shape[1]) < torch.tensor([len(inp) for inp in chunk])[:, None]
        index = [torch.tensor(v) for v in (row, pos, target, request)]
        batches.append(TaskBatch(*(t.to(device) for t in (ids, mask, *index))))
    return batches


def score_requests(logits_fn: Callable[..., torch.Tensor], batches: list[TaskBatch], n_requests: int,
                   desc: str) -> tuple[list[float], list[bool]]:
    """log P(continuation | context) of every request, the sum over its tokens in fp32; and whether
    greedy decoding would give the continuation (lm-eval's is_greedy)."""
    scores = torch.zeros(n_requests, device=batches[0].ids.device)
    misses = torch.zeros(n_requests, dtype=torch.long, device=batches[0].ids.device)
    for b in progress(batches, desc):
        logits = logits_fn(b.ids, b.mask)  # (B, T, V)
        # Only the continuations' positions: a log-softmax over (N, V), not the batch's (B, T, V).
        logp = F.log_softmax(logits[b.row, b.pos].float(), dim=-1)  # (N, V)
        scores.index_add_(0, b.request, logp.gather(1, b.target[:, None])[:, 0])
        misses.index_add_(0, b.request, (logp.argmax(-1) != b.target).long())
        del logits
    return scores.tolist(), (misses == 0).tolist()  # the task's one host sync


def argmax(values: list[float]) -> int:
    """Index of the largest value; the first one on ties (as numpy's argmax, which lm-eval uses)."""
    return max(range(len(values)), key=values.__getitem__)


def accuracy(task: Task, examples: list[Example], scores: list[float]) -> dict:
    """lm-eval's acc and acc_norm (None where the task has none) of the scored requests, and
    "correct": each example's 1/0 under the reported one, for paired comparisons."""
    hits, hits_norm, start = [], [], 0
    for ex in examples:
        s = scores[start:start + len(ex.pairs)]
        start += len(ex.pairs)
        hits.append(int(argmax(s) == ex.gold))
        hits_norm.append(int(argmax([v / len(c) for v, c in zip(s, ex.choices)]) == ex.gold))
    n = len(examples)
    return {"acc": sum(hits) / n, "acc_norm": sum(hits_norm) / n if task.acc_norm else None, "n": n,
            "correct": hits_norm if task.acc_norm else hits}


def reported(result: dict) -> float:
    """The accuracy a table reports for a task: acc_norm where the task has it, else acc."""
    return result["acc"] if result["acc_norm"] is None else result["acc_norm"]


def stderr(p: float, n: int) -> float:
    """Standard error of an accuracy p over n examples, as lm-eval: sqrt(p (1 - p) / (n - 1))."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else math.nan


def paired_difference(a: list[int], b: list[int]) -> tuple[float, float]:
    """Mean of a - b over the same examples, and its standard error sd(a - b) / sqrt(n)."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    return statistics.mean(d), statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan


def average_difference(a: dict[str, dict], b: dict[str, dict]) -> tuple[float, float]:
    """Paired difference of two rows' task averages, and its standard error (tasks independent)."""
    diffs = [paired_difference(a[name]["correct"], b[name]["correct"]) for name in a]
    return (statistics.mean(d for d, _ in diffs),
            math.sqrt(sum(se * se for _, se in diffs)) / len(diffs))


# -----------------------------------------------------------------------------------------
# lm-evaluation-harness as an optional back end: any of its tasks, its requests answered by our
# forward (HFLM pads with token 0 and passes no mask, which PP's probe would take for text)


def lm_eval_base() -> type:
    """lm-eval's model interface where lm-eval is installed, else object (--lm-eval is then refused)."""
    try:
        from lm_eval.api.model import LM
    except ImportError:
        return object
    return LM


# lm-eval's names for the number of new tokens, by its priority (normalize_gen_kwargs)
GEN_LENGTH_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


def generation_settings(gen: dict) -> tuple[int, list[str], dict]:
    """(new tokens, stop strings, `pp.decode`'s sampling arguments) of a task's gen_kwargs, read as
    lm-eval's normalize_gen_kwargs reads them; a setting `pp.decode` lacks is refused, not ignored."""
    gen = dict(gen)
    lengths = [gen.pop(key) for key in GEN_LENGTH_KEYS if key in gen]  # lm-eval's aliases, by priority
    until = gen.pop("until", None) or []
    temperature, top_p = float(gen.pop("temperature", 0.0)), float(gen.pop("top_p", 1.0))
    do_sample = gen.pop("do_sample", None)
    sample = temperature > 0 if do_sample is None else bool(do_sample)  # a temperature alone samples
    if not sample:
        gen.pop("top_k", None)  # a sampling setting: greedy decoding ignores it
    if gen:
        raise UsageError(f"an lm-eval task asks for generation settings that --lm-eval does not implement: "
                         f"{', '.join(sorted(gen))}")
    return (int(lengths[0]) if lengths else 256, [until] if isinstance(until, str) else list(until),
            {"temperature": temperature if sample else 0.0, "top_p": top_p if sample else 1.0})


class PrunedLM(lm_eval_base()):
    """One method at one ratio as an lm-eval model: log-likelihoods on padded, masked batches, as
    --tasks builds them; rolling log-likelihoods on lm-eval's perplexity windows; generate_until
    through our KV cache, PP choosing the structure on each prompt batch."""

    def __init__(self, logits_fn, prefill_fn: pp.PrefillFn, tokenizer, model, args, max_length: int):
        super().__init__()
        self.logits_fn, self.prefill_fn, self.tokenizer, self.args = logits_fn, prefill_fn, tokenizer, args
        self.max_length = max_length
        self.eos, self.pad = pp.stop_tokens(model)
        self.sampled_batches = 0  # each sampled batch gets its own seed, so that repeats differ
        # lm-eval's context for a text with none: the BOS token, else EOS (as HFLM).
        self.prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    def score(self, requests: list[tuple[list[int], list[int]]], desc: str) -> tuple[list[float], list[bool]]:
        """score_requests over token requests, batched as --tasks batches them."""
        a = self.args
        return score_requests(self.logits_fn, batch_requests(requests, a.batch_size, self.max_length, a.device,
                                                             a.task_order), len(requests), desc)

    def encode(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's tokens of a request. With no context, the prefix token stands for it (unless the
        continuation starts with it), and the continuation gets no special tokens (no BOS)."""
        if context:
            return encode_pair(self.tokenizer, context, continuation)
        tokens = self.tokenizer.encode(continuation, add_special_tokens=False)
        return (tokens[:1], tokens[1:]) if tokens[:1] == [self.prefix] else ([self.prefix], tokens)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log P(continuation | context), is_greedy) of each request's (context, continuation)."""
        pairs = [self.encode(*r.args) for r in requests]
        return list(zip(*self.score(pairs, "lm-eval loglikelihood")))

    def loglikelihood_rolling(self, requests) -> list[float]:
        """log P(text) of each request, over lm-eval's disjoint windows of at most max_length tokens."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, r in enumerate(requests):
            tokens = self.tokenizer.encode(r.args[0])
            for w in get_rolling_token_windows(tokens, self.prefix, self.max_length, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, s in zip(owner, self.score(windows, "lm-eval rolling loglikelihood")[0]):
            totals[i] += s
        return totals

    def generate_until(self, requests) -> list[str]:
        """Each request's continuation (greedy unless its gen_kwargs sample), cut at its stop strings."""
        texts, size = [], self.args.batch_size
        for gen, group in itertools.groupby(requests, key=lambda r: r.args[1]):  # the same gen_kwargs
            contexts = [r.args[0] for r in group]
            for start in range(0, len(contexts), size):
                texts += self.generate_batch(contexts[start:start + size], gen)
        return texts

    def generate_batch(self, contexts: list[str], gen: dict) -> list[str]:
        """Contexts sharing gen_kwargs, left-padded into one batch; their continuations' texts."""
        n_new, until, sample = generation_settings(gen)
        if n_new >= self.max_length:
            raise UsageError(f"an lm-eval task asks for {n_new} new tokens, but inputs here have at most "
                             f"{self.max_length} (the model's context; for PP, the positions its history covers)")
        eos_text = self.tokenizer.decode(self.tokenizer.eos_token_id, skip_special_tokens=False)
        until = until + [eos_text]  # as HFLM
        encoded = [self.tokenizer.encode(c)[-(self.max_length - n_new):] for c in contexts]  # left-truncated
        T = max(map(len, encoded))
        ids = torch.full((len(encoded), T), self.pad or 0, dtype=torch.long)
        mask = torch.zeros(len(encoded), T, dtype=torch.bool)
        for i, e in enumerate(encoded):  # left padding: every prompt ends where generation starts
            ids[i, T - len(e):], mask[i, T - len(e):] = torch.tensor(e), True
        self.sampled_batches += sample["temperature"] > 0
        out = pp.decode(self.prefill_fn, ids.to(self.args.device), mask.to(self.args.device), n_new,
                        eos_token_id=self.eos, pad_token_id=self.pad, seed=self.args.seed + self.sampled_batches,
                        **sample)
        texts = []
        for row in out[:, T:].tolist():
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0] if stop else text
            texts.append(text)
        return texts


# -----------------------------------------------------------------------------------------
# Measurement


@dataclass
class Row:
    """One result line: a method at a ratio (the JSON keys are these field names)."""

    method: str
    ratio: float
    ppl: float | None = None  # None with --no-ppl
    seconds: float | None = None  # wall time of the timed perplexity batches (the median over --rounds)
    tokens_per_s: float | None = None
    speedup: float | None = None  # dense seconds / these seconds, same run
    probe_flops_pct: float | None = None  # probe FLOPs as % of the dense forward's
    prr: float | None = None  # PPL increase per unit of relative runtime reduction
    peak_mem_gib: float | None = None  # CUDA: the most memory allocated on one GPU during the run
    round_seconds: list[float] = field(default_factory=list)  # each round's seconds (--rounds)
    round_speedups: list[float] = field(default_factory=list)  # each round's against dense's same round
    round_prr: list[float | None] = field(default_factory=list)  # ... and its PRR (None: not faster)
    tasks: dict[str, dict] | None = None  # --tasks: task -> {"acc", "acc_norm" (None if undefined), "n",
    #                                       "correct": each example's 1/0 under the reported accuracy}
    task_order: str | None = None  # --tasks: how the requests were batched (TASK_ORDERS)
    lm_eval: dict[str, dict] | None = None  # --lm-eval: task -> lm-eval's results ({"acc,none": ..., ...})
    avg_acc: float | None = None  # mean over the tasks of acc_norm where defined, else acc
    tasks_seconds: float | None = None  # wall time of the whole zero-shot evaluation
    gen_ppl: float | None = None  # --generate: perplexity of the new tokens, structure chosen on the prompt
    prefill_seconds: float | None = None  # --generate: one prompt batch's prefill (median over --rounds)
    decode_tokens_per_s: float | None = None  # --generate: new tokens per second at --batch-size
    decode_tokens_per_s_b1: float | None = None  # ... and at batch 1
    round_decode_tokens_per_s: list[float] = field(default_factory=list)  # each round's (--rounds)
    round_decode_tokens_per_s_b1: list[float] = field(default_factory=list)
    stage_seconds: dict[str, float] | None = None  # --profile: one batch's seconds per PP stage, and the rest


def synchronize() -> None:
    """Wait for the work queued on every GPU, so wall-clock times are real."""
    for d in range(torch.cuda.device_count()):
        torch.cuda.synchronize(d)


def peak_memory_gib() -> float | None:
    """The most memory allocated on one GPU since the last reset, in GiB (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    return max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())) / 2**30


def reset_peak_memory() -> None:
    """Start a new peak-memory measurement on every GPU."""
    for d in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(d)


def keep_freed_memory() -> None:
    """CPU runs: make glibc reuse freed memory rather than map fresh pages for every big tensor."""
    # glibc maps every large allocation afresh, so each big activation is page-faulted in and
    # zeroed on first touch; keeping freed memory in the heap (as tcmalloc or jemalloc would)
    # times the arithmetic, not the kernel's page zeroing. Only timed runs: a heap that never
    # returns memory fragments, and a long scoring run on a large model would outgrow the RAM.
    # No-op where libc is not glibc.
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def timed(args) -> bool:
    """Whether the run times perplexity or generation (a zero-shot or lm-eval run only scores)."""
    return not args.no_ppl or args.generate is not None


def progress(items: list, desc: str):
    """A progress bar over batches (or blocks), on stderr."""
    return tqdm(items, desc=desc, leave=False, file=sys.stderr)


def batch_nll(logits_fn: Callable[..., torch.Tensor], dec: pp.Decoder, ids: torch.Tensor) -> float:
    """Summed next-token NLL of a batch: the LM head and the loss one sample at a time, in fp32,
    so the batch's logits (B, T, V) never exist at once (SmolLM2, 20 x 1024 tokens: 4 GB)."""
    x = logits_fn(ids, logits=False)  # (B, T, C) the final residual stream
    ids = ids.to(x.device)
    return sum(F.cross_entropy(pp.head(dec, xs)[:-1].float(), tgt[1:], reduction="sum")
               for xs, tgt in zip(x, ids)).item()  # .item(): the batch is done when it returns


def measure(logits_fn: Callable[..., torch.Tensor], dec: pp.Decoder, batches: list[torch.Tensor],
            desc: str) -> tuple[float, float, int]:
    """Perplexity over all batches, and seconds and tokens of the timed ones (all but the first);
    the time covers the forward, the LM head and the loss, as the official code's."""
    nll, n_pred, seconds, timed_tokens = 0.0, 0, 0.0, 0
    for i, ids in enumerate(progress(batches, desc)):
        synchronize()
        start = time.perf_counter()
        nll += batch_nll(logits_fn, dec, ids)
        if i > 0 or len(batches) == 1:  # the first batch warms up kernels and caches
            seconds += time.perf_counter() - start
            timed_tokens += ids.numel()
        n_pred += ids[:, 1:].numel()
    return math.exp(nll / n_pred), seconds, timed_tokens


def profile_stages(logits_fn: pp.ProbePruner, dec: pp.Decoder,
                   ids: torch.Tensor) -> list[tuple[str, float]]:
    """Seconds of each PP stage (pp.STAGES) in one batch, and of the rest of the batch."""
    from torch.profiler import ProfilerActivity, profile

    cuda = pp.block_device(dec.blocks[0]).type == "cuda"
    # On CUDA each stage's kernels, as the profiler sees them inside its range; on the CPU each
    # stage's wall time (the profiler's cost per op would inflate stages of many small ops).
    logits_fn.stage_seconds = None if cuda else {}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) if cuda else nullcontext() as recorded:
        synchronize()
        start = time.perf_counter()
        batch_nll(logits_fn, dec, ids)
        total = time.perf_counter() - start
    spent = ({e.key: e.device_time_total / 1e6 for e in recorded.key_averages() if e.key in pp.STAGES}
             if cuda else logits_fn.stage_seconds)
    logits_fn.stage_seconds = None
    stages = [(name, spent.get(name, 0.0)) for name in pp.STAGES]
    return stages + [("full batch: sliced matmuls, attention, norms, LM head, loss", total - sum(s for _, s in stages)),
                     ("total", total)]


# FLOPs (analytic): the linear layers' matmuls, 2 * in * out per token, as the official code counts


def dense_flops(dec: pp.Decoder, n_tokens: int) -> int:
    """Linear-layer FLOPs of a dense forward over n_tokens tokens (LM head included)."""
    extra = [dec.lm_head, dec.project_in, dec.project_out]
    weights = [lin.weight for blk in dec.blocks for lin in pp.block_linears(blk)]
    weights += [lin.weight for lin in extra if lin is not None]
    return 2 * n_tokens * sum(w.numel() for w in weights)


def probe_flops_pct(dec: pp.Decoder, cfg: pp.PPConfig, batches: list[torch.Tensor]) -> float:
    """The probes' share of the dense forward's linear FLOPs over these batches, in %."""
    probes = sum(probe_flops(dec, cfg, *ids.shape) for ids in batches)  # each batch's probe, at its size
    return 100 * probes / dense_flops(dec, sum(ids.numel() for ids in batches))


def probe_flops(dec: pp.Decoder, cfg: pp.PPConfig, batch_size: int, seqlen: int) -> int:
    """Linear-layer FLOPs of the probes' look-ahead for one batch (q/k/v, gate/up or fc1)."""
    if cfg.history == "only":  # no probe
        return 0
    n_samples, n_tokens = cfg.probe_size(batch_size, seqlen)
    n_probe = n_samples * n_tokens
    pruned = dec.blocks[2 * cfg.dense_layers:]
    return 2 * n_probe * sum(lin.weight.numel() for blk in pruned for lin in pp.block_linears(blk)[:-1])


def memory_estimate(config, batch_size: int, seqlen: int, dtype_bytes: int,
                    cfg: pp.PPConfig) -> list[tuple[str, int]]:
    """Peak GPU memory of a PP run, item by item in bytes, from the model's shapes alone."""
    C, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    I = getattr(config, "intermediate_size", None) or config.ffn_dim
    n_heads = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or C // n_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    gated = config.model_type in pp.LLAMA_LIKE  # gate and up, or fc1 alone
    attn_w = C * hd * (2 * n_heads + 2 * n_kv)  # q, o and k, v
    mlp_w = (3 if gated else 2) * C * I
    embed_w = V * C * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    BT, pruned = batch_size * seqlen, L - cfg.dense_layers
    heads, channels = (pp.n_kept(n, cfg.layer_ratio(L), m) for n, m in ((n_heads, 1), (I, cfg.mlp_multiple)))
    # The widest moment of a block: a dense layer's MLP, with the residual x, the normalized h,
    # the two branches and their product (B, T, I) alive at once; attention needs less (flash/
    # memory-efficient SDPA keeps no (T, T) matrix).
    mlp_peak = BT * (3 * C + (3 if gated else 2) * I) * dtype_bytes
    # The end of the batch: the final residual stream, then one sample at a time (`batch_nll`) its
    # logits (T, V), their fp32 copy and its log-softmax.
    head_peak = BT * C * dtype_bytes + seqlen * V * (dtype_bytes + 2 * 4)
    sliced_attn = (2 if n_kv != n_heads else 4) * C * heads * hd  # q, o (GQA: k/v stay whole) or q, k, v, o
    return [
        ("weights", (L * (attn_w + mlp_w) + embed_w) * dtype_bytes),
        ("PP history (T, Cz) fp32, pruned layers", pruned * seqlen * (n_heads * hd + I) * 4),
        ("PP weight norms ||W[:, j]^2||, fp32", pruned * (n_heads * hd + I) * 4),
        ("PP's transient slices of one block", max(sliced_attn, (3 if gated else 2) * C * channels) * dtype_bytes),
        ("activations: max(MLP block, logits + loss)", max(mlp_peak, head_peak)),
    ]


def kv_cache_bytes(config, dtype_bytes: int, cfg: pp.PPConfig) -> tuple[int, int]:
    """KV cache per token of one sample in bytes: dense, and with PP's slices at cfg.ratio."""
    L, n_heads = config.num_hidden_layers, config.num_attention_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    dense = 2 * L * n_kv * hd * dtype_bytes  # keys and values of every layer
    if n_kv != n_heads:  # GQA: k/v stay whole in a pruned layer
        return dense, dense
    kept = pp.n_kept(n_heads, cfg.layer_ratio(L))  # MHA: a pruned layer caches its kept heads only
    return dense, 2 * (cfg.dense_layers * n_heads + (L - cfg.dense_layers) * kept) * hd * dtype_bytes


def print_memory(items: list[tuple[str, int]]) -> None:
    """The memory estimate as a small table, in GiB."""
    for name, size in items + [("total", sum(s for _, s in items))]:
        print(f"{name:<45} {size / 2**30:>8.2f} GiB")


# -----------------------------------------------------------------------------------------
# Output: a table printed row by row, and JSON rewritten after every row


RECOVERY_SUFFIX = "+rec"  # second-moment with --recovery
def header(width: int) -> str:
    """Header of the perplexity table, its method column `width` wide."""
    return (f"{'method':<{width}} {'ratio':>5} {'ppl':>9} {'seconds':>8} {'tokens/s':>9} {'speedup':>7} "
            f"{'rounds':>11} {'PRR':>8} {'probe FLOPs':>11} {'peak GiB':>8}")


def format_row(r: Row, width: int) -> str:
    """One aligned table line."""
    speedup = "" if r.speedup is None else f"{r.speedup:.2f}x"
    spread = (f"{min(r.round_speedups):.2f}-{max(r.round_speedups):.2f}x"  # the rounds' range (--rounds)
              if len(r.round_speedups) > 1 and r.method != "dense" else "")
    prr_text = "" if r.speedup is None or r.method == "dense" else "n/a" if r.prr is None else f"{r.prr:.1f}"
    probe = "" if r.probe_flops_pct is None else f"{r.probe_flops_pct:.2f}%"
    peak = "" if r.peak_mem_gib is None else f"{r.peak_mem_gib:.2f}"
    return (f"{r.method:<{width}} {r.ratio:>5.2f} {r.ppl:>9.3f} {r.seconds:>8.2f} {r.tokens_per_s:>9.1f} "
            f"{speedup:>7} {spread:>11} {prr_text:>8} {probe:>11} {peak:>8}")


def task_width(name: str) -> int:
    """Width of a task's column in the zero-shot table."""
    return max(len(name) + 1, 9)


def task_header(names: list[str], width: int) -> str:
    """Header of the zero-shot table: a column per task (* = acc_norm, else acc), average, seconds."""
    cells = " ".join(f"{name + '*' * TASKS[name].acc_norm:>{task_width(name)}}" for name in names)
    return f"{'method':<{width}} {'ratio':>5} {'order':>7} {cells} {'average':>9} {'seconds':>8}"


def format_task_row(r: Row, names: list[str], width: int) -> str:
    """One aligned zero-shot line: accuracy ± standard error in %, per task and averaged."""
    ses = [stderr(reported(r.tasks[name]), r.tasks[name]["n"]) for name in names]
    cells = " ".join(f"{100 * reported(r.tasks[name]):.1f}±{100 * se:.1f}".rjust(task_width(name))
                     for name, se in zip(names, ses))
    avg_se = math.sqrt(sum(se * se for se in ses)) / len(names)  # the tasks' errors are independent
    average = f"{100 * r.avg_acc:.1f}±{100 * avg_se:.1f}"
    return f"{r.method:<{width}} {r.ratio:>5.2f} {r.task_order:>7} {cells} {average:>9} {r.tasks_seconds:>8.1f}"


def print_paired(rows: list[Row], width: int) -> None:
    """Each zero-shot row's paired difference to dense; each PP row's to each baseline at its ratio;
    full batch's to PP; and each row in lm-eval's order to the same method in the dataset's."""
    scored = [r for r in rows if r.tasks]
    is_static = lambda r: r.method.removesuffix(RECOVERY_SUFFIX) in baselines.METHODS

    def others(r: Row, keep: Callable[[Row], bool]) -> list[Row]:
        """One row per method that `keep` accepts: in r's task order where both orders ran."""
        found = {}
        for o in sorted(filter(keep, scored), key=lambda o: o.task_order != r.task_order):
            found.setdefault(o.method, o)
        return list(found.values())

    pairs = [(r, d) for r in scored if r.method != "dense" for d in others(r, lambda o: o.method == "dense")]
    pairs += [(r, b) for r in scored if r.method != "dense" and not is_static(r)
              for b in others(r, lambda o: is_static(o) and o.ratio == r.ratio)]
    # What the full-batch probe adds over PP's probe, and what lm-eval's order changes.
    pairs += [(r, p) for r in scored if r.method == "fullbatch"
              for p in others(r, lambda o: o.method == "pp" and o.ratio == r.ratio)]
    pairs += [(r, o) for r in scored if r.task_order == "length" for o in scored
              if (o.method, o.ratio, o.task_order) == (r.method, r.ratio, "dataset")]
    if not pairs:
        return
    print("# paired differences of the average accuracy, in points ± paired standard error over the same "
          "examples (* beyond 2 standard errors)")
    for r, other in pairs:
        diff, se = average_difference(r.tasks, other.tasks)
        label = other.method + ("" if other.task_order == r.task_order else f" ({other.task_order})")
        print(f"{r.method:<{width}} {r.ratio:>5.2f} {r.task_order:>7}  - {label:<{width + 10}} "
              f"{100 * diff:>+6.1f} ± {100 * se:.1f}{' *' if abs(diff) > 2 * se else ''}")


def write_json(path: str | None, rows: list[Row]) -> None:
    """Write the rows so far (atomically: a reader never sees half a file)."""
    if path is None:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump([asdict(r) for r in rows], f, indent=2)
    os.replace(tmp, path)


def read_rows(paths: list[str]) -> list[Row]:
    """The rows of earlier --json files; their zero-shot rows must have scored the same examples."""
    rows = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                rows += [Row(**r) for r in json.load(f)]
        except (OSError, ValueError, TypeError) as e:
            raise UsageError(f"--merge: {path}: not a --json file of eval.py ({type(e).__name__})") from e
    scored = [r for r in rows if r.tasks]
    if not scored:
        raise UsageError("--merge: no zero-shot rows in these files")
    if any(not {"n", "correct"} <= set(t) for r in scored for t in r.tasks.values()):
        raise UsageError("--merge: a row has no per-example results (written before eval.py kept them)")
    counts = [{name: t["n"] for name, t in r.tasks.items()} for r in scored]
    if any(c != counts[0] for c in counts):
        raise UsageError(f"--merge: the rows scored different tasks or numbers of examples: {counts[0]} and "
                         f"{next(c for c in counts if c != counts[0])}")
    keys = [(r.method, r.ratio, r.task_order) for r in scored]
    if len(set(keys)) < len(keys):
        raise UsageError(f"--merge: a row appears twice: {next(k for k in keys if keys.count(k) > 1)}")
    return rows


def print_merged(args, rows: list[Row]) -> None:
    """The zero-shot table and the paired differences of rows from several runs."""
    scored = [r for r in rows if r.tasks]
    names = list(scored[0].tasks)
    width = max(len(r.method) for r in scored)
    print(f"# zero-shot, merged from {len(args.merge)} files: "
          + ", ".join(f"{name} {t['n']}" for name, t in scored[0].tasks.items()) + " examples")
    print(task_header(names, width))
    for r in scored:
        print(format_task_row(r, names, width))
    print_paired(scored, width)
    write_json(args.json, rows)


def print_stages(method: str, ratio: float, stages: list[tuple[str, float]]) -> None:
    """The per-stage time table of one profiled batch."""
    total = stages[-1][1]
    print(f"# where a {method} batch's time goes (ratio {ratio}, one profiled batch)")
    for name, seconds in stages:
        print(f"#   {name:<60} {seconds:>8.3f} s {100 * seconds / total:>6.1f}%")


# -----------------------------------------------------------------------------------------
# The run


def calibration_batches(args, tokenizer, docs: list[str]) -> list[torch.Tensor]:
    """The calibration windows, batched and on the device; every method sees the same ones."""
    calib = calib_windows(tokenizer, docs, args.nsamples, args.seqlen, args.seed)
    print(f"# calibration: {len(calib)} windows of {args.seqlen} tokens from {args.calib} (seed {args.seed})")
    return [b.to(args.device) for b in calib.split(args.batch_size)]


class Calibration(NamedTuple):
    """What every method learned from the same calibration windows."""

    batches: list[torch.Tensor]  # the windows, batched (second-moment's recovery reruns them)
    history: dict[int, torch.Tensor] | None  # PP's historical states, by block
    stats: list[baselines.Stats] | None  # the statistics-based baselines' statistics
    scores: dict[str, dict[int, torch.Tensor]]  # baseline -> block -> unit scores


class Runner:
    """Builds each method's logits function on the same model, calibration and settings."""

    def __init__(self, args, model, dec: pp.Decoder, calib: Calibration):
        self.args, self.model, self.dec, self.calib = args, model, dec, calib

    def config(self, method: str, ratio: float) -> pp.PPConfig:
        """PP settings of a method (or PP variant) at a ratio (every method rounds MLP widths alike)."""
        make = pp.PPConfig.full_batch if method == "fullbatch" else pp.PPConfig
        return make(ratio, mlp_multiple=self.args.mlp_multiple, **self.args.variants.get(method, {}))

    def build(self, method: str, ratio: float) -> pp.Decoder | pp.ProbePruner:
        """The method's model: a decoder (dense, or pruned here once) or a ProbePruner."""
        if method == "dense":
            return self.dec
        cfg = self.config(method, ratio)
        if method == "second-moment" and self.args.recovery:  # refit and scored anew at each ratio
            return baselines.prune_recovered(self.dec, cfg, self.calib.batches,
                                             progress=lambda blocks: progress(blocks, f"recovery at {ratio}"))
        if method in baselines.METHODS:
            return baselines.prune_static(self.dec, baselines.METHODS[method], cfg, self.calib.scores[method],
                                          self.calib.stats)
        # A fresh copy of the calibration history: every round of PP sees the same batches alike.
        return pp.ProbePruner(self.model, cfg, self.calib.history if cfg.use_history else None)

    def logits_fn(self, method: str, ratio: float) -> Callable[..., torch.Tensor]:
        """The method's (ids, attention mask) -> logits function."""
        built = self.build(method, ratio)
        return partial(pp.run, built) if isinstance(built, pp.Decoder) else built

    def prefill_fn(self, method: str, ratio: float) -> pp.PrefillFn:
        """The method's prompt -> (residual stream, decoder to decode on) function (`pp.prefill`)."""
        if method == "griffin":
            return baselines.griffin_prefill(self.dec, self.config(method, ratio))
        built = self.build(method, ratio)
        return partial(pp.prefill, built) if isinstance(built, pp.Decoder) else built.prefill

    def lm(self, method: str, ratio: float, tokenizer, max_length: int) -> PrunedLM:
        """The method as an lm-eval model, its logits and prefill from one build (one pruning)."""
        built = self.build(method, ratio)
        if isinstance(built, pp.Decoder):
            return PrunedLM(partial(pp.run, built), partial(pp.prefill, built), tokenizer, self.model, self.args,
                            max_length)
        return PrunedLM(built, built.prefill, tokenizer, self.model, self.args, max_length)

    def stateful(self, method: str) -> bool:
        """Whether the method's model changes as batches run (PP's history): the others are fixed."""
        return method != "dense" and method not in baselines.METHODS

    def label(self, method: str) -> str:
        """The method's name in the results."""
        return method + RECOVERY_SUFFIX if method == "second-moment" and self.args.recovery else method


def run_methods(args, model, tokenizer, docs: dict[str, list[str]], examples: dict[str, list[Example]],
                lm_tasks=None) -> list[Row]:  # lm_tasks: lm-eval's TaskManager, for --lm-eval
    """Evaluate every requested method and ratio on the same batches, reporting each row at once."""
    dec = pp.read_weights(model)
    tasks = prepare_tasks(args, model.config, tokenizer, examples)  # quick, and may refuse the run
    runner = Runner(args, model, dec, calibrate(args, model.config, tokenizer, dec, docs))
    jobs = [("dense", 0.0)] if "dense" in args.method else []
    jobs += [(m, r) for r in args.ratio for m in args.method + list(args.variants) if m != "dense"]
    rows: dict[tuple[str, float], Row] = {}
    scored = [(m, r) for m, r in jobs if not generation_only(args, m)]  # perplexity and zero-shot rows
    if not args.no_ppl:
        run_perplexity(args, runner, tokenizer, docs["data"], scored, rows)
    if tasks:
        run_tasks(args, runner, tasks, scored, rows)
    if args.lm_eval:
        run_lm_eval(args, runner, tokenizer, lm_tasks, scored, rows)
    if args.generate is not None:
        run_generation(args, runner, tokenizer, docs["data"], jobs, rows)
    return list(rows.values())


def history_about(meta: dict[str, str]) -> str:
    """One line on a saved history: what it was calibrated on, in which dtype, how many positions."""
    return f"{meta.get('calibration', 'calibration unknown')}, in {meta.get('dtype', '?')}, {meta['positions']} positions"


def calibrate(args, config, tokenizer, dec: pp.Decoder, docs: dict[str, list[str]]) -> Calibration:
    """PP's historical states (or --history's) and the baselines' scores, from the same calibration
    documents."""
    calib = Calibration([], None, None, {})
    if args.history is not None:
        calib = calib._replace(history=pp.load_history(args.history, config, args.seqlen))
        print(f"# PP history: {args.history} ({history_about(pp.history_info(args.history))})", flush=True)
    if "calib" not in docs:
        return calib
    calib = calib._replace(batches=calibration_batches(args, tokenizer, docs["calib"]))
    if uses_history(args) and args.history is None:  # kept on the CPU; each pruner copies it to its blocks' devices
        with reported_step("PP history"):
            history = pp.collect_history(dec, progress(calib.batches, "calibration (PP history)"))
        calib = calib._replace(history={b: h.cpu() for b, h in history.items()})
        if args.save_history is not None:
            pp.save_history(args.save_history, calib.history, config, {
                "calibration": f"{args.nsamples} windows of {args.seqlen} tokens from {args.calib}, seed {args.seed}",
                "dtype": args.dtype})
            print(f"# PP history saved: {args.save_history}", flush=True)
    wanted = {name: baselines.METHODS[name] for name in args.method if name in baselines.METHODS}
    if any(m.score is not None for m in wanted.values()):
        similarity = any(m.similarity for m in wanted.values())
        with reported_step("baselines' statistics"):
            calib = calib._replace(stats=baselines.collect_stats(
                dec, progress(calib.batches, "calibration (baselines)"), similarity))
    for name, method in wanted.items():
        ids = None
        if method.gradient is not None:  # its own windows, from the same documents and seed
            n, seqlen = method.windows
            seqlen = min(seqlen, args.context)  # a model with a shorter context: its whole context
            ids = calib_windows(tokenizer, docs["calib"], n, seqlen, args.seed).to(args.device)
            per_pass = min(n, args.grad_batch or baselines.default_grad_batch(seqlen))
            print(f"# {name}: gradients over {n} calibration windows of {seqlen} tokens, "
                  f"{per_pass} per backward pass", flush=True)
        with reported_step(f"{name} scores"):
            calib.scores[name] = baselines.unit_scores(dec, method, calib.stats, ids, args.grad_batch)
    return calib


@contextmanager
def reported_step(what: str) -> Iterator[None]:
    """Print a calibration step's wall time and its peak memory (GPU, or resident on Linux)."""
    synchronize()
    reset_peak_memory()
    before = resident_gib("VmRSS") if reset_peak_resident() else None
    start = time.perf_counter()
    yield
    synchronize()
    seconds, peak = time.perf_counter() - start, peak_memory_gib()
    where = (f", peak GPU memory {peak:.2f} GiB" if peak is not None else "" if before is None else
             f", resident memory {before:.2f} GiB before, peak {resident_gib('VmHWM'):.2f} GiB during it")
    print(f"# calibration: {what} in {seconds:.1f} s{where}", flush=True)


PROC_STATUS, PROC_CLEAR_REFS = "/proc/self/status", "/proc/self/clear_refs"  # Linux only


def resident_gib(field: str) -> float:
    """This process's resident memory now (VmRSS) or its high-water mark (VmHWM), in GiB."""
    with open(PROC_STATUS) as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return kib / 2**20


def reset_peak_resident() -> bool:
    """Restart the resident high-water mark at the current size (Linux >= 4.0); False where it cannot."""
    try:
        with open(PROC_CLEAR_REFS, "w") as f:
            f.write("5")  # 5: reset VmHWM (proc(5))
        return True
    except OSError:
        return False


def run_perplexity(args, runner: Runner, tokenizer, docs: list[str], jobs: list[tuple[str, float]],
                   rows: dict[tuple[str, float], Row]) -> None:
    """Perplexity and timing of every job on the same windows, one table row each."""
    windows = eval_windows(tokenizer, docs, args.seqlen)
    batches = list(windows.split(args.batch_size))[: args.max_batches]
    n_windows = sum(len(b) for b in batches)
    print(f"# {args.model or pp.default_model()} on {args.device} ({args.dtype}); "
          f"{n_windows} windows x {args.seqlen} tokens, sequential and non-overlapping, "
          f"batch {len(batches[0])}; time = "
          + (f"batches 2..{len(batches)} (first one warms up)" if len(batches) > 1 else "the only batch (no warm-up)")
          + (f", median of {args.rounds} interleaved rounds" if args.rounds > 1 else "")
          + f"; kept MLP channels rounded up to a multiple of {args.mlp_multiple}")
    print(header(args.width))
    print("-" * len(header(args.width)))
    for rnd in range(args.rounds):
        for method, ratio in jobs:
            reset_peak_memory()
            fn = runner.logits_fn(method, ratio)
            desc = f"{runner.label(method)} {ratio}" + (f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else "")
            ppl, seconds, tokens = measure(fn, runner.dec, batches, desc)
            row = rows.setdefault((method, ratio), Row(runner.label(method), ratio, ppl, seconds, tokens / seconds))
            row.round_seconds.append(seconds)
            row.seconds = statistics.median(row.round_seconds)
            row.tokens_per_s = tokens / row.seconds
            row.peak_mem_gib = max(filter(None, (row.peak_mem_gib, peak_memory_gib())), default=None)
            if method in PROBING or method in args.variants:
                row.probe_flops_pct = probe_flops_pct(runner.dec, runner.config(method, ratio), batches)
            if args.profile and (method in PROBING or method in args.variants) and rnd == 0:
                row.stage_seconds = dict(profile_stages(fn, runner.dec, batches[min(1, len(batches) - 1)]))
                print_stages(method, ratio, list(row.stage_seconds.items()))
            del fn
            if rnd == args.rounds - 1:  # final: compare with dense, print, save
                finish(row, rows.get(("dense", 0.0)))
                print(format_row(row, args.width), flush=True)
            write_json(args.json, list(rows.values()))


class PreparedTask(NamedTuple):
    """A task's examples and their requests, tokenized and batched once for every method."""

    examples: list[Example]
    batches: list[TaskBatch]
    n_requests: int


def prepare_tasks(args, config, tokenizer, examples: dict[str, list[Example]]) -> dict[str, PreparedTask]:
    """Tokenize and batch every task, and refuse inputs the model or PP's history cannot take."""
    # lm-eval keeps the last tokens of an input longer than the model's context.
    max_len = config.max_position_embeddings
    tasks = {name: PreparedTask(exs, *task_batches(tokenizer, exs, args.batch_size, max_len, args.device,
                                                   args.task_order))
             for name, exs in examples.items()}
    longest = max((b.ids.shape[1] for t in tasks.values() for b in t.batches), default=0)
    window = pp.sliding_window(config)
    if window is not None and longest > window:
        raise UsageError(f"a zero-shot input has {longest} tokens, beyond the model's sliding attention "
                         f"window of {window} (sliding-window attention is not implemented)")
    covered = history_positions(args)
    if uses_history(args) and longest > covered:
        raise UsageError(f"a zero-shot input has {longest} tokens, but PP's historical states cover {covered} "
                         f"positions: calibrate with --seqlen {longest} or more")
    return tasks


def run_tasks(args, runner: Runner, tasks: dict[str, PreparedTask], jobs: list[tuple[str, float]],
              rows: dict[tuple[str, float], Row]) -> None:
    """Zero-shot accuracy of every job on the same batches, one table row each."""
    names = list(tasks)
    print(f"# zero-shot (0 shots, scored as lm-evaluation-harness 0.4.x): "
          + ", ".join(f"{name} {len(t.examples)}" for name, t in tasks.items())
          + f" examples; batches of {args.batch_size} inputs in {args.task_order} order")
    print("# accuracy in % ± standard error; * = acc_norm, else acc; seconds = the whole zero-shot run")
    header = task_header(names, args.width)
    print(header)
    print("-" * len(header))
    for method, ratio in jobs:
        start, results, fn = time.perf_counter(), {}, None
        for name, t in tasks.items():
            # A fresh PP history per task, as the official code runs one task per run: a task's
            # accuracy does not depend on the tasks run before it. Static methods are pruned once.
            if fn is None or runner.stateful(method):
                fn = None  # the last task's model goes before the next one is built
                fn = runner.logits_fn(method, ratio)
            scores, _ = score_requests(fn, t.batches, t.n_requests, f"{runner.label(method)} {ratio} {name}")
            results[name] = accuracy(TASKS[name], t.examples, scores)
        del fn
        row = rows.setdefault((method, ratio), Row(runner.label(method), ratio))
        row.tasks, row.tasks_seconds = results, time.perf_counter() - start  # scores are on the host: synced
        row.task_order, row.avg_acc = args.task_order, statistics.mean(reported(r) for r in results.values())
        print(format_task_row(row, names, args.width), flush=True)
        write_json(args.json, list(rows.values()))
    print_paired(list(rows.values()), args.width)


def lm_eval_manager(args):
    """lm-eval's task index (and --lm-eval-include's), once every --lm-eval name is found in it."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=args.lm_eval_include)
    unknown = [name for name in args.lm_eval if name not in manager.all_tasks]
    if unknown:
        raise UsageError(f"--lm-eval: lm-eval knows no task {', '.join(map(repr, unknown))}"
                         + (f" (nor does {args.lm_eval_include})" if args.lm_eval_include else ""))
    try:  # reads each task's config and data now, so that a mistake in either stops the run here
        manager.load(args.lm_eval)
    except Exception as e:  # lm-eval and datasets raise many types for a bad YAML or data file
        raise UsageError(f"--lm-eval: cannot load the tasks: {type(e).__name__}: {e}".splitlines()[0]) from e
    return manager


def history_positions(args) -> int:
    """Tokens per sample PP's history covers: --seqlen's calibration, or --history's file."""
    return args.seqlen if args.history is None else int(pp.history_info(args.history)["positions"])


def run_lm_eval(args, runner: Runner, tokenizer, lm_tasks, jobs: list[tuple[str, float]],
                rows: dict[tuple[str, float], Row]) -> None:
    """Every job on the --lm-eval tasks through lm-eval, one task at a time (a fresh PP history each)."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import make_table

    # HFLM's context: the model's (here also its sliding window), and for PP what its history covers.
    max_length = min(args.context, history_positions(args)) if uses_history(args) else args.context
    print(f"# lm-eval {importlib.metadata.version('lm_eval')}: {', '.join(args.lm_eval)}; inputs of up to "
          f"{max_length} tokens, batches of {args.batch_size} in {args.task_order} order")
    for method, ratio in jobs:
        results, lm = {}, None
        for task in args.lm_eval:
            if lm is None or runner.stateful(method):  # a fresh PP per task (`run_tasks`)
                lm = None
                lm = runner.lm(method, ratio, tokenizer, max_length)
            out = simple_evaluate(model=lm, tasks=[task], task_manager=lm_tasks, limit=args.limit,
                                  log_samples=False)
            results.update({name: {k: v for k, v in r.items() if k != "alias"} for name, r in out["results"].items()})
            print(f"# lm-eval, {runner.label(method)} at {ratio}: {task}\n{make_table(out)}", flush=True)
        del lm
        row = rows.setdefault((method, ratio), Row(runner.label(method), ratio))
        row.lm_eval = results
        write_json(args.json, list(rows.values()))


class Generated(NamedTuple):
    """One method's generation measurements over the batches (sums; the first batch untimed)."""

    nll: float  # summed NLL of the new tokens, teacher-forced through the cache
    n_tokens: int  # new tokens scored
    prefill_seconds: float  # per timed batch, summed
    decode_seconds: float  # at --batch-size
    decode_tokens: int
    b1_seconds: float  # at batch 1 (each batch's first prompt)
    b1_tokens: int
    n_timed: int  # timed batches
    continuations: torch.Tensor  # (B, N) greedy new tokens of the first batch (for --show)


def continuation_nll(prefill_fn: pp.PrefillFn, prompt: torch.Tensor, new: torch.Tensor) -> float:
    """Summed NLL of the new tokens (B, N) after the prompt (B, P), fed through the KV cache on the
    structure the prompt chose (teacher forcing: each position reads the true tokens before it)."""
    cache = pp.KVCache(prompt.shape[1] + new.shape[1] - 1)  # the last new token is never fed
    x, dec = prefill_fn(prompt, None, cache)  # (B, P, C)
    rest = pp.run(dec, new[:, :-1], cache=cache, logits=False)  # (B, N - 1, C)
    x = torch.cat((x[:, -1:], rest), dim=1)  # (B, N, C): the states that predict the new tokens
    new = new.to(x.device)
    return sum(F.cross_entropy(pp.head(dec, xs).float(), tgt, reduction="sum") for xs, tgt in zip(x, new)).item()


def greedy(prefill_fn: pp.PrefillFn, prompt: torch.Tensor, n_new: int) -> tuple[torch.Tensor, float, float]:
    """Greedy new tokens (B, n_new), with the prefill's and the decode steps' seconds."""
    synchronize()
    start = time.perf_counter()
    logits, dec, cache = pp.start_decoding(prefill_fn, prompt, None, prompt.shape[1] + n_new - 1)
    tokens = [logits.argmax(-1)]
    synchronize()
    prefilled = time.perf_counter()
    for _ in range(n_new - 1):  # no EOS: every method decodes the same number of steps
        tokens.append(pp.decode_step(dec, cache, tokens[-1]).argmax(-1))
    synchronize()
    return torch.stack(tokens, dim=1), prefilled - start, time.perf_counter() - prefilled


def measure_generation(prefill_fn: pp.PrefillFn, batches: list[torch.Tensor], prompt_len: int,
                       desc: str) -> Generated:
    """Continuation perplexity and generation speed of one method over the batches (the first
    batch warms up and is not timed, unless it is the only one)."""
    sums = dict(nll=0.0, n_tokens=0, prefill_seconds=0.0, decode_seconds=0.0, decode_tokens=0,
                b1_seconds=0.0, b1_tokens=0, n_timed=0)
    # Every prompt's quality first: PP's history then takes in each prompt once, before the timed
    # passes over the same prompts fold them in again.
    for ids in progress(batches, desc):
        prompt, new = ids[:, :prompt_len], ids[:, prompt_len:]
        sums["nll"] += continuation_nll(prefill_fn, prompt, new)
        sums["n_tokens"] += new.numel()
    first = None
    for i, ids in enumerate(progress(batches, desc + " (timed)")):
        prompt, new = ids[:, :prompt_len], ids[:, prompt_len:]
        tokens, prefill_s, decode_s = greedy(prefill_fn, prompt, new.shape[1])
        _, _, b1_s = greedy(prefill_fn, prompt[:1], new.shape[1])
        first = tokens if first is None else first
        if i > 0 or len(batches) == 1:
            sums["prefill_seconds"] += prefill_s
            sums["decode_seconds"] += decode_s
            sums["b1_seconds"] += b1_s
            sums["decode_tokens"] += len(prompt) * (new.shape[1] - 1)  # the first comes with the prefill
            sums["b1_tokens"] += new.shape[1] - 1
            sums["n_timed"] += 1
    return Generated(**sums, continuations=first)


def gen_header(width: int) -> str:
    """Header of the generation table, its method column `width` wide."""
    return (f"{'method':<{width}} {'ratio':>5} {'gen ppl':>9} {'prefill s':>9} {'decode tok/s':>12} "
            f"{'speedup':>7} {'b1 tok/s':>9} {'speedup':>7}")


def format_gen_row(r: Row, dense: Row | None, width: int) -> str:
    """One aligned line of the generation table (speedups against dense's decoding)."""
    speed = lambda field: "" if dense is None else f"{getattr(r, field) / getattr(dense, field):.2f}x"
    return (f"{r.method:<{width}} {r.ratio:>5.2f} {r.gen_ppl:>9.3f} {r.prefill_seconds:>9.3f} "
            f"{r.decode_tokens_per_s:>12.1f} {speed('decode_tokens_per_s'):>7} {r.decode_tokens_per_s_b1:>9.1f} "
            f"{speed('decode_tokens_per_s_b1'):>7}")


def run_generation(args, runner: Runner, tokenizer, docs: list[str], jobs: list[tuple[str, float]],
                   rows: dict[tuple[str, float], Row]) -> None:
    """Continuation perplexity and generation speed of every job on the same prompts, one row each."""
    P, N = args.prompt_len, args.generate
    batches = list(eval_windows(tokenizer, docs, P + N, "--prompt-len + --generate").split(args.batch_size))
    batches = batches[: args.max_batches]
    print(f"# generation: {sum(len(b) for b in batches)} windows of {P} prompt + {N} new tokens of the data, "
          f"batch {len(batches[0])}" + (" (and 1)" if len(batches[0]) > 1 else "")
          + "; gen ppl = the new tokens' perplexity, teacher-forced through the "
          f"KV cache on the structure chosen on the prompt; decode = greedy, {N - 1} steps after the prefill; "
          + (f"timed over batches 2..{len(batches)}" if len(batches) > 1 else "the only batch timed (no warm-up)")
          + (f", median of {args.rounds} interleaved rounds" if args.rounds > 1 else ""))
    print(gen_header(args.width))
    print("-" * len(gen_header(args.width)))
    measured: dict[tuple[str, float], list[Generated]] = {}
    for rnd in range(args.rounds):
        for method, ratio in jobs:
            desc = f"{runner.label(method)} {ratio} generate" + (f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else "")
            g = measure_generation(runner.prefill_fn(method, ratio), batches, P, desc)
            runs = measured.setdefault((method, ratio), [])
            runs.append(g)
            row = rows.setdefault((method, ratio), Row(runner.label(method), ratio))
            row.gen_ppl = math.exp(g.nll / g.n_tokens)
            row.prefill_seconds = statistics.median(r.prefill_seconds / r.n_timed for r in runs)
            row.decode_tokens_per_s = g.decode_tokens / statistics.median(r.decode_seconds for r in runs)
            row.decode_tokens_per_s_b1 = g.b1_tokens / statistics.median(r.b1_seconds for r in runs)
            row.round_decode_tokens_per_s = [g.decode_tokens / r.decode_seconds for r in runs]
            row.round_decode_tokens_per_s_b1 = [g.b1_tokens / r.b1_seconds for r in runs]
            if rnd == args.rounds - 1:
                dense = rows.get(("dense", 0.0)) if "dense" in args.method else None
                print(format_gen_row(row, dense, args.width), flush=True)
            write_json(args.json, list(rows.values()))
    for i in range(min(args.show, len(batches[0]))):
        prompt = tokenizer.decode(batches[0][i, :P])
        print(f"\n# prompt {i + 1} (last 300 characters): {prompt[-300:]!r}")
        for (method, ratio), runs in measured.items():
            text = tokenizer.decode(runs[0].continuations[i])
            print(f"#   {runner.label(method)} {ratio}: {text!r}")


def plot_rows(rows: list[Row], variants: dict[str, dict], path: str) -> None:
    """Perplexity against speedup over dense, one mark per method and ratio, saved as an image."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    methods = list(dict.fromkeys(r.method for r in rows))
    for r in rows:
        if r.speedup is None or r.ppl is None:
            continue
        marker = "*" if r.method == "pp" else "^" if r.method in variants else "o"
        color = plt.cm.tab10(methods.index(r.method) % 10)  # one color per method, across ratios
        ax.scatter(r.speedup, r.ppl, marker=marker, s=90 if marker == "*" else 40, color=color)
        if len(r.round_speedups) > 1 and r.method != "dense":  # the rounds' range of speedups
            lo, hi = min(r.round_speedups), max(r.round_speedups)
            ax.errorbar(r.speedup, r.ppl, xerr=[[r.speedup - lo], [hi - r.speedup]], fmt="none", color=color,
                        alpha=0.6, capsize=2, linewidth=1)
        ax.annotate(f"{r.method} {r.ratio:g}", (r.speedup, r.ppl), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.set(xlabel="speedup over dense (same run)", ylabel="WikiText-2 perplexity (log)", yscale="log",
           title="quality against speed: lower right is better (bars: the rounds' range)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finish(row: Row, dense: Row | None) -> None:
    """Speedup and PRR against the dense row of the same run: of the medians, and round by round."""
    if dense is None:
        return
    row.speedup = dense.seconds / row.seconds
    row.prr = prr(row.ppl, row.seconds, dense.ppl, dense.seconds)
    # Round i of every method ran in the same pass, so it is compared with dense's round i.
    row.round_speedups = [d / s for d, s in zip(dense.round_seconds, row.round_seconds)]
    row.round_prr = [prr(row.ppl, s, dense.ppl, d) for d, s in zip(dense.round_seconds, row.round_seconds)]


def prr(ppl: float, seconds: float, dense_ppl: float, dense_seconds: float) -> float | None:
    """The paper's PRR, perplexity increase per unit of relative runtime reduction:
    (PPL - PPL_dense) / (1 - time / time_dense); None (undefined) when nothing got faster."""
    return (ppl - dense_ppl) / (1 - seconds / dense_seconds) if seconds < dense_seconds else None


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    try:
        args = parse_args(argv)
        if args.merge:
            print_merged(args, read_rows(args.merge))
            return 0
        if not args.device.startswith("cuda") and timed(args):
            keep_freed_memory()
        transformers.logging.set_verbosity_error()  # keep library chatter out of the results
        config = check_model(args)  # before reading any weights: architecture, seqlen, ratios
        if args.estimate_memory:
            cfg = pp.PPConfig(args.ratio[0], mlp_multiple=args.mlp_multiple)
            dtype_bytes = DTYPES[args.dtype].itemsize
            print(f"# PP's peak memory from the shapes: batch {args.batch_size} x {args.seqlen}, {args.dtype}, "
                  f"ratio {cfg.ratio}, kept MLP channels a multiple of {cfg.mlp_multiple}")
            print_memory(memory_estimate(config, args.batch_size, args.seqlen, dtype_bytes, cfg))
            dense, pruned = kv_cache_bytes(config, dtype_bytes, cfg)
            print(f"# generation: KV cache per token of each sample {dense / 2**10:.1f} KiB dense, "
                  f"{pruned / 2**10:.1f} KiB at ratio {cfg.ratio}"
                  + (" (GQA: k/v heads are never pruned)" if dense == pruned else " (the kept heads' only)"))
            return 0
        warn_if_emulated(args.device, args.dtype)
        if args.history is not None:  # before any weights load: this model's, covering --seqlen
            try:
                pp.check_history_info(pp.history_info(args.history), config, args.seqlen, args.history)
            except ValueError as e:
                raise UsageError(f"--history: {e}") from e
        wanted = (["data"] if needs_data(args) else []) + (["calib"] if needs_calib(args) else [])
        docs = {name: read_documents(getattr(args, name)) for name in wanted}
        examples = {name: read_task(name, args.task_data, args.limit) for name in args.tasks}
        lm_tasks = lm_eval_manager(args) if args.lm_eval else None  # lm-eval's TaskManager
        torch.manual_seed(args.seed)
        try:
            model, tokenizer = pp.load_model(args.model, args.device, DTYPES[args.dtype],
                                             device_map=args.device_map, config=config)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot load model {args.model or pp.default_model()!r}: {e}".splitlines()[0]) from e
        if args.device_map:  # inputs start where the embeddings live
            args.device = str(pp.read_weights(model).embed.device)
        rows = run_methods(args, model, tokenizer, docs, examples, lm_tasks)
        if args.plot is not None:
            plot_rows(rows, args.variants, args.plot)
            print(f"# figure: {args.plot}")
    except UsageError as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
