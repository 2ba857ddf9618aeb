"""Benchmark: memory, disk and time of ``vpstudy record`` under each store policy.

Run ``python -m vpstudy.bench.store`` (``--help`` for options). This is a benchmark, not a test:
it prints measurements and ratios and never fails on them.

Protocol
--------
The random Qwen2-VL-family model of :mod:`vpstudy.bench.recording` (text hidden 512, ``--layers``
layers, 8 query / 2 KV heads) is written to a temporary directory with a one-sample dataset whose
image gives exactly ``--visual-tokens`` merged visual tokens. Each *mode* then runs in its own
fresh Python process, so that its peak resident memory is its own:

``sdpa``
    plain ``model.generate`` on the SDPA model with the cache ``vpstudy record`` picks
    (:func:`vpstudy.caching.resolve_cache`, ``auto``): the baseline;
``full`` / ``analysis`` / ``scalars``
    :func:`vpstudy.collect.record_dataset` (what ``vpstudy record`` runs) recording every text
    layer under that store policy into a run directory.

With ``--repeats R`` the modes run R rounds, interleaved (sdpa, full, analysis, scalars, sdpa,
...), and each mode reports the round with its median decode time (all rounds' times are in the
JSON). Every mode decodes exactly ``--steps`` new tokens (``min_new_tokens`` = ``max_new_tokens``, so a
random model's EOS cannot end it early), greedy, batch 1. A forward pre-hook on the model
timestamps every forward call and reads the process's resident set size (``/proc/self/statm``)
every ``--rss-every`` steps. Reported per mode:

- ``decode_step_s``: from the start of the first decode forward to the end of the generation,
  divided by the decode steps (prefill excluded); the ratio to ``sdpa`` is the record cost;
- ``peak_rss_bytes``: the process's peak RSS (``getrusage``), which includes the model, the
  prefill and the interpreter;
- ``rss_growth_bytes``: RSS at the last decode step minus RSS at the first sampled decode step,
  and the RSS curve itself: whether memory grows with the number of steps;
- ``disk``: bytes of the sample's arrays in the run (``arrays/<key>/``), of its tables (parquet)
  and of all its files, against :func:`vpstudy.storage.estimate` for the same settings.

Targets from issue 12 (reported, never asserted): under the default policy, memory flat in the
number of steps and ``record / sdpa <= 1.3`` per decode step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .recording import PIXELS_PER_TOKEN_SIDE, Geometry, image_grid, write_model
from .results import load_average, result_header, write_result

POLICIES: tuple[str, ...] = ("full", "analysis", "scalars")
MODES: tuple[str, ...] = ("sdpa", *POLICIES)
RECORD_TARGET = 1.3  # record / sdpa per decode step: at most
SAMPLE_ID = "bench-0"


def _rss_bytes() -> int:
    """The process's current resident set size (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """The process's peak resident set size (``ru_maxrss`` is in kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ForwardProbe:
    """Forward pre-hook: the start time of every forward call, and RSS every ``rss_every`` calls."""

    def __init__(self, model: Any, rss_every: int) -> None:
        self.stamps: list[float] = []
        self.rss: list[tuple[int, int]] = []  # (forward call index, RSS bytes)
        self.rss_every = rss_every
        self.handle = model.register_forward_pre_hook(self._stamp)

    def _stamp(self, *_: Any) -> None:
        i = len(self.stamps)
        self.stamps.append(time.perf_counter())
        if i % self.rss_every == 0:
            self.rss.append((i, _rss_bytes()))


def _child(args: argparse.Namespace) -> dict[str, Any]:
    """One mode in this process; returns its measurements (printed as the last stdout line)."""
    import vpstudy
    from vpstudy.caching import generate_kwargs, resolve_cache
    from vpstudy.collect import RecordSettings, record_dataset
    from vpstudy.datasets import load_dataset
    from vpstudy.storage import StorePolicy

    from .recording import build_inputs, configure_image_processor

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, processor = vpstudy.load(args.model, attn_implementation="sdpa")
    configure_image_processor(processor, args.visual_tokens)
    n = args.steps
    probe = ForwardProbe(model, args.rss_every)
    with torch.inference_mode():
        if args.child == "sdpa":
            inputs, _ = build_inputs(model, processor, args.visual_tokens)
            start = time.perf_counter()
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           **generate_kwargs(resolve_cache(model, "auto")))  # fmt: skip
            end = time.perf_counter()
        else:
            model.generation_config.min_new_tokens = n  # record_dataset passes max_new_tokens only
            settings = RecordSettings(max_new_tokens=n, store=StorePolicy(args.child))
            start = time.perf_counter()
            record_dataset(model, processor, load_dataset(args.data), args.out, settings, model_path=args.model,
                           progress=False, estimate_size=True)  # fmt: skip
            end = time.perf_counter()
    probe.handle.remove()
    # forward 0 is the prefill; forwards 1 .. n-1 are decode steps (the n-th token comes from the last)
    decode_start = probe.stamps[1]
    decode_steps = len(probe.stamps) - 1
    decode_rss = [(i, rss) for i, rss in probe.rss if i >= 1]
    result: dict[str, Any] = {
        "mode": args.child,
        "forward_calls": len(probe.stamps),
        "total_s": end - start,
        "decode_steps": decode_steps,
        "decode_step_s": (end - decode_start) / decode_steps,
        "peak_rss_bytes": _peak_rss_bytes(),
        "rss_by_step": decode_rss,
        "rss_growth_bytes": decode_rss[-1][1] - decode_rss[0][1] if decode_rss else None,
    }
    if args.child != "sdpa":
        result["disk"] = disk_usage(Path(args.out))
    return result


def disk_usage(run: Path) -> dict[str, int]:
    """Bytes of a one-sample run by part: the sample's arrays, the tables, and all files."""
    sample = sum(f.stat().st_size for f in (run / "arrays").rglob("*") if f.is_file())
    tables = sum(f.stat().st_size for f in run.rglob("*.parquet") if f.is_file())
    total = sum(f.stat().st_size for f in run.rglob("*") if f.is_file())
    return {"sample_arrays": sample, "tables": tables, "total": total}


def _run_child(mode: str, model: Path, data: Path, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one mode in a fresh Python process and return its measurements (and its size estimate line)."""
    command = [sys.executable, "-m", "vpstudy.bench.store", "--child", mode, "--model", str(model), "--data", str(data),
               "--out", str(root / f"run-{mode}"), "--steps", str(args.steps), "--visual-tokens",
               str(args.visual_tokens), "--layers", str(args.layers), "--rss-every", str(args.rss_every)]  # fmt: skip
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"mode {mode} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    notes = [line for line in proc.stderr.splitlines() if line.startswith("store ")]
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"estimate_line": notes[:1]}


def write_inputs(root: Path, geometry: Geometry, visual_tokens: int) -> tuple[Path, Path]:
    """The benchmark model and a one-sample JSONL dataset whose image gives ``visual_tokens`` tokens."""
    from PIL import Image

    model = write_model(root / "model", geometry)
    rows, cols = image_grid(visual_tokens)
    pixels = np.random.default_rng(0).integers(0, 255, (rows * PIXELS_PER_TOKEN_SIDE, cols * PIXELS_PER_TOKEN_SIDE, 3),
                                               dtype=np.uint8)  # fmt: skip
    Image.fromarray(pixels).save(root / "image.png")
    data = root / "data.jsonl"
    data.write_text(json.dumps({"id": SAMPLE_ID, "image": "image.png", "question": "describe the image",
                                "answer": "x"}) + "\n")  # fmt: skip
    return model, data


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The benchmark's options from ``argv`` (``sys.argv[1:]`` when None), with ``mode_list`` the
    parsed ``--modes`` (which must include ``sdpa``); exits via argparse on invalid values."""
    parser = argparse.ArgumentParser(
        prog="python -m vpstudy.bench.store",
        description="Peak memory, bytes on disk and decode-step time of vpstudy record under each store policy "
                    "(see the module doc).",  # fmt: skip
    )
    parser.add_argument("--layers", type=int, default=8, help="text layers, all recorded (default 8)")
    parser.add_argument("--visual-tokens", type=int, default=4096, help="merged visual tokens (default 4096)")
    parser.add_argument("--steps", type=int, default=2048, help="decode steps of the one sample (default 2048)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds over the modes, interleaved; each mode reports its median round (default 1)")
    parser.add_argument("--rss-every", type=int, default=64, help="read RSS every this many steps (default 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each mode's process")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if bad := [m for m in modes if m not in MODES]:
        parser.error(f"--modes: unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    if "sdpa" not in modes:
        parser.error("--modes must include sdpa, the baseline the ratios are taken against")
    args.mode_list = modes
    if min(args.layers, args.visual_tokens, args.rss_every, args.repeats) < 1 or args.steps < 2:
        parser.error("--layers, --visual-tokens, --rss-every and --repeats must be >= 1, --steps >= 2")
    return args


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f}"


def _kb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e3:,.1f}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every mode in its own process, print the table, return (and optionally write) the results."""
    from vpstudy.recorder import DEFAULT_TEMPERATURES, DEFAULT_THRESHOLDS
    from vpstudy.storage import estimate

    args = parse_args(argv)
    if args.child is not None:
        result = _child(args)
        print(json.dumps(result), flush=True)
        return result
    geometry = Geometry(512, args.layers, 8, 2, 1376)
    load_before = load_average()
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="vpstudy-bench-store-") as tmp:
        root = Path(tmp)
        model, data = write_inputs(root, geometry, args.visual_tokens)
        print(f"model: random qwen2_vl, hidden 512, {args.layers} layers (all recorded), {args.visual_tokens} visual "
              f"tokens, {args.steps} decode steps, batch 1; one process per mode; load average {load_before}",
              flush=True)  # fmt: skip
        rounds: dict[str, list[dict[str, Any]]] = {mode: [] for mode in args.mode_list}
        for round_ in range(args.repeats):
            for mode in args.mode_list:  # interleaved, so that machine noise hits every mode alike
                shutil.rmtree(root / f"run-{mode}", ignore_errors=True)
                r = _run_child(mode, model, data, root, args)
                rounds[mode].append(r)
                print(f"round {round_ + 1}/{args.repeats} {mode}: {1e3 * r['decode_step_s']:.2f} ms/step, peak RSS "
                      f"{_mb(r['peak_rss_bytes'])} MB, RSS growth over decode {_mb(r['rss_growth_bytes'])} MB, disk "
                      f"{_kb(r.get('disk', {}).get('total'))} kB", flush=True)  # fmt: skip
                for line in r["estimate_line"] if round_ == 0 else []:
                    print(f"  {line}", flush=True)
        for mode, runs in rounds.items():  # the round with the median decode time stands for the mode
            ordered = sorted(runs, key=lambda r: r["decode_step_s"])
            median = ordered[(len(ordered) - 1) // 2]
            results[mode] = median | {"decode_step_s_rounds": [r["decode_step_s"] for r in runs]}
    base = results["sdpa"]["decode_step_s"]
    for mode in args.mode_list:
        if mode == "sdpa":
            continue
        r = results[mode]
        r["record/sdpa"] = r["decode_step_s"] / base
        n_score = {"full": args.layers, "analysis": 1, "scalars": 0}[mode]
        est = estimate(policy=mode, layers=args.layers, score_layers=n_score, n_visual=args.visual_tokens,
                       steps=args.steps, thresholds=len(DEFAULT_THRESHOLDS),
                       temperatures=len(DEFAULT_TEMPERATURES))  # fmt: skip
        r["estimate"] = {"scores": est.scores, "max_scores": est.max_scores, "steps_table": est.steps_table,
                         "disk": est.disk, "device_buffers": est.device_buffers}  # fmt: skip
    print()
    print(f"{'mode':9} {'ms/step':>8} {'x sdpa':>7} {'peak RSS MB':>12} {'RSS growth MB':>14} {'disk kB':>11} "
          f"{'estimate kB':>12}")  # fmt: skip
    for mode in args.mode_list:
        r = results[mode]
        ratio = "" if mode == "sdpa" else f"{r['record/sdpa']:.3f}"
        print(f"{mode:9} {1e3 * r['decode_step_s']:8.2f} {ratio:>7} {_mb(r['peak_rss_bytes']):>12} "
              f"{_mb(r['rss_growth_bytes']):>14} {_kb(r.get('disk', {}).get('total')):>11} "
              f"{_kb(r.get('estimate', {}).get('disk')):>12}")  # fmt: skip
    print(f"target (issue 12): record/sdpa <= {RECORD_TARGET} and RSS flat in steps under the default policy "
          "(analysis); reported, not asserted")
    out: dict[str, Any] = result_header("vpstudy.bench.store", argv, load_before, load_average()) | {
        "wall_s": time.perf_counter() - started,
        "geometry": {"hidden": 512, "layers": args.layers, "heads": 8, "kv_heads": 2, "intermediate": 1376},
        "visual_tokens": args.visual_tokens,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads_per_mode": args.threads,  # torch threads in each mode's process (None: torch's default)
        "modes": results,
        "target": {"record/sdpa": RECORD_TARGET},
    }
    write_result(args.json, out)
    return out


if __name__ == "__main__":
    main()
