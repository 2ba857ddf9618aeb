"""The command line of the latency benchmark (``python -m vpstudy.bench.latency``, ``vpstudy bench``):
its flags, the printed table, joining results (``--merge``), and :func:`run` / :func:`main`."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from vpstudy.argtypes import non_negative, positive
from vpstudy.backends.choose import NAMES as BACKENDS
from vpstudy.bench.results import device_kind, kernel_versions, load_average, result_header, write_result

from .model import build_model, text_parameters
from .protocol import (
    BANDWIDTH_REPEATS,
    CPU_DEFAULTS,
    DTYPES,
    GIB,
    GPU_DEFAULTS,
    MIB,
    MODULE,
    BenchError,
    ModelGeometry,  # fmt: skip
    Protocol,
    check_memory,
    resident_bytes,
    resolve_device,
)
from .roofline import measure_bandwidth
from .timing import anchor_of, measure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags (shared by ``python -m vpstudy.bench.latency`` and ``vpstudy bench``).
    Size flags left out take the device's profile (:data:`GPU_DEFAULTS` / :data:`CPU_DEFAULTS`)."""
    gpu, cpu = GPU_DEFAULTS, CPU_DEFAULTS

    def size(flag: str, help_: str, kind: Callable[[str], int] = positive, **kw: Any) -> None:
        key = flag.lstrip("-").replace("-", "_")
        parser.add_argument(flag, type=kind, default=None,
                            help=f"{help_} (default: {gpu[key]} on CUDA, {cpu[key]} on CPU)", **kw)  # fmt: skip

    parser.add_argument("--device", default="auto",
                        help="cuda, cuda:N or cpu (default: cuda when there is one, else cpu)")  # fmt: skip
    size("--layers", "text layers")
    size("--hidden", "text hidden size")
    size("--heads", "query heads")
    size("--kv-heads", "key/value heads")
    size("--head-dim", "head dimension")
    size("--intermediate", "MLP size")
    size("--vocab", "vocabulary size (LM head tied to the embedding)")
    size("--batch", "sequences per batch")
    size("--text-tokens", "text tokens per prompt around the visual run")
    size("--visual-tokens", "visual contexts N_v", nargs="+")
    size("--decode-steps", "decode steps per run")
    size("--prefill-chunk", "prompt tokens per prefill forward; 0 = the whole prompt at once", kind=non_negative)
    size("--warmup", "untimed runs per method and context", kind=non_negative)
    size("--repeats", "timed runs per method and context")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help=f"weights and cache (default: {gpu['dtype']} on CUDA, {cpu['dtype']} on CPU)")  # fmt: skip
    parser.add_argument("--backend", default=None, choices=list(BACKENDS),
                        help=f"Pruner backend of visionpulse (default: {gpu['backend']} on CUDA, "
                             f"{cpu['backend']} on CPU)")  # fmt: skip
    size("--copy-mib", "size of the bandwidth probe's device-to-device copy, MiB")
    parser.add_argument("--kept-block", type=positive, default=1,
                        help="VisionPulse keeps whole blocks of this many visual tokens covering the rule's "
                             "top-K (Pruner kept_block; 64 = the paper's block-sparse kernel; default 1: "
                             "token-exact)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts (default 0)")
    parser.add_argument("--threads", type=positive, default=None, help="torch.set_num_threads (default: unchanged)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (e.g. in a captured log)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="result file (default: bench/results/latency-<device kind>-<UTC date>.json)")  # fmt: skip
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="FILE",
                        help="measure nothing: join latency results of the same protocol and device that measured "
                             "different --visual-tokens (one command per context) into --json PATH")  # fmt: skip


def protocol_from_args(args: argparse.Namespace) -> Protocol:
    """The :class:`Protocol` of parsed flags: the device's profile where a flag was left out.

    Raises:
        BenchError: one line naming the flag (CUDA asked for without one, inconsistent sizes).
    """
    device = resolve_device(args.device)
    profile = GPU_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS
    value = {key: profile[key] if getattr(args, key, None) is None else getattr(args, key) for key in profile}
    geometry = ModelGeometry(**{f.name: value[f.name] for f in fields(ModelGeometry)})
    if value["heads"] % value["kv_heads"]:
        raise BenchError(f"--heads {value['heads']} must be a multiple of --kv-heads {value['kv_heads']}")
    if value["head_dim"] % 8:
        raise BenchError(f"--head-dim {value['head_dim']} must be a multiple of 8 (M-RoPE sections)")
    if value["layers"] < 2:
        raise BenchError("--layers must be >= 2 (the anchor must leave a layer before it)")
    if value["text_tokens"] < 2:
        raise BenchError("--text-tokens must be >= 2 (<|vision_start|> and <|vision_end|> go around the visual run)")
    if value["vocab"] < 16:
        raise BenchError("--vocab must be >= 16 (four ids are vision tokens)")
    if device == "cpu" and value["dtype"] == "float16":
        raise BenchError("--dtype float16 is for CUDA; use float32 or bfloat16 on CPU")
    return Protocol(
        geometry=geometry, batch=value["batch"], text_tokens=value["text_tokens"],
        visual_tokens=tuple(sorted(set(value["visual_tokens"]))), decode_steps=value["decode_steps"],
        prefill_chunk=value["prefill_chunk"], warmup=value["warmup"], repeats=value["repeats"], dtype=value["dtype"],
        device=device, backend=value["backend"], copy_mib=value["copy_mib"], seed=args.seed, kept_block=args.kept_block,
    )  # fmt: skip


class _OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors on one line (``<prog>: error: ...``), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Protocol]:
    """Flags and the :class:`Protocol` they give; a bad flag exits with a one-line error."""
    description = "Prefill/decode latency of VisionPulse vs dense (paper Figure 5; see the module doc)."
    parser = _OneLineParser(prog=f"python -m {MODULE}", description=description)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return args, protocol_from_args(args)
    except BenchError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(r[key]) for r in rows)


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The printed table: medians over repeats per context and method, speedups over dense (decode
    and total, same run), decode time over its roofline, kept visual share and peak memory."""
    methods = sorted(dict.fromkeys(r["method"] for r in rows), key=lambda m: m != "dense")  # dense first
    width = max(12, *map(len, methods))
    head = (f"{'N_v':>7} {'method':<{width}} {'prefill s':>9} {'decode s':>9} {'ms/step':>8} {'total s':>8} "
            f"{'decode x':>8} {'total x':>8} {'x kernel':>8} {'roofline s':>10} {'vs roof':>7} {'kept':>7} "
            f"{'peak GiB':>8}")  # fmt: skip
    lines = [head]
    for n in sorted({r["visual_tokens"] for r in rows}):
        mine = {m: [r for r in rows if r["visual_tokens"] == n and r["method"] == m] for m in methods}
        dense_decode, dense_total = _median(mine["dense"], "decode_s"), _median(mine["dense"], "total_s")
        kernel = mine.get("dense-kernel")
        kernel_total = _median(kernel, "total_s") if kernel else math.nan
        for method, group in mine.items():
            decode_s, total_s = _median(group, "decode_s"), _median(group, "total_s")
            roof = _median(group, "roofline_decode_s")
            peaks = [r["peak_memory_bytes"] for r in group if r["peak_memory_bytes"] is not None]
            peak = max(peaks) if peaks else None
            lines.append(
                f"{n:>7,} {method:<{width}} {_median(group, 'prefill_s'):>9.3f} {decode_s:>9.3f} "
                f"{1e3 * _median(group, 'decode_step_s'):>8.2f} {total_s:>8.3f} {dense_decode / decode_s:>7.2f}x "
                f"{dense_total / total_s:>7.2f}x {kernel_total / total_s:>7.2f}x {roof:>10.3f} "
                f"{decode_s / roof:>6.1f}x "
                f"{100 * _median(group, 'kept_fraction'):>6.2f}% {'-' if peak is None else f'{peak / GIB:.1f}':>8}"
            )  # fmt: skip
    lines.append("(medians over repeats; decode x / total x: dense (SDPA) time / this method's; x kernel: "
                 "dense-kernel total time / this method's; vs roof: decode time / "
                 "roofline; kept: visual tokens visible at the deepest layer, mean over decode steps and "
                 "rows)")  # fmt: skip
    return lines


def default_path(device_block: dict[str, Any]) -> Path:
    """``bench/results/latency-<device kind>-<UTC date>.json``."""
    date = dt.datetime.now(dt.UTC).date().isoformat()
    return Path("bench") / "results" / f"latency-{device_kind(device_block)}-{date}.json"


def merge_results(paths: Sequence[Path]) -> dict[str, Any]:
    """One latency result from several of the same protocol and device that measured different
    visual contexts (e.g. one command per context under a time limit per command).

    The first file's header is kept; ``rows`` are joined, ``protocol.visual_tokens`` is their
    union, and ``merged_from`` lists each file's path, command, date, bandwidth and total time
    (each row keeps the roofline of its own run's bandwidth).

    Raises:
        BenchError: a file that is not a latency result, another protocol or device, or a context
            measured twice.
    """
    results = []
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise BenchError(f"--merge {path}: cannot be read as JSON ({e})") from None
        if not isinstance(result, dict) or result.get("kind") != "latency" or "protocol" not in result:
            raise BenchError(f"--merge {path}: not a result of this benchmark")
        results.append(result)

    def settings(result: dict[str, Any]) -> dict[str, Any]:
        protocol = {k: v for k, v in result["protocol"].items() if k != "visual_tokens"}
        return protocol | {"device": result["device"].get("name")}

    first, seen = settings(results[0]), set[int]()
    for path, result in zip(paths, results, strict=True):
        mine = settings(result)
        differ = sorted(k for k in first.keys() | mine.keys() if first.get(k) != mine.get(k))
        if differ:
            raise BenchError(f"--merge {path}: {', '.join(differ)} differ from {paths[0]}")
        contexts = {int(r["visual_tokens"]) for r in result["rows"]}
        if contexts & seen:
            raise BenchError(f"--merge {path}: visual_tokens {sorted(contexts & seen)} measured twice")
        seen |= contexts
    merged = dict(results[0])
    merged["protocol"] = {**results[0]["protocol"], "visual_tokens": sorted(seen)}
    merged["rows"] = sorted((row for r in results for row in r["rows"]), key=lambda row: row["visual_tokens"])
    merged["merged_from"] = [{"path": str(p), "command": r["command"], "date": r["date"], "total_s": r.get("total_s"),
                              "bandwidth_bytes_per_s": r["bandwidth"]["bytes_per_s"]}
                             for p, r in zip(paths, results, strict=True)]  # fmt: skip
    merged["total_s"] = sum(float(r.get("total_s") or 0.0) for r in results)
    return merged


def merge_command(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """``--merge FILE... --json PATH``: write :func:`merge_results` and print its table."""
    if args.json is None:
        raise BenchError("--merge needs --json PATH (where the joined result goes)")
    result = merge_results(args.merge)
    for line in summary_lines(result["rows"]):
        print(line)
    write_result(args.json, result)
    return result, args.json


def run(args: argparse.Namespace, protocol: Protocol, *, argv: Sequence[str] | None = None, command: str | None = None,
        progress: bool = True) -> tuple[dict[str, Any], Path]:  # fmt: skip
    """:func:`main` after parsing: the benchmark for ``protocol``, written to ``args.json`` (or the
    default path, :func:`default_path`); returns the result and where it was written."""
    import transformers

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), load_average()
    if protocol.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(protocol.device))  # resolve_device gave it an index
        check_memory(protocol)
    bandwidth = measure_bandwidth(protocol.device, protocol.copy_mib * MIB)
    model = build_model(protocol)
    n_params = text_parameters(model)
    g = protocol.geometry
    weights = g.parameters() * protocol.dtype_bytes
    kv_gib = [(resident_bytes(protocol, n) - weights) / GIB for n in protocol.visual_tokens]
    print(f"model: random Qwen3-VL text, {g.layers} layers, hidden {g.hidden}, {g.heads}/{g.kv_heads} heads x "
          f"{g.head_dim}, MLP {g.intermediate}, vocab {g.vocab} (tied); {n_params / 1e9:.3f} B text parameters, "
          f"{protocol.dtype} on {protocol.device}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"load average {load_before}", flush=True)  # fmt: skip
    print(f"protocol: batch {protocol.batch}, {protocol.text_tokens} text + N_v {list(protocol.visual_tokens)} tokens, "
          f"prefill chunk {protocol.prefill_chunk or 'whole prompt'}, {protocol.decode_steps} decode steps, "
          f"{protocol.warmup} warm-up + {protocol.repeats} timed runs per method; static KV cache "
          f"{', '.join(f'{x:.2f}' for x in kv_gib)} GiB; backend {protocol.backend}; copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s", flush=True)  # fmt: skip
    rows = measure(model, protocol, bandwidth, progress)
    print()
    for line in summary_lines(rows):
        print(line)
    elapsed, load_after = time.perf_counter() - started, load_average()
    print(f"total {elapsed:.0f} s; load average {load_after}")
    header = result_header(MODULE, argv, load_before, load_after, device=protocol.device, command=command)
    result = {
        "kind": "latency",
        **header,
        "extra_versions": kernel_versions(),
        "protocol": protocol.as_json(),
        "model": {"class": type(model).__name__, "family": "qwen3_vl", "text_parameters": n_params,
                  "parameter_bytes": n_params * protocol.dtype_bytes, "anchor": anchor_of(protocol),
                  "method": f"VisionPulse(tau=0.1, b_min=0.01, b_max=0.05), Pruner mode physical, kept_block "
                            f"{protocol.kept_block}"},  # fmt: skip
        "bandwidth": {"bytes_per_s": bandwidth, "copy_bytes": protocol.copy_mib * MIB, "repeats": BANDWIDTH_REPEATS,
                      "how": "best of the timed device-to-device copies; bytes moved = 2 x copy size"},  # fmt: skip
        "rows": rows,
        "total_s": elapsed,
    }
    path = args.json or default_path(header["device"])
    write_result(path, result)
    return result, path


def main(argv: Sequence[str] | None = None, *, command: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the benchmark, print the table, write and return the result (see the module doc).

    ``command`` is recorded as the exact command (default: ``python -m vpstudy.bench.latency ...``).
    """
    args, protocol = parse_args(argv)
    try:
        if args.merge:
            return merge_command(args)[0]
        return run(args, protocol, argv=argv, command=command, progress=progress and not args.no_progress)[0]
    except BenchError as e:
        print(f"python -m {MODULE}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
