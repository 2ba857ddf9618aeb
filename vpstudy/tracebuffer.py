"""Where the recorder's per-step values wait on the model's device, and how they leave it in chunks.

The recorder (:mod:`vpstudy.recorder`) computes, at every recorded layer and step, one
:class:`~vpstudy.attention.VisualRow` per batch row. A :class:`TraceBuffer` holds a fixed number
of steps (``chunk_steps``) of them in tensors allocated once per generation on the device:
p̄ at the *score layers* only (in the score dtype, float16 for a run), and the scalars (mass,
max-head mass, the budget signal per τ, the active count per δ) at every recorded layer, plus the
running max of p̄ at every recorded layer. When a chunk is full (and when the generation ends) it
is moved off the device in one copy: the scalars are kept on the host (S · L · (2 + T + K) · 4
bytes per row), and the p̄ chunk goes to a *sink* (:class:`TraceSink`: ``vpstudy record`` writes
it to the sample's arrays) or, without one, is kept on the host for
:meth:`vpstudy.recorder.Recorder.traces`. So the device memory of a recording does not depend on
the trace length, and with a sink neither does the host's share for p̄.

Step indices: entry 0 is the first step recorded in a generation (step 0, the last prompt row,
unless the prefill ran outside the recorder). A row's trace holds entries ``0 .. n_steps - 1``;
the recorder counts ``n_steps`` per row (it stops at the row's EOS), and a chunk tells the sink
how many of its steps belong to each row (:attr:`TraceChunk.valid`).

The recorder drives a buffer with four calls: :meth:`TraceBuffer.start` when a generation
begins, :meth:`TraceBuffer.advance` at every later forward (after counting the row's steps),
:meth:`TraceBuffer.put` from each recorded layer's attention call, and :meth:`TraceBuffer.finish`
when the traces are read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .attention import VisualRow


@dataclass(frozen=True)
class TraceChunk:
    """One chunk of p̄ moved off the device.

    Attributes:
        start: the entry index of the chunk's first step.
        valid: [B] how many of the chunk's steps belong to each row's trace (0 once a row has
            ended before the chunk).
        n_visual: [B] each row's N_v (``scores[b, :, :, :n_visual[b]]`` are its visual tokens).
        scores: [B, C, L_s, N_max] p̄ at the score layers, in the buffer's score dtype.
    """

    start: int
    valid: np.ndarray
    n_visual: np.ndarray
    scores: np.ndarray


class TraceSink(Protocol):
    """Receives each chunk of p̄ as it leaves the device (e.g. writes it to disk)."""

    def __call__(self, chunk: TraceChunk) -> None:
        """Take one chunk (its arrays are the sink's to keep)."""


@dataclass
class HostTrace:
    """What a generation recorded, on the host, one entry per step (B = batch rows)."""

    mass: np.ndarray  # [B, S, L] float32
    max_head_mass: np.ndarray  # [B, S, L] float32
    tau_max_head_mass: np.ndarray  # [B, S, L, T] float32
    active: np.ndarray  # [B, S, L, K] int32
    running_max: np.ndarray  # [L, B, N_max] float32
    scores: np.ndarray | None  # [B, S, L_s, N_max] (None: streamed to a sink, or no score layers)


_TORCH_TO_NUMPY = {torch.float16: np.float16, torch.bfloat16: np.float32, torch.float32: np.float32}


class TraceBuffer:
    """A fixed-size device buffer of recorded steps, emptied chunk by chunk (module docstring).

    Args:
        n_layers: recorded layers (L).
        score_positions: positions among the recorded layers whose p̄ is kept (L_s of them).
        n_thresholds: activity thresholds δ (K).
        n_temperatures: budget temperatures τ (T).
        chunk_steps: steps per chunk (C).
        score_dtype: dtype p̄ leaves the device in (float16 for a run, float32 for exactness).
    """

    def __init__(self, n_layers: int, score_positions: Sequence[int], n_thresholds: int, n_temperatures: int,
                 chunk_steps: int, score_dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        if chunk_steps < 1:
            raise ValueError(f"chunk_steps must be >= 1, got {chunk_steps}")
        if score_dtype not in _TORCH_TO_NUMPY:
            raise ValueError(f"score_dtype must be one of {list(_TORCH_TO_NUMPY)}, got {score_dtype}")
        self.n_layers, self.n_thresholds, self.n_temperatures = n_layers, n_thresholds, n_temperatures
        self.slot = {position: i for i, position in enumerate(score_positions)}  # layer position -> score slot
        self.chunk_steps, self.score_dtype = chunk_steps, score_dtype
        self.sink: TraceSink | None = None
        self._tensors: dict[str, torch.Tensor] = {}
        self._host: dict[str, list[np.ndarray]] = {}
        self._n_visual = np.zeros(0, dtype=np.int64)
        self._chunk_start = 0  # entry index of the buffer's first step
        self._filled = 0  # steps of the buffer written so far
        self._entry = -1  # entry index of the step being recorded
        self._new_entry = True  # the next put starts a new step
        self._finished = True

    # --- the recorder's calls ---------------------------------------------------------------

    def start(self, batch: int, n_visual: torch.Tensor, n_max: int, device: torch.device) -> None:
        """A generation begins: allocate the buffers for ``batch`` rows of up to ``n_max`` visual
        tokens (``n_visual`` [B] per row) on ``device`` and forget the previous generation."""
        c, layers, slots = self.chunk_steps, self.n_layers, len(self.slot)
        self._tensors = {
            "mass": torch.zeros(batch, c, layers, device=device),
            "max_head_mass": torch.zeros(batch, c, layers, device=device),
            "tau_max_head_mass": torch.zeros(batch, c, layers, self.n_temperatures, device=device),
            "active": torch.zeros(batch, c, layers, self.n_thresholds, dtype=torch.int32, device=device),
            "scores": torch.zeros(batch, c, slots, n_max, dtype=self.score_dtype, device=device),
            "running_max": torch.zeros(layers, batch, n_max, device=device),
        }
        self._host = {name: [] for name in ("mass", "max_head_mass", "tau_max_head_mass", "active", "scores")}
        self._n_visual = n_visual.detach().to("cpu").numpy().astype(np.int64)
        self._chunk_start, self._filled, self._entry, self._new_entry = 0, 0, -1, True
        self._finished = False

    def advance(self, n_steps: torch.Tensor) -> None:
        """A new forward of the generation: the next :meth:`put` records a new step. ``n_steps``
        [B] counts each row's steps including that one (a row that has ended stops counting);
        a full buffer is moved off the device first."""
        if self._finished:
            return
        if self._filled == self.chunk_steps:
            self._flush(n_steps)
        self._new_entry = True

    def put(self, position: int, row: VisualRow, active: torch.Tensor, alive: torch.Tensor) -> None:
        """Record one layer's row of the current step: ``position`` among the recorded layers,
        ``active`` [B, K] the counts per δ, ``alive`` [B] the rows still generating (their
        running max moves)."""
        if self._finished:
            return
        if self._new_entry:
            self._entry += 1
            self._new_entry = False
        index = self._entry - self._chunk_start
        if index >= self.chunk_steps:  # a forward without a pre-forward call: keep memory bounded anyway
            raise RuntimeError("TraceBuffer.put past a full chunk: advance() was not called for this forward")
        t = self._tensors
        t["mass"][:, index, position] = row.mass
        t["max_head_mass"][:, index, position] = row.max_head_mass
        t["tau_max_head_mass"][:, index, position] = row.tau_max_head_mass
        t["active"][:, index, position] = active
        slot = self.slot.get(position)
        if slot is not None:
            t["scores"][:, index, slot, : row.scores.shape[-1]] = row.scores
        running = t["running_max"][position]
        t["running_max"][position] = torch.where(alive.unsqueeze(1), torch.maximum(running, row.scores), running)
        self._filled = max(self._filled, index + 1)

    def finish(self, n_steps: torch.Tensor) -> None:
        """The generation is over: move what is left off the device (once)."""
        if self._finished:
            return
        self._flush(n_steps)
        self._finished = True

    # --- reading ------------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """Steps recorded in the current (or last) generation."""
        return self._entry + 1

    def device_bytes(self) -> int:
        """Bytes of the buffers on the device (fixed for a generation: no step adds any)."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def host(self) -> HostTrace:
        """Everything recorded, on the host (call :meth:`finish` first)."""

        def joined(name: str, trailing: tuple[int, ...], dtype: type) -> np.ndarray:
            parts = self._host[name]
            if parts:
                return np.concatenate(parts, axis=1)
            return np.zeros((len(self._n_visual), 0, *trailing), dtype=dtype)

        layers = self.n_layers
        kept_scores = self.sink is None and bool(self.slot)
        n_max = int(self._tensors["running_max"].shape[-1]) if self._tensors else 0
        return HostTrace(
            mass=joined("mass", (layers,), np.float32),
            max_head_mass=joined("max_head_mass", (layers,), np.float32),
            tau_max_head_mass=joined("tau_max_head_mass", (layers, self.n_temperatures), np.float32),
            active=joined("active", (layers, self.n_thresholds), np.int32),
            running_max=self._tensors["running_max"].to("cpu", copy=True).numpy()
            if self._tensors
            else np.zeros((layers, 0, 0), np.float32),
            scores=joined("scores", (len(self.slot), n_max), _TORCH_TO_NUMPY[self.score_dtype])
            if kept_scores
            else None,
        )

    # --- moving a chunk off the device ----------------------------------------------------------

    def _flush(self, n_steps: torch.Tensor) -> None:
        filled = self._filled
        if filled == 0:
            return
        moved = {name: tensor[:, :filled].to("cpu", copy=True) for name, tensor in self._tensors.items()
                 if name != "running_max" and (name != "scores" or self.slot)}  # fmt: skip
        for name in ("mass", "max_head_mass", "tau_max_head_mass", "active"):
            self._host[name].append(moved[name].numpy())
        if self.slot:
            scores = moved["scores"]
            values = (scores.float() if scores.dtype == torch.bfloat16 else scores).numpy()
            if self.sink is not None:
                valid = (n_steps.detach().to("cpu").long() - self._chunk_start).clamp(0, filled).numpy()
                self.sink(TraceChunk(self._chunk_start, valid, self._n_visual.copy(), values))
            else:
                self._host["scores"].append(values)
        self._chunk_start += filled
        self._filled = 0
