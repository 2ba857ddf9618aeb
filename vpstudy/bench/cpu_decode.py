"""Benchmark: does pruning pay on a CPU at long visual contexts? Decode-step time at 8K / 16K / 32K
visual tokens of dense decoding on a dynamic and on a static KV cache, of VisionPulse ≤5% on the
static cache, and of ``vpstudy record`` / ``vpstudy evaluate``'s decode steps on both caches,
against the bytes each step must read and the bandwidth measured in the same run.

Run ``python -m vpstudy.bench.cpu_decode`` (``--help`` for options). A benchmark, not a test: it
prints timings and ratios measured in the same run and never fails on them.

Protocol (built on :mod:`vpstudy.bench.latency`: its model, prompt, prefill, decode loop, roofline)
-------------------------------------------------------------------------------------------------
- **Model**: the latency benchmark's random Qwen3-VL text decoder with the issue's text size: 8
  layers, hidden 256, 8 query / 8 KV heads of dim 32, MLP 1024, vocab 8192, float32, SDPA; batch 1.
  VisionPulse's anchor is layer 4 (17/36 of the depth), so layers 4–7 are pruned.
- **Prompt**: 256 text tokens around one run of N_v image placeholders (:func:`~.latency.build_prompt`).
- **One prefill**, reused by every method (and every context): the contexts' prompts share
  their text and the width of their image grid, so each one's text before the image and its
  visual tokens are the beginning of the largest one's (ids and M-RoPE positions); that
  beginning is run once in one forward (:func:`shared_prefill`; at 32K it is most of the
  benchmark's time), and each context copies its part into a static cache of prompt +
  decode-steps slots and runs its own text after the image. Every method decodes from that
  cache: a static-cache method gets it rewound to the prompt (:func:`~.latency.rewind`: the
  decode slots are zeroed, the prompt's are never written by a decode step), a dynamic-cache
  method a ``DynamicCache`` holding a copy of the prompt's slots (:func:`~.latency.dynamic_copy`),
  made outside the timed region.
- **Methods** (:data:`METHODS`, each ``name/cache``):
  ``dense`` — the model's SDPA; ``dense-kernel`` — every decode call of every layer on the CPU
  decode backend (:class:`~vpstudy.backends.dense.DenseDecode`, nothing pruned: the same
  attention code as the pruned step); ``visionpulse`` — ``VisionPulse(tau=0.1, b_min=0.01,
  b_max=0.05)`` in ``Pruner(mode="physical")`` (the CPU fast path, ``backend="auto"``);
  ``visionpulse-mask`` — the same decisions in mask mode (the exact mode: its tokens are the
  reference); ``visionpulse-gather`` — physical mode on the gathered path without a decode
  backend (what the CPU path was before); ``record`` — :class:`~vpstudy.recorder.Recorder` on
  every layer with its defaults (``vpstudy record``'s decode step); ``evaluate`` — the recorder
  with VisionPulse in mask mode inside it (``vpstudy evaluate --method visionpulse``'s). The
  recorder and the pruners start from the prefilled cache (``begin``).
- **Timing**: each decode step (forward + greedy token) timed on its own; a run's time is the
  median of its steps (robust to the bursts of other processes on a shared machine; every step is
  kept in the result). Per context a warm-up run of every method, then ``--repeats`` rounds with
  the methods interleaved; medians over rounds; ratios are against ``dense/static`` and
  ``dense/dynamic`` of the same rounds.
- **Bytes per step** (:func:`step_bytes`, from :func:`~.latency.roofline_bytes`): every parameter
  once, and per layer the K and V of the keys attended (VisionPulse: the kept visual keys from the
  anchor on, plus K of every key once more at the anchor); a dynamic cache also reads and rewrites
  the whole cache (the concatenation); the recorder reads K of every key once more at each
  recorded layer; mask mode reads K once more at the anchor. **Bound** = bytes / the read
  bandwidth measured in the same run, just before the context's rounds (best of sums over a
  ``--read-mib`` tensor: the machine's load changes over a run); the copy bandwidth is recorded
  too.
- **Profile**: ``torch.profiler`` over ``--profile-steps`` decode steps of ``visionpulse``,
  ``visionpulse-gather`` and ``dense`` at the largest context: operators grouped into what they
  do (:data:`CATEGORIES`), and the pruner's labelled regions (the anchor decision, the sparse
  attention from the anchor on, the gather of the kept keys).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import gc
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vpstudy.argtypes import positive
from vpstudy.backends.dense import DenseDecode
from vpstudy.bench.latency import (
    BenchError,
    ModelGeometry,
    Protocol,
    anchor_of,
    build_model,
    build_prompt,
    copy_prefix,
    decode,
    dynamic_copy,
    kept_counts,
    measure_bandwidth,
    measure_read_bandwidth,
    prefill,
    rewind,
    roofline_bytes,
    static_cache,
    text_parameters,  # fmt: skip
    vision_pulse,
)
from vpstudy.bench.recording import image_grid
from vpstudy.bench.results import load_average, result_header, write_result
from vpstudy.pruning import Pruner
from vpstudy.recorder import Recorder

MODULE = "vpstudy.bench.cpu_decode"
MIB = 1 << 20
METHODS: tuple[str, ...] = (
    "dense/dynamic", "dense/static", "dense-kernel/static", "visionpulse/static", "visionpulse-mask/static",
    "visionpulse-gather/static", "record/dynamic", "record/static", "evaluate/dynamic", "evaluate/static",
)  # fmt: skip
PROFILED: tuple[str, ...] = ("visionpulse/static", "visionpulse-gather/static", "dense/static")
BASELINE, TODAY = "dense/static", "dense/dynamic"
WARMUP_STEPS = 2
# What each operator does, for the profile summary (self CPU time); the rest is "other".
CATEGORIES: dict[str, tuple[str, ...]] = {
    "SDPA attention (the model's own)": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                                         "aten::_scaled_dot_product_attention_math"),
    "q·K and p·V products (bmm)": ("aten::bmm",),
    "linear layers and LM head (mm)": ("aten::mm", "aten::addmm"),
    "gathers (index_select, gather)": ("aten::index_select", "aten::gather"),
    "softmax, log-sum-exp": ("aten::_softmax", "aten::logsumexp", "aten::exp", "aten::sub", "aten::amax"),
    "top-K and sorting": ("aten::topk", "aten::sort", "aten::argsort", "aten::kthvalue"),
    "masks, scatters, cumsum": ("aten::masked_fill", "aten::masked_fill_", "aten::scatter_", "aten::scatter",
                                "aten::scatter_add", "aten::cumsum", "aten::eq", "aten::gt", "aten::lt",
                                "aten::ge", "aten::le", "aten::ne", "aten::bitwise_and", "aten::bitwise_not",
                                "aten::bitwise_or", "aten::logical_not", "aten::where", "aten::any", "aten::all"),
    "cache writes and copies": ("aten::index_copy_", "aten::copy_", "aten::cat", "aten::clone", "aten::zero_",
                                "aten::fill_"),
}  # fmt: skip
REGIONS = ("vpstudy::anchor_decision", "vpstudy::sparse_attention", "vpstudy::gather_kept")
SHARED_NOTE = ("measured on a shared machine: other processes (a model-training job and other engineers' work) ran "
               "at the same time; the ratios are from interleaved rounds of the same run")  # fmt: skip


@dataclass
class DecodeRun:
    """One method's decode steps from the prefilled cache.

    Attributes:
        step_s: [S] seconds per decode step (forward and token choice).
        tokens: [S] the greedy tokens (batch row 0).
        kept: [S] visual tokens visible at the deepest layer per step (None: nothing pruned).
        backend: the pruner's decode backend (``gather`` for its gathered path), ``cpu`` for
            dense-kernel, ``sdpa`` otherwise.
        decision_s: the pruner's anchor-decision wall time per step (0 without a pruner).
    """

    step_s: list[float]
    tokens: list[int]
    kept: np.ndarray | None
    backend: str
    decision_s: float


class _OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors on one line (``<prog>: error: ...``), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags (``--help``); a bad flag exits with a one-line error."""
    description = ("Decode-step time on a CPU at long visual contexts: dense on a dynamic and a static KV cache, "
                   "VisionPulse <=5% physical mode, vpstudy record / evaluate's decode steps; bytes per step, "
                   "bandwidth, a profile (see the module doc).")  # fmt: skip
    parser = _OneLineParser(prog=f"python -m {MODULE}", description=description)
    parser.add_argument("--visual-tokens", type=positive, nargs="+", default=[8192, 16384, 32768],
                        help="visual contexts N_v (default: 8192 16384 32768)")
    parser.add_argument("--text-tokens", type=positive, default=256, help="text tokens around the image")
    parser.add_argument("--layers", type=positive, default=8)
    parser.add_argument("--hidden", type=positive, default=256)
    parser.add_argument("--heads", type=positive, default=8)
    parser.add_argument("--kv-heads", type=positive, default=8)
    parser.add_argument("--head-dim", type=positive, default=32)
    parser.add_argument("--intermediate", type=positive, default=1024)
    parser.add_argument("--vocab", type=positive, default=8192)
    parser.add_argument("--decode-steps", type=positive, default=8, help="timed decode steps per run")
    parser.add_argument("--repeats", type=positive, default=5, help="interleaved rounds of every method")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="methods to time (default: all); dense/static is always among them")  # fmt: skip
    parser.add_argument("--profile-steps", type=int, default=4, help="decode steps profiled per method (0: none)")
    parser.add_argument("--read-mib", type=positive, default=512, help="size of the read-bandwidth probe, MiB")
    parser.add_argument("--threads", type=positive, default=None,
                        help="torch.set_num_threads while decoding (default: unchanged)")
    parser.add_argument("--prefill-threads", type=positive, default=None,
                        help="threads of the (untimed) prefill, which is compute-bound (default: --threads)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="result file (default: bench/results/cpu-decode-<UTC date>.json)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.head_dim % 8 or args.heads % args.kv_heads or args.layers < 2 or args.text_tokens < 2:
        parser.error("--head-dim must be a multiple of 8, --heads of --kv-heads, --layers and --text-tokens >= 2")
    if BASELINE not in args.methods:
        args.methods = [BASELINE, *args.methods]
    return args


def protocol_of(args: argparse.Namespace) -> Protocol:
    """The latency :class:`~.latency.Protocol` these flags describe (CPU, float32, batch 1, whole-prompt prefill)."""
    geometry = ModelGeometry(layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                             head_dim=args.head_dim, intermediate=args.intermediate, vocab=args.vocab)  # fmt: skip
    return Protocol(geometry=geometry, batch=1, text_tokens=args.text_tokens,
                    visual_tokens=tuple(sorted(set(args.visual_tokens))), decode_steps=args.decode_steps,
                    prefill_chunk=0, warmup=1, repeats=args.repeats, dtype="float32", device="cpu", backend="auto",
                    copy_mib=256, seed=args.seed)  # fmt: skip


def shared_prefill(model: Any, protocol: Protocol, threads: int | None = None) -> tuple[dict[int, Any], Any, float]:
    """Every context's prompt, and one static cache holding their shared beginning, prefilled once.

    The prompts share their text ids and the columns of their image grid, so that each one's text
    before the image and its visual tokens are the beginning of the largest one's, ids and M-RoPE
    positions alike (:func:`~.latency.build_prompt`). The largest prompt's beginning (text before
    the image and the image) is run once, in one forward (``threads`` torch threads; it is
    compute-bound and not what is timed); a context then copies its part and runs its own text
    after the image (:func:`~.latency.copy_prefix`, :func:`~.latency.prefill` from there).

    Returns:
        (prompts by N_v, the filled cache of the largest beginning, the prefill's seconds).

    Raises:
        BenchError: the contexts have no common grid width, or their beginnings differ.
    """
    contexts = sorted(protocol.visual_tokens)
    columns = image_grid(contexts[0])[1]
    if any(n % columns for n in contexts):
        columns = math.gcd(*contexts)
    prompts = {n: build_prompt(model, protocol, n, columns=columns, text_seed=protocol.seed) for n in contexts}
    largest = prompts[contexts[-1]]
    for n, prompt in prompts.items():
        shared = protocol.text_before + n
        if not (torch.equal(prompt.input_ids[:, :shared], largest.input_ids[:, :shared])
                and torch.equal(prompt.position_ids[..., :shared], largest.position_ids[..., :shared])):  # fmt: skip
            raise BenchError(f"the prompt of {n} visual tokens is not the beginning of the largest one")
    length = protocol.text_before + contexts[-1]
    decode_threads = torch.get_num_threads()
    torch.set_num_threads(threads or decode_threads)
    try:
        with torch.inference_mode():
            source = static_cache(model, length)
            started = time.perf_counter()
            model(input_ids=largest.input_ids[:, :length], position_ids=largest.position_ids[..., :length],
                  past_key_values=source, use_cache=True, logits_to_keep=1)  # fmt: skip
            elapsed = time.perf_counter() - started
    finally:
        torch.set_num_threads(decode_threads)
    return prompts, source, elapsed


def decode_run(model: Any, method: str, cache: Any, prompt: Any, token: torch.Tensor, steps: int) -> DecodeRun:
    """``steps`` decode steps of ``method`` (``name/cache``) from the prefilled static ``cache``."""
    name, kind = method.split("/")
    positions = prompt.decode_positions(steps)
    pruner, owner = None, None
    with contextlib.ExitStack() as stack, torch.inference_mode():  # the cache holds inference tensors
        rewind(cache, prompt.length)
        work = cache if kind == "static" else dynamic_copy(model, cache, prompt.length)
        if name in ("record", "evaluate"):
            recorder = stack.enter_context(Recorder(model))
            recorder.begin(prompt.input_ids)
        if name.startswith("visionpulse") or name == "evaluate":
            mode = "mask" if name in ("visionpulse-mask", "evaluate") else "physical"
            backend = "gather" if name == "visionpulse-gather" else "auto"
            pruner = stack.enter_context(Pruner(model, [vision_pulse()], mode=mode, backend=backend))
            pruner.begin(prompt.input_ids)
        if name == "dense-kernel":
            owner = stack.enter_context(DenseDecode(model, "cpu"))
        gc.collect()
        step_s: list[float] = []
        tokens = decode(model, work, token, positions, None, step_s)
    kept = kept_counts(pruner, steps, prompt.n_visual)[:, 0] if pruner is not None else None
    backend = "sdpa"
    if pruner is not None and pruner.mode == "physical":
        backend = pruner.backend.name if pruner.backend is not None else "gather"
    elif owner is not None:  # the backend is chosen on the first decode call: none ran without one
        backend = owner.backend.name if owner.backend is not None else owner.backend_name
    decision = pruner.decision_s / steps if pruner is not None else 0.0
    return DecodeRun(step_s, tokens[0].tolist(), kept, backend, decision)


def step_bytes(method: str, protocol: Protocol, parameter_bytes: int, prompt_tokens: int, n_visual: int,
               kept: np.ndarray | None, anchor: int) -> np.ndarray:  # fmt: skip
    """[S] bytes each decode step of ``method`` must move at least (see the module docstring)."""
    name, kind = method.split("/")
    g, steps, dtype_bytes = protocol.geometry, len(kept) if kept is not None else protocol.decode_steps, 4
    roofline = functools.partial(roofline_bytes, g, parameter_bytes=parameter_bytes, dtype_bytes=dtype_bytes, batch=1,
                                 prompt_tokens=prompt_tokens, n_visual=n_visual, steps=steps)  # fmt: skip
    if name == "visionpulse" or name == "visionpulse-gather":
        if kept is None:
            raise BenchError(f"step_bytes({method!r}): the kept visual tokens per step are needed")
        return roofline(kept=kept.reshape(steps, 1), anchor=anchor)
    out = roofline()
    keys = prompt_tokens + np.arange(steps, dtype=np.float64) + 1  # keys attended at each step
    per_key = g.kv_bytes_per_key(dtype_bytes)  # K + V of one key at one layer
    k_bytes = per_key // 2 * keys  # K of every key, one layer
    if kind == "dynamic":  # the concatenation reads the old cache (keys - 1) and writes the new one (keys)
        out = out + g.layers * per_key * (2 * keys - 1)
    if name in ("record", "evaluate"):
        out = out + g.layers * k_bytes
    if name in ("visionpulse-mask", "evaluate"):
        out = out + k_bytes
    return out


def categorize(events: Any, steps: int) -> dict[str, Any]:
    """A profile's operators (``key_averages()``) as ms per step: by category (self time), the
    labelled regions (total time), and the ten costliest operators."""
    self_ms = {e.key: e.self_cpu_time_total / 1e3 / steps for e in events}
    total = sum(self_ms.values())
    categories = {c: sum(self_ms.get(op, 0.0) for op in ops) for c, ops in CATEGORIES.items()}
    categories["other"] = total - sum(categories.values())
    regions = {e.key: e.cpu_time_total / 1e3 / steps for e in events if e.key in REGIONS}
    top = sorted(self_ms.items(), key=lambda kv: -kv[1])[:10]
    return {"profiled_ms_per_step": total, "categories_ms": categories, "regions_ms": regions,
            "top_ops_ms": dict(top)}  # fmt: skip


def profile_method(model: Any, method: str, cache: Any, prompt: Any, token: torch.Tensor, steps: int) -> dict[str, Any]:
    """``torch.profiler`` over ``steps`` decode steps of ``method``, summarised by :func:`categorize`."""
    from torch.profiler import ProfilerActivity, profile

    decode_run(model, method, cache, prompt, token, 1)  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode_run(model, method, cache, prompt, token, steps)
    return categorize(prof.key_averages(), steps)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(rows: list[dict[str, Any]], contexts: Sequence[int], methods: Sequence[str]) -> dict[str, Any]:
    """Per context and method: median ms/step over rounds, ratios to dense/static and dense/dynamic,
    bytes and bound per step, kept share, and whether the tokens equal the reference's."""
    out: dict[str, Any] = {}
    for n in contexts:
        mine = {m: [r for r in rows if r["visual_tokens"] == n and r["method"] == m] for m in methods}
        base = _median([r["step_ms"] for r in mine[BASELINE]])
        today = _median([r["step_ms"] for r in mine.get(TODAY, [])])
        table = {}
        for method, group in mine.items():
            if not group:
                continue
            ms = _median([r["step_ms"] for r in group])
            bound = _median([r["bound_ms"] for r in group])
            table[method] = {"step_ms": ms, "vs_dense_static": base / ms, "vs_dense_dynamic": today / ms,
                             "bytes_per_step": _median([r["bytes_per_step"] for r in group]), "bound_ms": bound,
                             "vs_bound": ms / bound, "kept_fraction": _median([r["kept_fraction"] for r in group]),
                             "backend": group[0]["backend"], "decision_ms": _median([r["decision_ms"] for r in group])}
        out[str(n)] = table
    return out


def targets(summary: dict[str, Any], tokens_same: dict[str, bool], largest: int) -> dict[str, Any]:
    """The issue's targets at the largest context, measured (never asserted)."""
    at = summary[str(largest)]

    def ratio(slow: str, fast: str) -> float | None:
        return at[slow]["step_ms"] / at[fast]["step_ms"] if slow in at and fast in at else None

    vp = at.get("visionpulse/static")
    return {
        "visual_tokens": largest,
        "record_static_speedup_over_today": {"value": ratio("record/dynamic", "record/static"), "target": ">= 3"},
        "evaluate_static_speedup_over_today": {"value": ratio("evaluate/dynamic", "evaluate/static"), "target": ">= 3"},
        "visionpulse_speedup_over_dense_static": {"value": ratio(BASELINE, "visionpulse/static"), "target": ">= 1.3"},
        "visionpulse_time_over_its_bound": {"value": vp["vs_bound"] if vp else None, "target": "<= 1.3"},
        "visionpulse_tokens_equal_mask_mode": {"value": tokens_same.get("visionpulse/static"), "target": True},
    }


def table_lines(summary: dict[str, Any]) -> list[str]:
    """The printed table (one block per context)."""
    head = (f"{'N_v':>7} {'method':<26} {'ms/step':>8} {'x dense':>8} {'x dyn':>7} {'MB/step':>8} {'bound ms':>8} "
            f"{'vs bound':>8} {'kept':>7} {'decide':>7} backend")  # fmt: skip
    lines = [head]
    for n, table in summary.items():
        for method, r in table.items():
            lines.append(f"{int(n):>7,} {method:<26} {r['step_ms']:>8.2f} {r['vs_dense_static']:>7.2f}x "
                         f"{r['vs_dense_dynamic']:>6.2f}x {r['bytes_per_step'] / 1e6:>8.1f} {r['bound_ms']:>8.2f} "
                         f"{r['vs_bound']:>7.2f}x {100 * r['kept_fraction']:>6.2f}% {r['decision_ms']:>7.2f} "
                         f"{r['backend']}")  # fmt: skip
    lines.append("(medians over rounds; x dense / x dyn: dense/static and dense/dynamic ms/step over this method's; "
                 "bound: bytes per step / read bandwidth; kept: visual tokens visible at the deepest layer; decide: "
                 "the pruner's anchor decision, ms/step)")  # fmt: skip
    return lines


def profile_lines(profiles: dict[str, Any]) -> list[str]:
    """The printed profile summary."""
    lines = []
    for method, p in profiles.items():
        total = p["profiled_ms_per_step"]
        lines.append(f"profile {method}: {total:.2f} ms/step under the profiler")
        for name, ms in sorted(p["categories_ms"].items(), key=lambda kv: -kv[1]):
            lines.append(f"    {name:<36} {ms:>8.2f} ms  {100 * ms / total:>5.1f}%")
        for name, ms in p["regions_ms"].items():
            lines.append(f"    region {name:<29} {ms:>8.2f} ms  {100 * ms / total:>5.1f}% (inclusive)")
    return lines


def default_path() -> Path:
    """``bench/results/cpu-decode-<UTC date>.json``."""
    return Path("bench") / "results" / f"cpu-decode-{dt.datetime.now(dt.UTC).date().isoformat()}.json"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table and the profile, write and return the result."""
    import transformers

    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), load_average()
    protocol = protocol_of(args)
    read_bw = measure_read_bandwidth("cpu", args.read_mib * MIB)
    copy_bw = measure_bandwidth("cpu", protocol.copy_mib * MIB)
    model = build_model(protocol)
    anchor = anchor_of(protocol)
    parameter_bytes = text_parameters(model) * protocol.dtype_bytes
    methods = [m for m in METHODS if m in args.methods]
    g = protocol.geometry
    print(f"model: random Qwen3-VL text, {g.layers} layers, hidden {g.hidden}, {g.heads}/{g.kv_heads} heads x "
          f"{g.head_dim}, MLP {g.intermediate}, vocab {g.vocab}; float32, batch 1, anchor {anchor}; torch "
          f"{torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"read bandwidth {read_bw / 1e9:.1f} GB/s, copy {copy_bw / 1e9:.1f} GB/s; load average {load_before}",
          flush=True)  # fmt: skip
    rows: list[dict[str, Any]] = []
    tokens_same: dict[str, bool] = {}
    prefills: dict[str, float] = {}
    context_bw: dict[str, float] = {}  # read bandwidth measured before each context's rounds
    profiles: dict[str, Any] = {}
    prompts, source, prefills["shared"] = shared_prefill(model, protocol, args.prefill_threads)
    print(f"one prefill of the text before the image and {max(protocol.visual_tokens):,} visual tokens: "
          f"{prefills['shared']:.1f} s", flush=True)  # fmt: skip
    for n_visual in protocol.visual_tokens:
        prompt = prompts[n_visual]
        t0 = time.perf_counter()
        with torch.inference_mode():  # the shared prefix, then this prompt's text after the image
            start = protocol.text_before + n_visual
            cache = copy_prefix(model, source, start, prompt.length + protocol.decode_steps)
            token = prefill(model, cache, prompt, prompt.length, start=start)
        prefills[str(n_visual)] = time.perf_counter() - t0
        context_bw[str(n_visual)] = bandwidth = measure_read_bandwidth("cpu", args.read_mib * MIB)
        print(f"N_v {n_visual:,}: prompt {prompt.length:,} tokens, the text after the image prefilled in "
              f"{prefills[str(n_visual)]:.1f} s; read bandwidth now {bandwidth / 1e9:.1f} GB/s",
              flush=True)  # fmt: skip
        for method in methods:
            decode_run(model, method, cache, prompt, token, WARMUP_STEPS)
        reference: dict[str, list[int]] = {}
        for round_ in range(protocol.repeats):
            for method in methods:
                run = decode_run(model, method, cache, prompt, token, protocol.decode_steps)
                reference.setdefault(method, run.tokens)
                tokens_same[method] = tokens_same.get(method, True) and run.tokens == reference[method]
                per_step = step_bytes(method, protocol, parameter_bytes, prompt.length, n_visual, run.kept, anchor)
                ms = 1e3 * float(np.median(run.step_s))  # the median step: robust to other processes' bursts
                rows.append({
                    "visual_tokens": n_visual, "method": method, "repeat": round_, "prompt_tokens": prompt.length,
                    "step_ms": ms, "step_ms_all": [1e3 * s for s in run.step_s], "tokens": run.tokens,
                    "bytes_per_step": float(per_step.mean()), "bound_ms": 1e3 * float(per_step.mean()) / bandwidth,
                    "kept_fraction": 1.0 if run.kept is None else float(run.kept.mean() / n_visual),
                    "backend": run.backend, "decision_ms": 1e3 * run.decision_s,
                })  # fmt: skip
            latest = ", ".join(f"{r['method']} {r['step_ms']:.1f}" for r in rows[-len(methods) :])
            print(f"  round {round_ + 1}/{protocol.repeats} ms/step: {latest}", flush=True)
        for method in methods:  # every method's tokens against its reference: dense, or mask mode for the pruned
            ref = "visionpulse-mask/static" if method.startswith(("visionpulse", "evaluate")) else BASELINE
            if ref in reference:
                tokens_same[method] = tokens_same[method] and reference[method] == reference[ref]
        if args.profile_steps and n_visual == max(protocol.visual_tokens):
            for method in [m for m in PROFILED if m in methods]:
                profiles[method] = profile_method(model, method, cache, prompt, token, args.profile_steps)
        del cache
        gc.collect()
    del source
    summary = summarize(rows, protocol.visual_tokens, methods)
    goals = targets(summary, tokens_same, max(protocol.visual_tokens))
    print()
    for line in [*table_lines(summary), "", *profile_lines(profiles)]:
        print(line)
    print(f"tokens equal to their reference (dense/static; visionpulse-mask/static for the pruned): {tokens_same}")
    for name, goal in goals.items():
        if isinstance(goal, dict):
            value = goal["value"]
            shown = f"{value:.2f}" if isinstance(value, float) else value
            print(f"target {name}: {shown} (target {goal['target']})")
    elapsed, load_after = time.perf_counter() - started, load_average()
    print(f"total {elapsed:.0f} s; load average {load_after}; {SHARED_NOTE}")
    result = {
        "kind": "cpu_decode",
        **result_header(MODULE, argv, load_before, load_after),
        "note": SHARED_NOTE,
        "threads": torch.get_num_threads(),
        "prefill_threads": args.prefill_threads or torch.get_num_threads(),
        "protocol": {**protocol.as_json(), "methods": methods, "warmup_steps": WARMUP_STEPS, "anchor": anchor,
                     "profile_steps": args.profile_steps, "prefill": "whole prompt, once per context"},
        "model": {"class": type(model).__name__, "text_parameters": text_parameters(model),
                  "parameter_bytes": parameter_bytes},
        "bandwidth": {"read_bytes_per_s": read_bw, "read_bytes_per_s_by_context": context_bw,
                      "read_probe_bytes": args.read_mib * MIB,
                      "copy_bytes_per_s": copy_bw, "copy_probe_bytes": protocol.copy_mib * MIB,
                      "how": "best of 5 timed sums (read) / copies (2 x size moved) after one untimed"},
        "prefill_s": prefills,
        "summary": summary,
        "tokens_equal_reference": tokens_same,
        "targets": goals,
        "profile": profiles,
        "rows": rows,
        "total_s": elapsed,
    }  # fmt: skip
    write_result(args.json or default_path(), result)
    return result


if __name__ == "__main__":
    main()
