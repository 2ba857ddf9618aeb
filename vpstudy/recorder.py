"""``vpstudy.record``: per-step, per-layer attention to visual tokens during generation.

Inside ``with record(model) as rec:`` every ``model.generate(...)`` (or forward) call is
traced: for step 0 (the last prompt row, which predicts generated token 0) and every decode step
t (the query predicting token t), at each recorded text layer, the recorder keeps

- ``scores``: head-mean visual probabilities p̄(t, l) ∈ R^{N_v},
- ``mass``: M(t, l) = Σ p̄, and the max-over-heads visual mass,
- ``active``: N_act(t, l, δ) = #{i: p̄_i > δ} for each threshold δ,
- ``tau_max_head_mass``: for each budget temperature τ (default the paper's 0.1 and 0.4), the
  max-over-heads visual share of softmax(logits/τ), the VisionPulse budget signal,
- ``max_scores``: the running max over steps of p̄ (its complement at δ is the never-activated
  bitmap: ``max_scores <= δ``).

A store policy (:class:`vpstudy.storage.StorePolicy`, default ``full`` here) says at which of the
recorded layers p̄ itself is kept (the *score layers*); the scalars and the running max are kept at
every recorded layer. The values wait on the model's device in a fixed buffer of
``chunk_steps`` steps and leave it one chunk at a time (:mod:`vpstudy.tracebuffer`), so a
recording's device memory does not grow with the trace; p̄ goes to a ``sink`` as each chunk leaves
(``vpstudy record`` writes it to the run), or is kept on the host for :meth:`Recorder.traces`.

How it hooks in (no forked modeling code, no patched classes): the recorder is an observer of the
model's hook context (:class:`vpstudy.hooks.HookContext`, shared with a pruner), which switches
the text backbone's attention implementation to a registered function ``vpstudy_hooks_<base>``
(with the base backend's mask function registered under the same name). The generation is
unchanged: the base backend (SDPA by default) runs as it would, and the recorder then hands the
call's q, cached keys and mask (those the base backend got, after any pruner changed the mask) to
:func:`vpstudy.attention.visual_row`, which computes the one query row needed. The context's
forward pre-hook gives the recorder the prompt (visual positions, padding) and each step's input
token (to stop counting a row once it has emitted EOS). The prompt must come in one forward (a
chunked prefill is refused). On the last exit from the context the model is restored exactly.

Caches: the context reads how many cache slots each forward has written (a ``StaticCache`` hands
the attention all of its preallocated slots, written or not, with a mask over the unwritten
tail, or no mask at all at an unpadded prefill). The base backend and the row get the written
slots only (:class:`~vpstudy.hooks.WrittenSlots`: views of the cache, and no mask at a decode
step where it hides nothing, as for a dynamic cache), so a static cache
(``generate(..., cache_implementation="static")``) records what a ``DynamicCache`` does. A cache whose
slots are not token positions (sliding-window, quantized layers) is refused before anything runs
(:mod:`vpstudy.caching`), as is a static cache too short for the prompt and ``max_new_tokens``.
A generation whose prompt is already in the cache (its prefill ran outside the recorder) can be
traced from its first decode step with :meth:`Recorder.begin`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .attention import visual_row
from .devices import move_to
from .errors import VpstudyError
from .families import FamilySpec, TextGeometry
from .hooks import BEGIN, CHUNK, OBSERVE, START, GenerationState, HookContext, Participant
from .loading import family_of
from .rules import Threshold
from .storage import StorePolicy
from .tracebuffer import TraceBuffer, TraceSink

DEFAULT_THRESHOLDS: tuple[str, ...] = ("0.0005", "0.001", "0.0015", "0.002", "1/Nv", "2/Nv")
DEFAULT_TEMPERATURES: tuple[float, ...] = (0.1, 0.4)  # VisionPulse's published τ values


class RecorderError(VpstudyError):
    """Bad recorder settings or inputs the recorder cannot trace (one-line message)."""


@dataclass
class SampleTrace:
    """What was recorded for one sample (one batch row of one generation).

    Shapes use S = steps recorded (= generated tokens up to and including EOS), L = recorded
    layers, L_s = score layers (the recorded layers whose p̄ was kept, :attr:`score_layers`),
    N = the sample's visual tokens, K = thresholds.
    """

    layers: list[int]
    thresholds: list[Threshold]
    visual_positions: np.ndarray  # [N] key positions in the (padded) prompt
    mass: np.ndarray  # [S, L] float32
    max_head_mass: np.ndarray  # [S, L] float32
    active: np.ndarray  # [S, L, K] int32
    max_scores: np.ndarray  # [L, N] float32, running max of p̄ over steps
    scores: np.ndarray | None = None  # [S, L_s, N] in the score dtype (None: no score layers, or streamed to a sink)
    temperatures: list[float] = field(default_factory=list)  # [T] budget temperatures τ
    tau_max_head_mass: np.ndarray | None = None  # [S, L, T] float32
    score_layers: list[int] | None = None  # layers of ``scores`` (default: every layer if scores, else none)

    def __post_init__(self) -> None:
        if self.score_layers is None:
            self.score_layers = list(self.layers) if self.scores is not None else []

    @property
    def n_steps(self) -> int:
        """S: the steps recorded."""
        return int(self.mass.shape[0])

    @property
    def n_visual(self) -> int:
        """N: the sample's visual tokens."""
        return int(self.max_scores.shape[1])

    def never_activated(self, delta: float) -> np.ndarray:
        """[L, N] bool: visual tokens whose p̄ never exceeded ``delta`` at any recorded step."""
        return self.max_scores <= delta


@dataclass
class _Generation:
    """State of one traced generation (device tensors; converted to traces at the end)."""

    visual_index: torch.Tensor  # [B, N_max] long
    visual_valid: torch.Tensor  # [B, N_max] bool
    deltas: torch.Tensor  # [B, K] float32
    eos: torch.Tensor  # [E] long: token ids that end a row
    alive: torch.Tensor  # [B] bool: row has not emitted EOS before the current step
    n_steps: torch.Tensor  # [B] long: steps counted per row
    step: int = 0


def _eos_ids(model: Any) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


class Recorder(Participant):
    """Context manager tracing visual attention per step and layer; see the module docstring.

    An observer of the model's :class:`~vpstudy.hooks.HookContext`: one recorder per model, and
    not with a physical-mode pruner (whose attention it could not see).

    Args:
        model: a loaded VLM of a supported family.
        layers: text-layer indices to record (default: all). Negative indices count from the end.
        thresholds: activity thresholds δ (numbers, or ``"k/Nv"`` for k / N_v per sample).
        keep_scores: ``False`` is ``store=StorePolicy("scalars")`` (no p̄ per step).
        eos_token_ids: ids that end a row (default: the model's generation config).
        temperatures: τ values at which to record the max-head visual share of
            softmax(logits/τ) (the VisionPulse budget signal); ``()`` records none.
        store: which recorded layers keep p̄ per step, and the chunk size
            (:class:`~vpstudy.storage.StorePolicy`; default ``full``: every recorded layer).
        score_dtype: the dtype p̄ leaves the device in (float32: exact; ``vpstudy record`` uses
            float16, the run's).
        sink: receives each chunk of p̄ as it leaves the device (:class:`~vpstudy.tracebuffer.TraceSink`);
            without one the chunks are kept on the host for :meth:`traces`.
    """

    role = OBSERVE
    who = "the recorder"

    def __init__(
        self,
        model: Any,
        layers: Iterable[int] | None = None,
        thresholds: Iterable[str | float | Threshold] = DEFAULT_THRESHOLDS,
        *,
        keep_scores: bool = True,
        eos_token_ids: Sequence[int] | None = None,
        temperatures: Iterable[float] = DEFAULT_TEMPERATURES,
        store: StorePolicy | None = None,
        score_dtype: torch.dtype = torch.float32,
        sink: TraceSink | None = None,
    ) -> None:
        self.model = model
        self.spec: FamilySpec = family_of(model)
        n_layers = TextGeometry.of(model.config).num_layers
        chosen = list(range(n_layers)) if layers is None else list(layers)
        bad = [i for i in chosen if not -n_layers <= i < n_layers]
        if bad:
            raise RecorderError(f"layers {bad} out of range: the text model has {n_layers} layers (0..{n_layers - 1})")
        self.layers = sorted({i % n_layers for i in chosen})
        if not self.layers:
            raise RecorderError("no layers to record")
        self.thresholds = [Threshold.parse(t) for t in thresholds]
        self.keep_scores = keep_scores
        self.temperatures = tuple(float(t) for t in temperatures)
        if any(not np.isfinite(t) or t <= 0 for t in self.temperatures):
            raise RecorderError(f"temperatures {list(self.temperatures)} must be finite and > 0")
        self.eos_token_ids = list(eos_token_ids) if eos_token_ids is not None else _eos_ids(model)
        self._position = {layer: i for i, layer in enumerate(self.layers)}
        self.store = store if store is not None else StorePolicy("full" if keep_scores else "scalars")
        self.score_layers = self.store.resolve(self.layers, n_layers)  # StorePolicyError: a bad --score-layers
        self._trace = TraceBuffer(len(self.layers), [self._position[layer] for layer in self.score_layers],
                                  len(self.thresholds), len(self.temperatures), self.store.chunk_steps,
                                  score_dtype)  # fmt: skip
        self._trace.sink = sink
        self._state: _Generation | None = None
        self._context: HookContext | None = None  # the model's hook context while installed

    # --- installing and restoring (a participant of the model's hook context) --------------------

    def __enter__(self) -> Recorder:
        self._context = HookContext.join(self.model, self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._context is not None:
            self._context.leave(self)
            self._context = None

    def error(self, message: str) -> RecorderError:
        """A :class:`RecorderError`."""
        return RecorderError(message)

    def check_join(self, others: list[Participant]) -> None:
        """One recorder per model, and none with a pruner whose attention it could not see."""
        if any(isinstance(other, Recorder) for other in others):
            raise RecorderError("a vpstudy recorder is already installed on this model")
        if any(other.changes_keys for other in others):
            raise RecorderError("the recorder cannot run with a physical-mode pruner (it changes the keys); "
                                "use mode='mask'")  # fmt: skip

    # --- tracing ------------------------------------------------------------------------------

    def on_forward(self, state: GenerationState, kwargs: dict[str, Any] | None) -> None:
        """The context's forward pre-hook: a new generation, or the next step of this one."""
        if state.kind in (START, BEGIN):
            self._begin(state)
            if state.kind == BEGIN and self._state is not None:  # step 0 was not seen
                self._state.n_steps.zero_()
            return
        own = self._state
        if own is None:
            return
        if state.kind == CHUNK:
            raise RecorderError("the recorder needs the whole prompt in one forward; do not chunk the prefill")
        assert state.call is not None
        own.alive &= ~torch.isin(state.call.input_ids[:, -1], own.eos)
        own.step = state.step
        own.n_steps += own.alive.long()
        self._trace.advance(own.n_steps)

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                state: GenerationState) -> None:  # fmt: skip
        """The context's attention call, as the base backend got it (after any pruner): store its row."""
        self._observe(layer, query, key, mask, scaling)

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Trace a generation whose prompt is already in the cache (its prefill ran before, e.g.
        one prefill shared by several decodes): the next forward is its first decode step.

        The prompt's last row (step 0) was not seen, so each trace starts at step 1: ``mass[0]``
        is the first decode step's. Call it inside the ``with`` block, before decoding.

        Args:
            input_ids: [B, P] the prompt (left-padded), as the prefill saw it.
            attention_mask: [B, P] its padding mask, if any.
        """
        if self._context is None:
            raise RecorderError("Recorder.begin() is called inside the recorder's with block")
        self._context.begin(input_ids, attention_mask)  # every participant begins (this one: on_forward)

    def _begin(self, shared: GenerationState) -> None:
        """A new generation (the shared state of its first forward, or of ``begin``)."""
        if not bool(shared.token_mask[:, -1].all()):
            raise RecorderError("right-padded batch: the recorder needs left padding (tokenizer.padding_side='left')")
        input_ids, index, valid, counts = shared.tokens, shared.visual_index, shared.visual_valid, shared.n_visual
        if not bool((counts > 0).all()):
            rows = (counts == 0).nonzero().flatten().tolist()
            raise RecorderError(f"batch rows {rows} hold no visual placeholder tokens")
        n_max = index.shape[1]
        batch, device = input_ids.shape[0], input_ids.device
        deltas = torch.tensor(
            [[t.resolve(int(n)) for t in self.thresholds] for n in counts.tolist()], dtype=torch.float32, device=device
        ).reshape(batch, len(self.thresholds))
        self._trace.start(batch, counts, n_max, device)
        self._state = _Generation(
            visual_index=index,
            visual_valid=valid,
            deltas=deltas,
            eos=torch.tensor(self.eos_token_ids, dtype=torch.long, device=device),
            alive=torch.ones(batch, dtype=torch.bool, device=device),
            n_steps=torch.ones(batch, dtype=torch.long, device=device),
        )

    def _observe(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float
    ) -> None:
        """Called by the registered attention function for every text-layer attention call."""
        state, position = self._state, self._position.get(layer_idx)
        if state is None or position is None:
            return
        # each layer computes on its own device (a model split by device_map); the results join the state's
        index, valid = move_to(state.visual_index, query.device), move_to(state.visual_valid, query.device)
        row = move_to(visual_row(query, key, mask, scaling, index, valid, self.temperatures), state.deltas.device)
        active = (row.scores.unsqueeze(-1) > state.deltas.unsqueeze(1)).sum(dim=1, dtype=torch.int32)  # [B, K]
        self._trace.put(position, row, active, state.alive)

    # --- results ------------------------------------------------------------------------------

    @property
    def sink(self) -> TraceSink | None:
        """Where each chunk of p̄ goes as it leaves the device (None: kept for :meth:`traces`);
        may be set between generations."""
        return self._trace.sink

    @sink.setter
    def sink(self, sink: TraceSink | None) -> None:
        self._trace.sink = sink

    def buffer_bytes(self) -> int:
        """Bytes of the recorder's buffers on the model's device for the current (or last)
        generation: fixed when it begins (batch, N_v, layers, chunk size), whatever its length."""
        return self._trace.device_bytes()

    def traces(self) -> list[SampleTrace]:
        """Per-sample traces of the most recent generation (one per batch row, in order).

        Each row keeps its steps up to and including the one that predicted its EOS. The first
        call moves the last chunk off the device (to the sink, if any); ``scores`` is None when
        p̄ went to a sink or no layer keeps it.

        Raises:
            RecorderError: nothing was recorded yet.
        """
        state = self._state
        if state is None or self._trace.steps == 0:
            raise RecorderError("nothing recorded: run model.generate(...) inside the recorder context")
        self._trace.finish(state.n_steps)
        host = self._trace.host()
        index, valid = state.visual_index.cpu().numpy(), state.visual_valid.cpu().numpy()
        traces = []
        for b, n_steps in enumerate(state.n_steps.tolist()):
            n = int(valid[b].sum())
            traces.append(
                SampleTrace(
                    layers=list(self.layers),
                    thresholds=list(self.thresholds),
                    visual_positions=index[b, :n].copy(),
                    mass=host.mass[b, :n_steps].copy(),
                    max_head_mass=host.max_head_mass[b, :n_steps].copy(),
                    active=host.active[b, :n_steps].copy(),
                    max_scores=host.running_max[:, b, :n].copy(),
                    scores=None if host.scores is None else host.scores[b, :n_steps, :, :n].copy(),
                    temperatures=list(self.temperatures),
                    tau_max_head_mass=host.tau_max_head_mass[b, :n_steps].copy(),
                    score_layers=list(self.score_layers),
                )
            )
        return traces


def record(
    model: Any,
    layers: Iterable[int] | None = None,
    thresholds: Iterable[str | float | Threshold] = DEFAULT_THRESHOLDS,
    **kwargs: Any,
) -> Recorder:
    """Trace visual attention of ``model`` while inside the returned context; see :class:`Recorder`.

    Example::

        with vpstudy.record(model, layers=[0, 1]) as rec:
            out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        traces = rec.traces()  # one SampleTrace per batch row
    """
    return Recorder(model, layers=layers, thresholds=thresholds, **kwargs)
