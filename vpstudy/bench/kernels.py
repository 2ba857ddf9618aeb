"""Benchmark: one layer's decode attention and the anchor decision, kernel by kernel, against the
bytes they must read.

Run ``python -m vpstudy.bench.kernels`` (``--help`` for options). A benchmark, not a test: it
prints timings and ratios measured in the same run and never fails on them.

For each visual-context length it times, on random inputs of one layer's decode shapes (default:
Qwen3-VL-4B text geometry, batch 8, 256 text tokens, bfloat16):

``sdpa``
    ``torch.nn.functional.scaled_dot_product_attention`` over the whole cache (GQA by
    ``enable_gqa``), what the model runs densely;
``dense``
    the backend's decode kernel with nothing pruned;
``sparse``
    the same kernel over the non-visual keys and the top 5% of visual keys (token-exact);
``sparse-block<B>``
    the block-sparse variant (``--block``): the blocks covering the same tokens;
``anchor``
    the anchor decision (per-head masses at τ, budget, scores, top-K) over the whole cache.

Each kernel's *roofline* is the bytes it must read (the K and V rows it attends to; K alone for
``anchor``) divided by the device bandwidth measured in the same run (a device-to-device copy).
CUDA times use CUDA events around ``--iters`` launches after ``--warmup``; the medians of
``--repeats`` are reported. On CPU (``--device cpu``) the reference backend runs at small sizes so
that the code path stays alive; those times say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vpstudy.backends.choose import NAMES, choose_backend
from vpstudy.backends.layout import KeyLayout
from vpstudy.backends.reference import block_cover
from vpstudy.backends.reference import sparse_decode as reference_decode
from vpstudy.bench.latency import measure_bandwidth
from vpstudy.bench.results import kernel_versions, load_average, result_header, write_result
from vpstudy.rules import BudgetRule

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The benchmark's options from ``argv`` (``sys.argv[1:]`` when None), with the device-dependent
    defaults (batch, visual-context lengths, dtype) filled in; exits via argparse on invalid ones."""
    parser = argparse.ArgumentParser(
        prog="python -m vpstudy.bench.kernels",
        description="Per-kernel decode timings against their roofline (see module doc).")  # fmt: skip
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", choices=NAMES, default="auto")
    parser.add_argument("--batch", type=int, default=None, help="default 8 (cuda) / 2 (cpu)")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--visual-tokens", type=int, nargs="+", default=None,
                        help="visual-context lengths (default 8192 16384 32768 on cuda, 256 1024 on cpu)")  # fmt: skip
    parser.add_argument("--keep", type=float, default=0.05, help="kept share of visual tokens (the rule's b_max)")
    parser.add_argument("--block", type=int, default=64, help="block size of the block-sparse variant")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bfloat16 (cuda) / float32 (cpu)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu)")
    cuda = args.device == "cuda"
    args.batch = args.batch or (8 if cuda else 2)
    args.visual_tokens = args.visual_tokens or ([8192, 16384, 32768] if cuda else [256, 1024])
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    if not 0 < args.keep <= 1:
        parser.error(f"--keep must be in (0, 1], got {args.keep}")
    return args


def _time(call: Callable[[], Any], device: torch.device, iters: int) -> float:
    """Mean seconds per call over ``iters`` calls (CUDA events on CUDA)."""
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            call()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / 1e3 / iters
    started = time.perf_counter()
    for _ in range(iters):
        call()
    return (time.perf_counter() - started) / iters


def inputs(args: argparse.Namespace, n_visual: int, device: torch.device) -> dict[str, Any]:
    """Random decode inputs of one layer: 32 text tokens, the image, the other text tokens; a
    different valid length per sequence (up to 3% shorter) so that the batch is ragged."""
    dtype = DTYPES[args.dtype]
    before = min(32, args.text_tokens)
    slots = args.text_tokens + n_visual
    g = torch.Generator().manual_seed(n_visual)
    ends = [slots - int(torch.randint(0, max(1, args.text_tokens - before), (), generator=g))
            for _ in range(args.batch)]  # fmt: skip
    layout = KeyLayout.build([0] * args.batch, ends, [before] * args.batch, [n_visual] * args.batch, device=device)
    shape = (args.batch, args.kv_heads, slots, args.head_dim)
    return dict(query=torch.randn(args.batch, args.heads, args.head_dim, device=device, dtype=dtype),
                key=torch.randn(shape, device=device, dtype=dtype),
                value=torch.randn(shape, device=device, dtype=dtype),
                layout=layout, scale=args.head_dim**-0.5)  # fmt: skip


def kv_bytes(layout: KeyLayout, kept_tokens: torch.Tensor | None, kv_heads: int, head_dim: int, itemsize: int,
             values: bool = True) -> int:  # fmt: skip
    """Bytes of the K (and V) rows a decode call must read: every attended key once per KV head."""
    keys = (layout.end - layout.start).long()
    if kept_tokens is not None:
        keys = keys - layout.visual_len.long() + kept_tokens.long()
    return int(keys.sum()) * kv_heads * head_dim * itemsize * (2 if values else 1)


def bench_context(args: argparse.Namespace, n_visual: int, device: torch.device,
                  bandwidth: float) -> list[dict[str, Any]]:  # fmt: skip
    """Time every kernel at one visual-context length; one row per kernel."""
    x = inputs(args, n_visual, device)
    backend = choose_backend(args.backend, device, x["query"].dtype, args.head_dim)
    rule = BudgetRule.paper(0.1, args.keep, args.keep)  # a fixed share: the same K for every sequence
    selection = backend.anchor_select(x["query"], x["key"], x["layout"], rule, scale=x["scale"])
    cover = block_cover(selection.kept, x["layout"].visual_len, args.block)
    q, k, v, layout, scale = x["query"], x["key"], x["value"], x["layout"], x["scale"]
    mask = torch.zeros(args.batch, 1, 1, k.shape[2], dtype=torch.bool, device=device)
    for b in range(args.batch):
        mask[b, ..., int(layout.start[b]) : int(layout.end[b])] = True
    itemsize = k.element_size()
    kept_tokens = selection.kept.kept_tokens(layout.visual_len)
    cover_tokens = cover.kept_tokens(layout.visual_len)
    kernels: dict[str, tuple[Callable[[], Any], int, torch.Tensor | None]] = {
        "sdpa": (lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask,
                                                                          scale=scale, enable_gqa=True),
                 kv_bytes(layout, None, args.kv_heads, args.head_dim, itemsize), None),  # fmt: skip
        "dense": (lambda: backend.sparse_decode(q, k, v, layout, None, scale=scale),
                  kv_bytes(layout, None, args.kv_heads, args.head_dim, itemsize), None),
        "sparse": (lambda: backend.sparse_decode(q, k, v, layout, selection.kept, scale=scale),
                   kv_bytes(layout, kept_tokens, args.kv_heads, args.head_dim, itemsize), kept_tokens),
        f"sparse-block{args.block}": (lambda: backend.sparse_decode(q, k, v, layout, cover, scale=scale),
                                      kv_bytes(layout, cover_tokens, args.kv_heads, args.head_dim, itemsize),
                                      cover_tokens),
        "anchor": (lambda: backend.anchor_select(q, k, layout, rule, scale=scale),
                   kv_bytes(layout, None, args.kv_heads, args.head_dim, itemsize, values=False), None),
    }  # fmt: skip
    check = reference_decode(q, k, v, layout, selection.kept, scale=scale).float()
    error = float((backend.sparse_decode(q, k, v, layout, selection.kept, scale=scale).float() - check).abs().max())
    rows: list[dict[str, Any]] = []
    for name, (call, n_bytes, kept) in kernels.items():
        for _ in range(args.warmup):
            call()
        times = [_time(call, device, args.iters) for _ in range(args.repeats)]
        seconds = statistics.median(times)
        retention = None if kept is None else float(kept.sum() / layout.visual_len.sum())
        rows.append(dict(visual_tokens=n_visual, kernel=name, backend=backend.name if name != "sdpa" else "torch",
                         seconds=seconds, bytes=n_bytes, roofline_s=n_bytes / bandwidth,
                         achieved_bandwidth=n_bytes / seconds, retention=retention, raw_seconds=times))  # fmt: skip
    for row in rows:
        row["vs_dense"] = row["seconds"] / next(r["seconds"] for r in rows if r["kernel"] == "dense")
    next(r for r in rows if r["kernel"] == "sparse")["max_abs_error_vs_reference"] = error
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, return (and optionally write) the results."""
    args = parse_args(argv)
    device = torch.device(args.device)
    load_before = load_average()
    bandwidth = measure_bandwidth(args.device, (2 << 30) if device.type == "cuda" else (256 << 20))
    print(f"device {device}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; batch {args.batch}, "
          f"{args.heads}/{args.kv_heads} heads, head dim {args.head_dim}, {args.dtype}, keep {args.keep:.0%}",
          flush=True)  # fmt: skip
    rows = []
    for n_visual in args.visual_tokens:
        rows += bench_context(args, n_visual, device, bandwidth)
    print(f"\n{'visual':>7} {'kernel':<16} {'backend':<10} {'µs':>9} {'vs dense':>9} {'roofline µs':>12} "
          f"{'time/roofline':>13} {'retention':>9}")  # fmt: skip
    for r in rows:
        retention = "" if r["retention"] is None else f"{100 * r['retention']:.1f}%"
        print(f"{r['visual_tokens']:>7} {r['kernel']:<16} {r['backend']:<10} {1e6 * r['seconds']:>9.1f} "
              f"{r['vs_dense']:>8.2f}x {1e6 * r['roofline_s']:>12.1f} "
              f"{r['seconds'] / r['roofline_s']:>12.2f}x {retention:>9}")  # fmt: skip
    result = {
        **result_header("vpstudy.bench.kernels", argv, load_before, load_average(), device=device),
        "kind": "kernels",
        "extra_versions": kernel_versions(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "bandwidth_bytes_per_s": bandwidth,
        "rows": rows,
    }
    write_result(args.json, result)
    return result


if __name__ == "__main__":
    main()
