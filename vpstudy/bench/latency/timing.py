"""Timing one method on one context: the chunked prefill and the decode loop on the static
cache, the pruner or dense-kernel context a method runs in, and the interleaved measurement of
every method and context (:func:`measure`)."""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vpstudy.backends.dense import DenseDecode
from vpstudy.pruning import Pruner, VisionPulse

from .model import Prompt, build_prompt, static_cache, text_parameters
from .protocol import WARMUP_DECODE_STEPS, BenchError, Protocol, synchronize
from .roofline import roofline_bytes


def prefill(model: Any, cache: Any, prompt: Prompt, chunk: int, start: int = 0) -> torch.Tensor:
    """Run the prompt through the model in chunks of ``chunk`` tokens (the LM head sees only the
    last position); returns the greedy next token, [B, 1]. With ``start`` > 0 the cache holds the
    prompt's first ``start`` tokens already and the rest is run."""
    if not 0 <= start < prompt.length:
        raise BenchError(f"prefill start {start} is outside the prompt's {prompt.length} tokens")
    logits = None
    for begin in range(start, prompt.length, chunk):
        end = min(begin + chunk, prompt.length)
        logits = model(input_ids=prompt.input_ids[:, begin:end], position_ids=prompt.position_ids[:, :, begin:end],
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits  # fmt: skip
    assert logits is not None  # the range is not empty: start < prompt.length
    return logits[:, -1].argmax(-1, keepdim=True)


def decode(model: Any, cache: Any, token: torch.Tensor, positions: torch.Tensor, progress: tqdm | None,
           step_times: list[float] | None = None) -> torch.Tensor:  # fmt: skip
    """``len(positions)`` single-token forwards, each fed the previous greedy token.

    Args:
        model: the benchmark model.
        cache: its ``StaticCache``, filled by the prefill (each step writes one more slot).
        token: [B, 1] the first token to feed (the prefill's).
        positions: [S, 4, B, 1] position ids per step (:meth:`Prompt.decode_positions`).
        progress: a tqdm bar advanced by one per step, or None.
        step_times: if given, each step's wall time (forward and token choice, seconds) is
            appended (on CPU; a CUDA caller synchronises itself).

    Returns:
        [B, S] the greedy token of each step (kept on the device; nothing synchronises).
    """
    tokens = []
    for step in range(positions.shape[0]):
        started = time.perf_counter()
        logits = model(input_ids=token, position_ids=positions[step], past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits  # fmt: skip
        token = logits[:, -1].argmax(-1, keepdim=True)
        if step_times is not None:
            step_times.append(time.perf_counter() - started)
        tokens.append(token)
        if progress is not None:
            progress.update(1)
    return torch.cat(tokens, dim=1)


@dataclass
class Run:
    """One run of one method on one context (seconds; counts per decode step and row)."""

    prefill_s: float
    decode_s: float
    peak_memory_bytes: int | None
    kept: np.ndarray | None  # [S, B] visible visual tokens at the deepest layer (None: dense)
    backend: str


def _ran_backend(owner: Pruner | DenseDecode) -> str:
    """The decode backend that ran (``gather``: the pruner's gathered reference path ran instead)."""
    return owner.backend.name if owner.backend is not None else "gather"


def vision_pulse() -> VisionPulse:
    """The benchmarked method: the paper's τ = 0.1 setting, budget 1–5 %, default anchor."""
    return VisionPulse(tau=0.1, b_min=0.01, b_max=0.05)


def anchor_of(protocol: Protocol) -> int:
    """The anchor layer of :func:`vision_pulse` in the protocol's model (17 of 36)."""
    return vision_pulse().stages(protocol.geometry.layers)[0].decide_at


def make_pruner(model: Any, backend: str, kept_block: int = 1) -> Pruner:
    """:func:`vision_pulse` in a physical-mode Pruner on ``backend`` (block-sparse with ``kept_block`` > 1)."""
    return Pruner(model, [vision_pulse()], mode="physical", backend=backend, kept_block=kept_block)


def kept_counts(pruner: Pruner, steps: int, n_visual: int) -> np.ndarray:
    """[steps, B] visual tokens visible at the deepest layer on the last ``steps`` forwards.

    Raises:
        BenchError: the pruner did not see all N_v visual tokens.
    """
    traces = pruner.kept()
    seen = sorted({int(trace.counts[-1, 0]) for trace in traces})  # layer 0 < anchor: every visual token
    if seen != [n_visual]:
        raise BenchError(f"the pruner found {seen} of {n_visual} visual tokens in the prompt")
    return np.stack([trace.counts[-steps:, -1] for trace in traces], axis=1)


def run_method(model: Any, method: str, protocol: Protocol, cache: Any, prompt: Prompt, steps: int,
               progress: bool = True) -> Run:  # fmt: skip
    """One prefill + ``steps`` decode steps of ``method``, timed with the device synchronised."""
    device, cuda = protocol.device, protocol.device.startswith("cuda")
    positions = prompt.decode_positions(steps)
    pruner = make_pruner(model, protocol.backend, protocol.kept_block) if method.startswith("visionpulse") else None
    dense_kernel = DenseDecode(model, protocol.backend) if method == "dense-kernel" else None
    owner = pruner or dense_kernel
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=steps, desc=f"  {method} N_v={prompt.n_visual:,} decode", unit="step", leave=False,
               disable=not progress)  # fmt: skip
    with torch.inference_mode(), owner if owner is not None else contextlib.nullcontext():
        cache.reset()  # the cache's tensors are inference tensors: reset them in inference mode
        synchronize(device)
        started = time.perf_counter()
        token = prefill(model, cache, prompt, protocol.chunk(prompt.n_visual))
        synchronize(device)
        prefilled = time.perf_counter()
        decode(model, cache, token, positions, bar)
        synchronize(device)
        ended = time.perf_counter()
    bar.close()
    peak = int(torch.cuda.max_memory_allocated(device)) if cuda else None
    kept = kept_counts(pruner, steps, prompt.n_visual) if pruner is not None else None
    backend = "sdpa" if owner is None else _ran_backend(owner)  # what ran: "auto" resolves on the first decode call
    if protocol.kept_block > 1 and backend == "gather":
        raise BenchError(f"--kept-block {protocol.kept_block} needs the Pruner's decode-backend fast path, but "
                         f"its gathered path ran (--backend {protocol.backend})")
    return Run(prefilled - started, ended - prefilled, peak, kept, backend)


def measure(model: Any, protocol: Protocol, bandwidth: float, progress: bool = True) -> list[dict[str, Any]]:
    """Every context: warm-up, then timed runs with the methods interleaved; one row per timed run."""
    anchor = anchor_of(protocol)
    parameter_bytes = text_parameters(model) * protocol.dtype_bytes
    rows: list[dict[str, Any]] = []
    for n_visual in tqdm(protocol.visual_tokens, desc="contexts", unit="context", disable=not progress):
        prompt = build_prompt(model, protocol, n_visual)
        cache = static_cache(model, prompt.length + protocol.decode_steps)
        for _ in range(protocol.warmup):
            for method in protocol.methods:
                run_method(model, method, protocol, cache, prompt, min(WARMUP_DECODE_STEPS, protocol.decode_steps),
                           progress)  # fmt: skip
        for repeat in range(protocol.repeats):
            for method in protocol.methods:
                run = run_method(model, method, protocol, cache, prompt, protocol.decode_steps, progress)
                roof = roofline_bytes(protocol.geometry, parameter_bytes=parameter_bytes,
                                      dtype_bytes=protocol.dtype_bytes, batch=protocol.batch,
                                      prompt_tokens=prompt.length, n_visual=n_visual, steps=protocol.decode_steps,
                                      kept=run.kept, anchor=anchor)  # fmt: skip
                kept = 1.0 if run.kept is None else float(run.kept.mean() / n_visual)
                tqdm.write(f"N_v {n_visual:,} {method} run {repeat + 1}/{protocol.repeats}: prefill "
                           f"{run.prefill_s:.3f} s, decode {run.decode_s:.3f} s "
                           f"({1e3 * run.decode_s / protocol.decode_steps:.2f} ms/step), kept {100 * kept:.2f}%, "
                           f"backend {run.backend}")  # fmt: skip
                rows.append({
                    "visual_tokens": n_visual, "method": method, "repeat": repeat, "prompt_tokens": prompt.length,
                    "prefill_s": run.prefill_s, "decode_s": run.decode_s, "total_s": run.prefill_s + run.decode_s,
                    "decode_step_s": run.decode_s / protocol.decode_steps,
                    "roofline_decode_s": float(roof.sum() / bandwidth), "roofline_decode_bytes": float(roof.sum()),
                    "kept_fraction": kept, "backend": run.backend, "peak_memory_bytes": run.peak_memory_bytes,
                })  # fmt: skip
        del cache, prompt
        gc.collect()
        if protocol.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows

