"""Installing pruning methods on a model: a scoped attention function, two execution modes.

``with Pruner(model, [FastV(), VisionPulse()], mode="mask"): model.generate(...)`` switches the
text backbone to a registered attention function ``vpstudy_prune_<base>`` (with the base's mask
function registered under the same name) that, at every text-layer call, works out which visual
keys the current queries may see and then runs the base backend:

- **mask mode** (exact, any backend): hidden visual keys are masked out of this call's
  attention mask (-inf logits for eager, False for SDPA); the KV cache is untouched;
- **physical mode** (the fast path, decode steps only): the call attends over the gathered
  non-hidden keys and values, per batch row (rows with fewer kept keys are padded with masked
  entries). Prefill calls always run in mask mode.

When nothing is hidden at a layer the call is passed through unchanged, so methods whose
settings keep every token generate exactly what the model generates alone.

Stacking with the recorder: install the :class:`~vpstudy.recorder.Recorder` first and the pruner
inside it (mask mode); the recorder then sees the attention the pruned model really computes.
The pruner also keeps, per step, the visual tokens left visible at every layer
(:meth:`Pruner.kept`), for the run store.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..attention import apply_row_mask, row_logits
from ..families import FamilySpec, TextGeometry
from ..hooks import Installation, forward_inputs
from ..loading import config_hash, family_of
from .methods import Decision, PruningError, PruningMethod, Stage

PRUNE_PREFIX = "vpstudy_prune_"
MODES = ("mask", "physical")
_ACTIVE: dict[int, Pruner] = {}  # id(attention module) -> pruner installed on it


def _final_base(name: str) -> str:
    """The backend under any vpstudy wrappers: ``vpstudy_prune_vpstudy_record_sdpa`` -> ``sdpa``."""
    while True:
        for prefix in (PRUNE_PREFIX, "vpstudy_record_"):
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        else:
            return name


def _pruning(function: Callable[..., Any], base: str, module: Any, query: torch.Tensor, key: torch.Tensor,
             value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:  # fmt: skip
    """The pruning hook (:mod:`vpstudy.hooks`): hand the call to the pruner installed on this module."""
    pruner = _ACTIVE.get(id(module))
    if pruner is None:
        return function(module, query, key, value, attention_mask, **kwargs)
    return pruner._attend(function, _final_base(base), module, query, key, value, attention_mask, **kwargs)


@dataclass
class _Generation:
    """State of one ``generate`` call."""

    visual_index: torch.Tensor  # [B, N] key positions of visual tokens (padded with 0)
    valid: torch.Tensor  # [B, N] bool
    n_visual: torch.Tensor  # [B] long
    generator: torch.Generator
    step: int = 0
    persistent: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (method, stage) -> keep [B, N]
    current: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # this forward's step-wise keeps
    kept_counts: list[dict[int, torch.Tensor]] = field(default_factory=list)  # per step: layer -> visible [B, N]
    kept_masks: list[dict[int, torch.Tensor]] = field(default_factory=list)  # per step: boundary layer -> [B, N]
    cache: dict[Any, Any] = field(default_factory=dict)  # this forward: decisions applied -> mask or gather plan


@dataclass
class KeptTrace:
    """What the pruner left visible for one batch row.

    Attributes:
        counts: [S, L] visible visual tokens per step and text layer (N_v where nothing acts).
        boundaries: the layers from which some stage acts (ascending); the visible set is
            constant between consecutive boundaries within a step.
        masks: [S, len(boundaries), N_v] bool, the visible set at each boundary layer.
    """

    counts: np.ndarray
    boundaries: list[int]
    masks: np.ndarray


class Pruner:
    """Context manager that prunes visual keys while installed; see the module docstring.

    Args:
        model: a loaded VLM of a supported family.
        methods: pruning methods; prefill methods decide before step-wise ones at the same layer.
        mode: ``"mask"`` or ``"physical"``.
        seed: seed of methods that draw at random.
    """

    def __init__(self, model: Any, methods: PruningMethod | Sequence[PruningMethod], *, mode: str = "mask",
                 seed: int = 0) -> None:  # fmt: skip
        if mode not in MODES:
            raise PruningError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.model = model
        self.spec: FamilySpec = family_of(model)
        self.methods = [methods] if isinstance(methods, PruningMethod) else list(methods)
        if not self.methods:
            raise PruningError("no pruning method given")
        self.mode = mode
        self.seed = seed
        self.n_layers = TextGeometry.of(model.config).num_layers
        model_hash = config_hash(model.config)
        for method in self.methods:
            method.prepare(model_hash, self.n_layers)
        # (method index, stage index, stage), prefill methods first at the same layer
        order = sorted(range(len(self.methods)), key=lambda i: self.methods[i].step_wise)
        self.stages: list[tuple[int, int, Stage]] = [
            (i, s, stage) for i in order for s, stage in enumerate(self.methods[i].stages(self.n_layers))
        ]
        self.boundaries = sorted({stage.acts_from for _, _, stage in self.stages})
        self._first_layer = min(min(stage.decide_at, stage.acts_from) for _, _, stage in self.stages)
        self._state: _Generation | None = None
        self.decision_s = 0.0  # wall time of decode-step decisions (signal, budget, top-K), for benchmarks
        self._installation: Installation | None = None

    # --- installing and restoring ------------------------------------------------------------

    def __enter__(self) -> Pruner:
        self._installation = Installation(self.model, PRUNE_PREFIX, _pruning,
                                          [layer.self_attn for layer in self.spec.text_layer_modules(self.model)],
                                          _ACTIVE, self, self._pre_forward)  # fmt: skip
        base = self._installation.base
        if PRUNE_PREFIX in base:
            raise PruningError("a vpstudy pruner is already installed on this model; pass all methods to one Pruner")
        if self.mode == "physical" and "vpstudy_record_" in base:
            raise PruningError("physical mode cannot run under the recorder (it changes the keys); use mode='mask'")
        self._installation.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._installation.__exit__(*exc)

    # --- per forward -------------------------------------------------------------------------

    def _pre_forward(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        input_ids, starts = forward_inputs(args, kwargs)
        if input_ids is None:
            raise PruningError("pruning needs input_ids (visual positions are found from placeholder tokens)")
        if starts:
            self._begin(input_ids)
        elif self._state is not None:
            self._state.step += 1
        if self._state is not None:
            self._state.current = {}
            self._state.cache = {}
            self._state.kept_counts.append({})
            self._state.kept_masks.append({})

    def _begin(self, input_ids: torch.Tensor) -> None:
        index, valid, counts = self.spec.visual_positions(input_ids, self.model.config)
        if not bool((counts > 0).all()):
            rows = (counts == 0).nonzero().flatten().tolist()
            raise PruningError(f"batch rows {rows} hold no visual placeholder tokens")
        self._state = _Generation(visual_index=index, valid=valid, n_visual=counts,
                                  generator=torch.Generator().manual_seed(self.seed))  # fmt: skip

    def _attend(self, function: Callable[..., Any], final_base: str, module: Any, query: torch.Tensor,
                key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                **kwargs: Any) -> tuple[torch.Tensor, Any]:  # fmt: skip
        state, layer = self._state, module.layer_idx
        if state is None or layer < self._first_layer:  # no stage decides or acts this shallow
            return function(module, query, key, value, attention_mask, **kwargs)
        prefill = query.shape[2] > 1
        allowed, applied = self._allowed(state, layer, prefill)
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        started = time.perf_counter()
        decided = False
        for i, s, stage in self.stages:
            method = self.methods[i]
            if stage.decide_at != layer or method.step_wise == prefill:
                continue
            logits = apply_row_mask(row_logits(query[:, :, -1, :], key, scaling), _row(attention_mask))
            logits = logits.masked_fill(self._hidden(state, allowed, key.shape[2]).unsqueeze(1), float("-inf"))
            decision = Decision(logits, state.visual_index, state.valid, allowed, state.n_visual, state.step,
                                state.generator)  # fmt: skip
            keep = method.keep(s, decision) & allowed
            decided = True
            (state.current if method.step_wise else state.persistent)[(i, s)] = keep
            if stage.acts_from <= layer and (method.step_wise or not getattr(method, "dense_prefill", False)):
                allowed, applied = allowed & keep, (*applied, (i, s))
        if decided and not prefill:
            self.decision_s += time.perf_counter() - started
        state.kept_counts[-1][layer] = allowed
        if layer in self.boundaries:
            state.kept_masks[-1][layer] = allowed
        if not applied:
            return function(module, query, key, value, attention_mask, **kwargs)
        # layers that apply the same decisions share the hidden keys (and the gather plan)
        cache_key = (applied, id(attention_mask), key.shape[2])
        if cache_key not in state.cache:
            hidden = self._hidden(state, allowed, key.shape[2])  # [B, T]
            plan = None
            if bool(hidden.any()) and self.mode == "physical" and not prefill:
                plan = _gather_plan(hidden, attention_mask, final_base, query.dtype)
            elif bool(hidden.any()):
                visible = _visible(attention_mask, query.shape[2], key.shape[2], query.device) & ~hidden[:, None, None, :]
                plan = _as_mask(visible, final_base, query.dtype)
            state.cache[cache_key] = plan
        plan = state.cache[cache_key]
        if plan is None:
            return function(module, query, key, value, attention_mask, **kwargs)
        if isinstance(plan, _GatherPlan):
            return function(module, query, plan.gather(key), plan.gather(value), plan.mask, **kwargs)
        return function(module, query, key, value, plan, **kwargs)

    def _allowed(self, state: _Generation, layer: int, prefill: bool) -> tuple[torch.Tensor, tuple[tuple[int, int], ...]]:
        """[B, N] real visual tokens visible at ``layer`` before this layer's own decisions, and
        which (method, stage) decisions that applies."""
        allowed, applied = state.valid, ()
        for i, s, stage in self.stages:
            if stage.acts_from > layer:
                continue
            method = self.methods[i]
            if not method.step_wise and (i, s) in state.persistent:
                if prefill and getattr(method, "dense_prefill", False):
                    continue
                allowed, applied = allowed & state.persistent[(i, s)], (*applied, (i, s))
            elif method.step_wise and (i, s) in state.current and stage.decide_at < layer:
                allowed, applied = allowed & state.current[(i, s)], (*applied, (i, s))
        return allowed, applied

    @staticmethod
    def _hidden(state: _Generation, allowed: torch.Tensor, n_keys: int) -> torch.Tensor:
        """[B, T] bool: key positions of real visual tokens that are not allowed."""
        # scatter_add, not scatter: padding entries share position 0 and must not overwrite a real one
        hidden = torch.zeros(allowed.shape[0], n_keys, dtype=torch.int32, device=allowed.device)
        return hidden.scatter_add(1, state.visual_index, (state.valid & ~allowed).to(torch.int32)) > 0

    # --- results -----------------------------------------------------------------------------

    def kept(self) -> list[KeptTrace]:
        """Per batch row of the most recent generation: visible visual tokens per step (one step
        per forward pass: the prefill is step 0) and layer. Rows keep every step; truncate to a
        row's own length (e.g. the recorder's step count)."""
        state = self._state
        if state is None:
            raise PruningError("no generation has run under this pruner")
        n_steps, batch = len(state.kept_counts), state.valid.shape[0]
        full = state.n_visual.cpu().numpy()
        counts = np.repeat(np.repeat(full[None, None, :], self.n_layers, axis=1), n_steps, axis=0)  # [S, L, B]
        masks = np.ones((n_steps, len(self.boundaries), batch, state.valid.shape[1]), dtype=bool)
        for t, per_layer in enumerate(state.kept_counts):
            for layer, allowed in per_layer.items():
                counts[t, layer] = allowed.sum(-1).cpu().numpy()
            for j, layer in enumerate(self.boundaries):
                if layer in state.kept_masks[t]:
                    masks[t, j] = state.kept_masks[t][layer].cpu().numpy()
        valid = state.valid.cpu().numpy()
        return [
            KeptTrace(counts=counts[:, :, b].copy(), boundaries=list(self.boundaries),
                      masks=masks[:, :, b, : int(valid[b].sum())].copy())  # fmt: skip
            for b in range(batch)
        ]


def _row(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The last query row of an attention mask, [B, 1 or H, T] (None stays None)."""
    return None if attention_mask is None else attention_mask[:, :, -1, :]


def _visible(attention_mask: torch.Tensor | None, n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
    """The mask an attention call received as booleans [B or 1, 1 or H, Q, T] (True = visible).

    None means causal (queries are the last ``n_queries`` positions); float masks are additive
    (0 visible, a large negative value hidden)."""
    if attention_mask is None:
        queries = torch.arange(n_keys - n_queries, n_keys, device=device)
        return (torch.arange(n_keys, device=device)[None, :] <= queries[:, None])[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def _as_mask(visible: torch.Tensor, final_base: str, dtype: torch.dtype) -> torch.Tensor:
    """Boolean visibility in the form the base backend takes: additive float for eager, bool otherwise."""
    if final_base == "eager":
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)
    return visible


@dataclass
class _GatherPlan:
    """Physical mode for one decode call: per row, the key positions that are not hidden (kept
    order; rows padded to the widest with position 0, masked), and the gathered mask."""

    index: torch.Tensor  # [B, W] long
    mask: torch.Tensor  # [B, 1, 1, W] in the base backend's format

    def gather(self, states: torch.Tensor) -> torch.Tensor:
        """[B, H_kv, T, D] -> [B, H_kv, W, D]."""
        batch, heads, _, dim = states.shape
        return states.gather(2, self.index[:, None, :, None].expand(batch, heads, self.index.shape[1], dim))


def _gather_plan(hidden: torch.Tensor, attention_mask: torch.Tensor | None, final_base: str,
                 dtype: torch.dtype) -> _GatherPlan:  # fmt: skip
    batch, n_keys = hidden.shape
    keep = ~hidden
    kept = keep.sum(-1, keepdim=True)
    width = int(kept.max())
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
    pad = torch.arange(width, device=hidden.device).unsqueeze(0) >= kept
    index = order.masked_fill(pad, 0)
    visible = _visible(attention_mask, 1, n_keys, hidden.device)  # [B or 1, 1 or H, 1, T]
    heads = visible.shape[1]
    visible = visible.expand(batch, heads, 1, n_keys).gather(3, index[:, None, None, :].expand(batch, heads, 1, width))
    return _GatherPlan(index, _as_mask(visible & ~pad[:, None, None, :], final_base, dtype))
