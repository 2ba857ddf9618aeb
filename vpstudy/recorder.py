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

How it hooks in (no forked modeling code, no patched classes): the text backbone's attention
implementation is switched to a registered function ``vpstudy_record_<base>`` (with the base
backend's mask function registered under the same name). It returns exactly what the base
backend (SDPA by default) returns, so generation is unchanged, and hands q, the cached keys and
the mask to :func:`vpstudy.attention.visual_row`, which computes the one query row needed. A
forward pre-hook on the model sees the prompt (visual positions) and each step's input token
(to stop counting a row once it has emitted EOS). On exit the original implementation is set
back and the hook removed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .attention import visual_row
from .rules import Threshold
from .families import FamilySpec, TextGeometry
from .hooks import Installation, forward_inputs
from .loading import family_of
from .errors import VpstudyError

DEFAULT_THRESHOLDS: tuple[str, ...] = ("0.0005", "0.001", "0.0015", "0.002", "1/Nv", "2/Nv")
DEFAULT_TEMPERATURES: tuple[float, ...] = (0.1, 0.4)  # VisionPulse's published τ values
RECORD_PREFIX = "vpstudy_record_"


class RecorderError(VpstudyError):
    """Bad recorder settings or inputs the recorder cannot trace (one-line message)."""


@dataclass
class SampleTrace:
    """What was recorded for one sample (one batch row of one generation).

    Shapes use S = steps recorded (= generated tokens up to and including EOS), L = recorded
    layers, N = the sample's visual tokens, K = thresholds.
    """

    layers: list[int]
    thresholds: list[Threshold]
    visual_positions: np.ndarray  # [N] key positions in the (padded) prompt
    mass: np.ndarray  # [S, L] float32
    max_head_mass: np.ndarray  # [S, L] float32
    active: np.ndarray  # [S, L, K] int32
    max_scores: np.ndarray  # [L, N] float32, running max of p̄ over steps
    scores: np.ndarray | None = None  # [S, L, N] float32 (None if keep_scores=False)
    temperatures: list[float] = field(default_factory=list)  # [T] budget temperatures τ
    tau_max_head_mass: np.ndarray | None = None  # [S, L, T] float32

    @property
    def n_steps(self) -> int:
        return int(self.mass.shape[0])

    @property
    def n_visual(self) -> int:
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
    running_max: torch.Tensor  # [L, B, N_max]
    step: int = 0
    scores: list[list[torch.Tensor]] = field(default_factory=list)  # [L][step] -> [B, N_max]
    mass: list[list[torch.Tensor]] = field(default_factory=list)
    max_head_mass: list[list[torch.Tensor]] = field(default_factory=list)
    tau_max_head_mass: list[list[torch.Tensor]] = field(default_factory=list)
    active: list[list[torch.Tensor]] = field(default_factory=list)


# Recorders by attention module (id), looked up by the registered attention function.
_ACTIVE: dict[int, Recorder] = {}


def _recording(function: Callable[..., Any], base: str, module: Any, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:  # fmt: skip
    """The recording hook (:mod:`vpstudy.hooks`): run the base backend unchanged, then let the
    recorder installed on this module compute the step's visual row from q and the cached k."""
    output = function(module, query, key, value, attention_mask, **kwargs)
    recorder = _ACTIVE.get(id(module))
    if recorder is not None:
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        recorder._observe(module.layer_idx, query, key, attention_mask, scaling)
    return output


def _eos_ids(model: Any) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


class Recorder:
    """Context manager tracing visual attention per step and layer; see the module docstring.

    Args:
        model: a loaded VLM of a supported family.
        layers: text-layer indices to record (default: all). Negative indices count from the end.
        thresholds: activity thresholds δ (numbers, or ``"k/Nv"`` for k / N_v per sample).
        keep_scores: keep the full p̄ vectors per step (needed for the score arrays of a run);
            without it only masses, counts and running maxima are kept.
        eos_token_ids: ids that end a row (default: the model's generation config).
        temperatures: τ values at which to record the max-head visual share of
            softmax(logits/τ) (the VisionPulse budget signal); ``()`` records none.
    """

    def __init__(
        self,
        model: Any,
        layers: Iterable[int] | None = None,
        thresholds: Iterable[str | float | Threshold] = DEFAULT_THRESHOLDS,
        *,
        keep_scores: bool = True,
        eos_token_ids: Sequence[int] | None = None,
        temperatures: Iterable[float] = DEFAULT_TEMPERATURES,
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
        self._state: _Generation | None = None
        self._installation: Installation | None = None

    # --- installing and restoring -------------------------------------------------------------

    def __enter__(self) -> Recorder:
        self._installation = Installation(self.model, RECORD_PREFIX, _recording,
                                          [layer.self_attn for layer in self.spec.text_layer_modules(self.model)],
                                          _ACTIVE, self, self._pre_forward)  # fmt: skip
        if RECORD_PREFIX in self._installation.base:
            raise RecorderError("a vpstudy recorder is already installed on this model")
        self._installation.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._installation.__exit__(*exc)

    # --- tracing ------------------------------------------------------------------------------

    def _pre_forward(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        input_ids, starts = forward_inputs(args, kwargs)
        if input_ids is None:
            raise RecorderError("recording needs input_ids (visual positions are found from placeholder tokens)")
        if starts:
            self._begin(input_ids, kwargs.get("attention_mask"))
        elif self._state is not None:
            state = self._state
            state.alive &= ~torch.isin(input_ids[:, -1], state.eos)
            state.step += 1
            state.n_steps += state.alive.long()

    def _begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask[:, -1].all()):
            raise RecorderError("right-padded batch: the recorder needs left padding (tokenizer.padding_side='left')")
        index, valid, counts = self.spec.visual_positions(input_ids, self.model.config)
        if not bool((counts > 0).all()):
            rows = (counts == 0).nonzero().flatten().tolist()
            raise RecorderError(f"batch rows {rows} hold no visual placeholder tokens")
        n_max = index.shape[1]
        batch, device = input_ids.shape[0], input_ids.device
        deltas = torch.tensor(
            [[t.resolve(int(n)) for t in self.thresholds] for n in counts.tolist()], dtype=torch.float32, device=device
        ).reshape(batch, len(self.thresholds))
        n_layers = len(self.layers)
        self._state = _Generation(
            visual_index=index,
            visual_valid=valid,
            deltas=deltas,
            eos=torch.tensor(self.eos_token_ids, dtype=torch.long, device=device),
            alive=torch.ones(batch, dtype=torch.bool, device=device),
            n_steps=torch.ones(batch, dtype=torch.long, device=device),
            running_max=torch.zeros(n_layers, batch, n_max, device=device),
            scores=[[] for _ in range(n_layers)],
            mass=[[] for _ in range(n_layers)],
            max_head_mass=[[] for _ in range(n_layers)],
            tau_max_head_mass=[[] for _ in range(n_layers)],
            active=[[] for _ in range(n_layers)],
        )

    def _observe(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float
    ) -> None:
        """Called by the registered attention function for every text-layer attention call."""
        state, position = self._state, self._position.get(layer_idx)
        if state is None or position is None:
            return
        row = visual_row(query, key, mask, scaling, state.visual_index, state.visual_valid, self.temperatures)
        active = (row.scores.unsqueeze(-1) > state.deltas.unsqueeze(1)).sum(dim=1, dtype=torch.int32)  # [B, K]
        alive = state.alive.unsqueeze(1)
        state.running_max[position] = torch.where(alive, torch.maximum(state.running_max[position], row.scores),
                                                  state.running_max[position])  # fmt: skip
        if self.keep_scores:
            state.scores[position].append(row.scores)
        state.mass[position].append(row.mass)
        state.max_head_mass[position].append(row.max_head_mass)
        state.tau_max_head_mass[position].append(row.tau_max_head_mass)
        state.active[position].append(active)

    # --- results ------------------------------------------------------------------------------

    def traces(self) -> list[SampleTrace]:
        """Per-sample traces of the most recent generation (one per batch row, in order).

        Each row keeps its steps up to and including the one that predicted its EOS.

        Raises:
            RecorderError: nothing was recorded yet.
        """
        state = self._state
        if state is None or not state.mass[0]:
            raise RecorderError("nothing recorded: run model.generate(...) inside the recorder context")

        def stack(per_layer: list[list[torch.Tensor]]) -> np.ndarray:  # -> [S, L, B, ...]
            return torch.stack([torch.stack(steps) for steps in per_layer], dim=1).cpu().numpy()

        mass, max_head, active = stack(state.mass), stack(state.max_head_mass), stack(state.active)
        tau_mass = stack(state.tau_max_head_mass)
        scores = stack(state.scores) if self.keep_scores else None
        running_max = state.running_max.cpu().numpy()
        index, valid = state.visual_index.cpu().numpy(), state.visual_valid.cpu().numpy()
        traces = []
        for b, n_steps in enumerate(state.n_steps.tolist()):
            n = int(valid[b].sum())
            traces.append(
                SampleTrace(
                    layers=list(self.layers),
                    thresholds=list(self.thresholds),
                    visual_positions=index[b, :n].copy(),
                    mass=mass[:n_steps, :, b].copy(),
                    max_head_mass=max_head[:n_steps, :, b].copy(),
                    active=active[:n_steps, :, b].copy(),
                    max_scores=running_max[:, b, :n].copy(),
                    scores=None if scores is None else scores[:n_steps, :, b, :n].copy(),
                    temperatures=list(self.temperatures),
                    tau_max_head_mass=tau_mass[:n_steps, :, b].copy(),
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
