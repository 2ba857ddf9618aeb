"""The decode roofline: the bytes a decode step must read (:func:`roofline_bytes`) and the
memory bandwidth measured in the same run (:func:`measure_bandwidth`); their ratio is the least
time a memory-bound step can take."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from .protocol import BANDWIDTH_REPEATS, ModelGeometry, synchronize


def measure_bandwidth(device: str, nbytes: int, repeats: int = BANDWIDTH_REPEATS) -> float:
    """Copy bandwidth of ``device`` in bytes/s: a ``nbytes`` device-to-device copy (read + write,
    2 × nbytes moved), best of ``repeats`` timed copies after one untimed."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = math.inf
    for i in range(repeats + 1):
        synchronize(device)
        started = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        if i:
            best = min(best, time.perf_counter() - started)
    del src, dst
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return 2 * nbytes / best


def measure_read_bandwidth(device: str, nbytes: int, repeats: int = BANDWIDTH_REPEATS) -> float:
    """Read bandwidth of ``device`` in bytes/s: the best of ``repeats`` timed sums over a
    ``nbytes`` float32 tensor after one untimed (a sum reads each byte once and writes nothing,
    as a decode step mostly does)."""
    data = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    best = math.inf
    for i in range(repeats + 1):
        synchronize(device)
        started = time.perf_counter()
        data.sum()
        synchronize(device)
        if i:
            best = min(best, time.perf_counter() - started)
    del data
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return 4 * max(1, nbytes // 4) / best


def roofline_bytes(geometry: ModelGeometry, *, parameter_bytes: int, dtype_bytes: int, batch: int, prompt_tokens: int,
                   n_visual: int, steps: int, kept: np.ndarray | None = None,
                   anchor: int | None = None) -> np.ndarray:  # fmt: skip
    """Bytes each decode step must read from memory, at least.

    Step s (0-based) attends ``n_s = prompt_tokens + s + 1`` keys (its own included). Every step
    reads every parameter once (``parameter_bytes``; a tied embedding once, as the LM head), and
    at each layer the K and V of the keys it attends, per sequence:

    - dense: all ``n_s`` keys at every layer;
    - VisionPulse (``kept`` given): all keys at layers < ``anchor``; at layers ≥ ``anchor`` the
      ``n_s − N_v`` non-visual keys and the row's kept visual keys; plus K of all ``n_s`` keys
      once more at the anchor, for the scoring.

    Writes (the new key, activations) and the LM head's logits are left out.

    Args:
        geometry: the model's geometry (layers, KV heads, head dim).
        parameter_bytes: bytes of the parameters read per step.
        dtype_bytes: bytes per K/V element.
        batch: sequences (rows) decoded together.
        prompt_tokens: prompt length in tokens (text and visual).
        n_visual: N_v, the visual tokens of each prompt.
        steps: S, the decode steps.
        kept: [steps, batch] kept visual keys per step and row.
        anchor: the anchor layer (with ``kept``).

    Returns:
        [steps] float64 bytes.
    """
    keys = prompt_tokens + np.arange(steps, dtype=np.float64) + 1  # [S]
    per_key = geometry.kv_bytes_per_key(dtype_bytes)  # K + V, one layer, one row
    if kept is None:
        return parameter_bytes + geometry.layers * batch * per_key * keys
    if anchor is None or not 0 <= anchor < geometry.layers:
        raise ValueError(f"anchor {anchor} is not a layer of a {geometry.layers}-layer model")
    kept = np.asarray(kept, dtype=np.float64).reshape(steps, batch)
    dense_layers = anchor * batch * per_key * keys
    sparse_keys = (keys[:, None] - n_visual + kept).sum(axis=1)  # [S], summed over rows
    sparse_layers = (geometry.layers - anchor) * per_key * sparse_keys
    scoring = batch * (per_key // 2) * keys  # K only, at the anchor
    return parameter_bytes + dense_layers + sparse_layers + scoring

