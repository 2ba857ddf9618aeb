"""Installing pruning methods on a model: a scoped attention function, two execution modes.

``with Pruner(model, [FastV(), VisionPulse()], mode="mask"): model.generate(...)`` switches the
text backbone to a registered attention function ``vpstudy_prune_<base>`` (with the base's mask
function registered under the same name) that, at every text-layer call, works out which visual
keys the current queries may see and then runs the base backend:

- **mask mode** (exact, any backend): hidden visual keys are masked out of this call's
  attention mask (-inf logits for eager, False for SDPA); the KV cache is untouched;
- **physical mode** (the fast path, decode steps only): the call attends over the gathered
  non-hidden keys and values, per batch row (rows with fewer kept keys are padded with masked
  entries). Prefill calls always run in mask mode. When the only method is
  :class:`~vpstudy.pruning.methods.VisionPulse` and each row's visual tokens are one contiguous
  run, the decode calls from the anchor layer on go to a decode backend instead
  (``backend=``: the Triton kernels of :mod:`vpstudy.kernels`, xformers, or their pure-torch
  reference; see :mod:`vpstudy.backends.choose`): one fused scoring and top-K pass at the
  anchor, then attention over the non-visual keys and the kept visual keys read in place from
  the cache, with no gathered copy and no mask.

When nothing is hidden at a layer the call is passed through unchanged, so methods whose
settings keep every token generate exactly what the model generates alone.

A prefill may come in chunks (several forwards of more than one token before the first decode
step, as transformers' ``prefill_chunk_size`` or a benchmark's own loop does); visual positions
are collected across the chunks. Prefill methods need the whole prompt in one forward.

Stacking with the recorder: install the :class:`~vpstudy.recorder.Recorder` first and the pruner
inside it (mask mode); the recorder then sees the attention the pruned model really computes.
The pruner also keeps, per step, the visual tokens left visible at every layer
(:meth:`Pruner.kept`), for the run store.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..attention import apply_row_mask, as_visible, row_logits, visible_range
from ..backends.choose import NAMES as BACKENDS
from ..backends.choose import Backend, choose_backend
from ..families import FamilySpec, TextGeometry
from ..hooks import Installation, forward_inputs
from ..loading import config_hash, family_of
from .methods import Decision, PruningError, PruningMethod, Stage, VisionPulse

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
    contiguous: bool = True  # every row's visual tokens are one run of positions (the fast path's layout)
    decoding: bool = False  # a decode step has run (later multi-token forwards are not prefill chunks)


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
        backend: physical mode's decode backend for VisionPulse: ``"auto"`` (Triton on CUDA, else
            xformers on CUDA, else the reference), ``"reference"``, ``"triton"`` or ``"xformers"``.
            One that cannot run here, or a method set the fast path does not serve, falls back to
            the gathered reference path with a warning saying why.
        kept_block: the fast path's block-sparse variant: keep every ``kept_block``-token block
            of visual tokens that holds a token the rule keeps (1 = token-exact, the rule's set).
            It keeps more than the rule asks for; :meth:`kept` reports what was really kept.
    """

    def __init__(self, model: Any, methods: PruningMethod | Sequence[PruningMethod], *, mode: str = "mask",
                 seed: int = 0, backend: str = "auto", kept_block: int = 1) -> None:  # fmt: skip
        if mode not in MODES:
            raise PruningError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if backend not in BACKENDS:
            raise PruningError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if not (isinstance(kept_block, int) and kept_block >= 1):
            raise PruningError(f"kept_block must be an integer >= 1, got {kept_block!r}")
        if kept_block > 1 and mode != "physical":
            raise PruningError("kept_block is an option of physical mode's fast path; use mode='physical'")
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
        self._all_step_wise = all(m.step_wise for m in self.methods)
        self.boundaries = sorted({stage.acts_from for _, _, stage in self.stages})
        self._first_layer = min(min(stage.decide_at, stage.acts_from) for _, _, stage in self.stages)
        self._state: _Generation | None = None
        self.decision_s = 0.0  # wall time of decode-step decisions (signal, budget, top-K), for benchmarks
        self.backend_name = backend
        self.kept_block = kept_block
        self.backend: Backend | None = None  # the fast path's backend, once the first decode call chose it
        self._installation: Installation | None = None
        self._fast: VisionPulse | None = None

    def _fast_method(self) -> VisionPulse | None:
        """The VisionPulse method the backend fast path serves, or None (with why, when a
        backend was asked for by name)."""
        on_cuda = next(self.model.parameters()).device.type == "cuda"
        if self.mode != "physical" or (self.backend_name == "auto" and not on_cuda):
            return None  # without CUDA, auto keeps the gathered path (the reference kernels are an oracle, not fast)
        method = self.methods[0]
        if len(self.methods) == 1 and isinstance(method, VisionPulse):
            return method
        if self.backend_name != "auto" or self.kept_block > 1:
            warnings.warn(f"backend {self.backend_name!r} serves VisionPulse alone; {', '.join(m.name for m in self.methods)} "
                          "run on the gathered reference path", stacklevel=3)  # fmt: skip
        return None

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
        self._fast = self._fast_method()
        return self

    def __exit__(self, *exc: object) -> None:
        self._installation.__exit__(*exc)

    # --- per forward -------------------------------------------------------------------------

    def _pre_forward(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        input_ids, starts = forward_inputs(args, kwargs)
        if input_ids is None:
            raise PruningError("pruning needs input_ids (visual positions are found from placeholder tokens)")
        state = self._state
        if starts:
            self._begin(input_ids)
        elif state is not None and input_ids.shape[1] > 1 and not state.decoding:
            self._extend(input_ids, kwargs["past_key_values"].get_seq_length())  # a further prefill chunk
            state.cache = {}
            return
        elif state is not None:
            if not state.decoding:  # the prompt is complete (it may have come in chunks)
                self._prompt_complete(state)
            state.step += 1
            state.decoding = True
        if self._state is not None:
            self._state.current = {}
            self._state.cache = {}
            self._state.kept_counts.append({})
            self._state.kept_masks.append({})

    def _begin(self, input_ids: torch.Tensor) -> None:
        index, valid, counts = self.spec.visual_positions(input_ids, self.model.config)
        if not self._all_step_wise:  # prefill methods decide now, on the whole prompt
            _check_counts(counts, " in this forward (prefill methods need the whole prompt in one forward)")
        self._state = _Generation(visual_index=index, valid=valid, n_visual=counts,
                                  generator=torch.Generator().manual_seed(self.seed))  # fmt: skip

    def _prompt_complete(self, state: _Generation) -> None:
        """Checks once the whole prompt has been seen (at the first decode step)."""
        _check_counts(state.n_visual)
        state.contiguous = _contiguous(state.visual_index, state.valid)
        if self._fast is not None and not state.contiguous and self.backend_name != "auto":
            warnings.warn("visual tokens are not one run of positions in every row; VisionPulse runs on the "
                          "gathered reference path", stacklevel=3)  # fmt: skip

    def _extend(self, input_ids: torch.Tensor, offset: int) -> None:
        """Add the visual positions of a further prefill chunk that starts at cache slot ``offset``."""
        if not self._all_step_wise:
            raise PruningError("prefill methods need the whole prompt in one forward; do not chunk the prefill")
        state = self._state
        index, valid, counts = self.spec.visual_positions(input_ids, self.model.config)
        if index.shape[1] == 0:
            return
        rows = []
        for b in range(index.shape[0]):
            old, new = state.visual_index[b, state.valid[b]], index[b, valid[b]] + offset
            rows.append(torch.cat([old, new]))
        width = max(len(r) for r in rows)
        state.valid = torch.arange(width, device=index.device)[None, :] < torch.tensor([len(r) for r in rows], device=index.device)[:, None]
        state.visual_index = torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows])
        state.n_visual = state.valid.sum(-1)

    def _attend(self, function: Callable[..., Any], final_base: str, module: Any, query: torch.Tensor,
                key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                **kwargs: Any) -> tuple[torch.Tensor, Any]:  # fmt: skip
        state, layer = self._state, module.layer_idx
        if state is None or layer < self._first_layer:  # no stage decides or acts this shallow
            return function(module, query, key, value, attention_mask, **kwargs)
        prefill = query.shape[2] > 1
        if prefill and self._all_step_wise:  # step-wise methods decide and act at decode steps only
            return function(module, query, key, value, attention_mask, **kwargs)
        if self._fast is not None and not prefill and state.contiguous:
            return self._fast_attend(module, query, key, value, attention_mask, kwargs)
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

    def _fast_attend(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> tuple[torch.Tensor, None]:  # fmt: skip
        """A decode call from the anchor layer on, through the decode backend (VisionPulse alone)."""
        from vpstudy.backends.layout import KeyLayout
        from vpstudy.backends.reference import block_cover

        state, layer, method = self._state, module.layer_idx, self._fast
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        if self.backend is None:
            self.backend = choose_backend(self.backend_name, query.device, query.dtype, query.shape[-1])
        if "layout" not in state.cache:
            start, end = visible_range(_row(attention_mask), query.shape[0], key.shape[2], query.device)
            state.cache["layout"] = KeyLayout(start, end, state.visual_index[:, 0].to(torch.int32),
                                              state.n_visual.to(torch.int32), state.valid.shape[1])  # fmt: skip
        layout = state.cache["layout"]
        if layer == self._first_layer:  # the fast path's one stage decides here
            started = time.perf_counter()
            selection = self.backend.anchor_select(query[:, :, -1], key, layout, method.rule, scale=scaling,
                                                   score=method.score)  # fmt: skip
            kept = selection.kept
            if self.kept_block > 1:
                kept = block_cover(kept, layout.visual_len, self.kept_block)
            state.cache["kept"] = kept
            keep = kept.token_mask(layout.visual_len, state.valid.shape[1])
            state.current[(0, 0)] = keep
            self.decision_s += time.perf_counter() - started
        keep = state.current[(0, 0)]
        state.kept_counts[-1][layer] = keep
        if layer in self.boundaries:
            state.kept_masks[-1][layer] = keep
        out = self.backend.sparse_decode(query[:, :, -1], key, value, layout, state.cache["kept"], scale=scaling)
        return out.unsqueeze(1), None  # [B, 1, H_q, D], as transformers' attention functions return

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


def _check_counts(counts: torch.Tensor, where: str = "") -> None:
    """Raise unless every batch row holds visual placeholder tokens."""
    if not bool((counts > 0).all()):
        rows = (counts == 0).nonzero().flatten().tolist()
        raise PruningError(f"batch rows {rows} hold no visual placeholder tokens{where}")


def _contiguous(index: torch.Tensor, valid: torch.Tensor) -> bool:
    """Whether every row's visual positions are one run ``first, first + 1, ...``."""
    run = index[:, :1] + torch.arange(index.shape[1], device=index.device)[None, :]
    return bool(((index == run) | ~valid).all())


def _visible(attention_mask: torch.Tensor | None, n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
    """The mask an attention call received as booleans [B or 1, 1 or H, Q, T] (True = visible).

    None means causal (queries are the last ``n_queries`` positions); float masks are additive
    (0 visible, a large negative value hidden)."""
    if attention_mask is None:
        queries = torch.arange(n_keys - n_queries, n_keys, device=device)
        return (torch.arange(n_keys, device=device)[None, :] <= queries[:, None])[None, None]
    return as_visible(attention_mask)


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
