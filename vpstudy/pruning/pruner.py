"""Installing pruning methods on a model: a modifier of the model's hook context, two execution modes.

``with Pruner(model, [FastV(), VisionPulse()], mode="mask"): model.generate(...)`` joins the
model's hook context (:class:`vpstudy.hooks.HookContext`, shared with a recorder), which switches
the text backbone to a registered attention function ``vpstudy_hooks_<base>`` (with the base's
mask function registered under the same name). At every text-layer call the pruner, a modifier,
works out which visual keys the current queries may see and then runs the base backend:

- **mask mode** (exact, any backend): hidden visual keys are masked out of this call's
  attention mask (-inf logits for eager, False for SDPA); the KV cache is untouched;
- **physical mode** (the fast path, decode steps only): the call attends over the gathered
  non-hidden keys and values, per batch row (rows with fewer kept keys are padded with masked
  entries). Prefill calls always run in mask mode. When the only method is
  :class:`~vpstudy.pruning.methods.VisionPulse` and each row's visual tokens are one contiguous
  run, the decode calls from the anchor layer on go to a decode backend instead
  (``backend=``: the Triton kernels of :mod:`vpstudy.kernels`, xformers, the CPU backend
  :mod:`vpstudy.backends.cpu`, or their pure-torch reference; see
  :mod:`vpstudy.backends.choose`): one scoring and top-K pass at the anchor, then attention over
  the non-visual keys and the kept visual keys (read in place by the GPU kernels, gathered as
  cache rows once per layer on a CPU), with no mask.

When nothing is hidden at a layer the call is passed through unchanged, so methods whose
settings keep every token generate exactly what the model generates alone. Every call sees the
written slots of the cache only (:class:`~vpstudy.hooks.WrittenSlots`: a static cache's
unwritten tail is cut off), so a static cache prunes exactly as a dynamic one; a generation
whose prompt is already in the cache can be pruned from its first decode step (:meth:`Pruner.begin`).

The visual positions, the step, the tokens so far and their padding mask are the context's
shared state (:class:`~vpstudy.hooks.GenerationState`); the pruner keeps its decisions. A
prefill may come in chunks (several forwards of more than one token before the first decode
step, as transformers' ``prefill_chunk_size`` or a benchmark's own loop does); visual positions
are collected across the chunks. Prefill methods need the whole prompt in one forward.

Stacking with the recorder (in either order, mask mode only): the context hands each attention
call to the pruner before the :class:`~vpstudy.recorder.Recorder`, so the recorder sees the
attention the pruned model really computes. One pruner per model. The pruner also keeps, per
step, the visual tokens left visible at every layer (:meth:`Pruner.kept`), for the run store.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from ..attention import apply_row_mask, as_visible, row_logits, visible_range
from ..backends.choose import NAMES as DECODE_BACKENDS
from ..backends.choose import Backend, choose_backend
from ..devices import move_fields
from ..families import FamilySpec, TextGeometry
from ..hooks import BEGIN, CHUNK, MODIFY, OBSERVE, START, GenerationState, HookContext, Participant
from ..loading import config_hash, family_of
from .encoder import EncoderStage
from .methods import Decision, HiddenEdit, MethodUnavailable, PruningError, PruningMethod, Stage, VisionPulse

ENCODER_STAGE = -1  # stage index of a method's decision after the vision encoder

GATHER = "gather"  # physical mode without a decode backend: every method on the gathered path
BACKENDS = (*DECODE_BACKENDS, GATHER)
MODES = ("mask", "physical")

# the pruner's own per-generation state a layer on another device (a model split by device_map)
# needs on its own device (the context moves the shared state); the per-step results
# (kept_counts, kept_masks) stay where they were made
_STATE_TENSORS = ("persistent", "current", "cache", "edits", "hidden")


@dataclass
class _Generation:
    """The pruner's state of one ``generate`` call: its decisions. The visual positions, the step
    and the tokens so far are the hook context's shared state (``shared``), read through the
    properties below."""

    shared: GenerationState
    generator: torch.Generator
    device: torch.device  # where the fields of _STATE_TENSORS are
    persistent: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (method, stage) -> keep [B, N]
    current: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # this forward's step-wise keeps
    kept_counts: list[dict[int, torch.Tensor]] = field(default_factory=list)  # per step: layer -> visible [B, N]
    kept_masks: list[dict[int, torch.Tensor]] = field(default_factory=list)  # per step: boundary layer -> [B, N]
    cache: dict[Any, Any] = field(default_factory=dict)  # this forward: decisions applied -> mask or gather plan
    edits: dict[int, list[HiddenEdit]] = field(default_factory=dict)  # layer -> hidden-state edits at its input
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> its input hidden states (prefill)
    contiguous: bool = True  # every row's visual tokens are one run of positions (the fast path's layout)

    @property
    def visual_index(self) -> torch.Tensor:
        """[B, N] key positions of visual tokens (padded with 0)."""
        return self.shared.visual_index

    @property
    def valid(self) -> torch.Tensor:
        """[B, N] bool: real visual tokens."""
        return self.shared.visual_valid

    @property
    def n_visual(self) -> torch.Tensor:
        """[B] long: visual tokens per row."""
        return self.shared.n_visual

    @property
    def step(self) -> int:
        """The decoding step (0: the prefill)."""
        return self.shared.step

    @property
    def decoding(self) -> bool:
        """A decode step has run (later multi-token forwards are not prefill chunks)."""
        return self.shared.decoding

    @property
    def tokens(self) -> torch.Tensor:
        """[B, T] the generation's tokens so far (for methods that replay the prefix)."""
        return self.shared.tokens

    @property
    def token_mask(self) -> torch.Tensor:
        """[B, T] their padding mask (1: a real token)."""
        return self.shared.token_mask


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


class Pruner(Participant):
    """Context manager that prunes visual keys while installed; see the module docstring.

    A modifier of the model's :class:`~vpstudy.hooks.HookContext`: one pruner per model, and in
    physical mode none with a recorder (the recorder could not see the attention it computes).

    Args:
        model: a loaded VLM of a supported family.
        methods: pruning methods; prefill methods decide before step-wise ones at the same layer.
        mode: ``"mask"`` or ``"physical"``.
        seed: seed of methods that draw at random.
        backend: physical mode's decode backend for VisionPulse: ``"auto"`` (Triton, else
            xformers, else the reference on CUDA; ``"cpu"`` elsewhere), ``"reference"``, ``"cpu"``,
            ``"triton"`` or ``"xformers"``; ``"gather"`` runs the gathered path without a backend.
            One that cannot run here, or a method set the fast path does not serve, falls back to
            the gathered reference path with a warning saying why.
        kept_block: the fast path's block-sparse variant: keep every ``kept_block``-token block
            of visual tokens that holds a token the rule keeps (1 = token-exact, the rule's set).
            It keeps more than the rule asks for; :meth:`kept` reports what was really kept.
    """

    role = MODIFY
    who = "the pruner"

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
        model_dir = getattr(model.config, "_name_or_path", None) or None
        for method in self.methods:
            if method.families is not None and self.spec.name not in method.families and not method.keeps_everything():
                raise MethodUnavailable(f"{method.name} does not support family {self.spec.name!r} "
                                   f"(supported: {', '.join(method.families)})")  # fmt: skip
            method.prepare(model_hash, self.n_layers)
            method.bind(model_dir)
        # (method index, stage index, stage), encoder stages first, then prefill methods before
        # step-wise ones at the same layer
        order = sorted(range(len(self.methods)), key=lambda i: self.methods[i].step_wise)
        encoder = [i for i in order if self.methods[i].acts_on_encoder and not self.methods[i].keeps_everything()]
        self.stages: list[tuple[int, int, Stage]] = [(i, ENCODER_STAGE, Stage(ENCODER_STAGE, 0)) for i in encoder]
        self.stages += [(i, s, stage) for i in order for s, stage in enumerate(self.methods[i].stages(self.n_layers))]
        self.encoder = EncoderStage(model, self.spec, [(i, self.methods[i]) for i in encoder]) if encoder else None
        self._hidden_layers = sorted({stage.decide_at for i, _, stage in self.stages
                                      if self.methods[i].wants_hidden and stage.decide_at >= 0})  # fmt: skip
        edits = {i for i, method in enumerate(self.methods) if type(method).edits is not PruningMethod.edits}
        self._edit_layers = sorted(
            {stage.acts_from for i, s, stage in self.stages if s != ENCODER_STAGE and i in edits}
        )
        self._layer_hooks: list[Any] = []
        self._all_step_wise = all(m.step_wise for m in self.methods)
        self.boundaries = sorted({stage.acts_from for _, _, stage in self.stages})
        self._first_layer = max(
            0, min((min(stage.decide_at, stage.acts_from) for _, _, stage in self.stages), default=self.n_layers)
        )  # no stage: nothing to do at any layer
        self._state: _Generation | None = None
        self.decision_s = 0.0  # wall time of decode-step decisions (signal, budget, top-K), for benchmarks
        self.backend_name = backend
        self.kept_block = kept_block
        self.backend: Backend | None = None  # the fast path's backend, once the first decode call chose it
        self._context: HookContext | None = None  # the model's hook context while installed
        self._encoder_on = False  # the encoder stage is installed
        self._fast: VisionPulse | None = None

    def _fast_method(self) -> VisionPulse | None:
        """The VisionPulse method the backend fast path serves, or None (with why, when a
        backend was asked for by name)."""
        if self.mode != "physical" or self.backend_name == GATHER:
            return None
        method = self.methods[0]
        if len(self.methods) == 1 and isinstance(method, VisionPulse):
            return method
        if self.backend_name != "auto" or self.kept_block > 1:
            names = ", ".join(m.name for m in self.methods)
            warnings.warn(f"backend {self.backend_name!r} serves VisionPulse alone; {names} run on the gathered "
                          "reference path", stacklevel=3)  # fmt: skip
        return None

    # --- installing and restoring ------------------------------------------------------------

    @property
    def changes_keys(self) -> bool:
        """Physical mode attends over gathered keys (or skips the base backend on the fast path)."""
        return self.mode == "physical"

    def error(self, message: str) -> PruningError:
        """A :class:`PruningError`."""
        return PruningError(message)

    def check_join(self, others: list[Participant]) -> None:
        """One pruner per model; physical mode with no observer (the recorder)."""
        if any(isinstance(other, Pruner) for other in others):
            raise PruningError("a vpstudy pruner is already installed on this model; pass all methods to one Pruner")
        observers = [other for other in others if other.role == OBSERVE]
        if self.mode == "physical" and observers:
            raise PruningError(f"physical mode cannot run under {observers[0].who} (it changes the keys); "
                               "use mode='mask'")  # fmt: skip

    def __enter__(self) -> Pruner:
        self._context = HookContext.join(self.model, self)
        try:
            if self.encoder is not None:
                self.encoder.__enter__()
                self._encoder_on = True
            layers = self.spec.text_layer_modules(self.model)
            for layer in sorted({*self._hidden_layers, *self._edit_layers}):
                hook = layers[layer].register_forward_pre_hook(self._layer_input(layer), with_kwargs=True)
                self._layer_hooks.append(hook)
            self._fast = self._fast_method()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._layer_hooks:
            hook.remove()
        self._layer_hooks = []
        if self.encoder is not None and self._encoder_on:
            self.encoder.__exit__(*exc)
            self._encoder_on = False
        if self._context is not None:
            self._context.leave(self)
            self._context = None

    def _layer_input(self, layer: int) -> Callable[..., Any]:
        """A decoder layer's forward pre-hook: keep its input hidden states for decisions that ask
        for them, and apply hidden-state edits (token recycling), during the prefill only."""

        def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            state = self._state
            if state is None or state.decoding:
                return None
            in_args = bool(args)
            hidden = args[0] if in_args else kwargs["hidden_states"]
            if hidden.shape[1] == 1:
                return None
            edits = state.edits.pop(layer, [])
            if edits:
                hidden = hidden.clone()
                for edit in edits:
                    hidden[edit.row, edit.position] = edit.vector.to(hidden.device, hidden.dtype)
            if layer in self._hidden_layers:
                state.hidden[layer] = hidden
            if not edits:
                return None
            return ((hidden, *args[1:]), kwargs) if in_args else (args, {**kwargs, "hidden_states": hidden})

        return hook

    # --- per forward -------------------------------------------------------------------------

    def on_forward(self, state: GenerationState, kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
        """The context's forward pre-hook (``state`` already updated for this forward): a new
        generation, a prefill chunk or a decode step; returns the forward's changed kwargs
        (encoder-side methods), or None."""
        own = self._state
        if own is not None and own.device != state.device:  # back from a split model's last device
            move_fields(own, state.device, _STATE_TENSORS)
            own.device = state.device
        if state.kind == BEGIN:
            if not self._all_step_wise:
                raise PruningError("begin() serves step-wise methods only; prefill methods must see the prefill")
            self._begin(state)
            return None
        if state.kind == START:
            self._begin(state, kwargs)
            changed = self._begin_encoder(state.tokens, kwargs or {})
            self._start_step()
            return changed
        if own is None:  # a generation this pruner did not see begin
            return None
        if state.kind == CHUNK:
            if not self._all_step_wise:
                raise PruningError("prefill methods need the whole prompt in one forward; do not chunk the prefill")
            own.cache = {}
            return None
        if state.first_decode:  # the prompt is complete (it may have come in chunks)
            self._prompt_complete(own)
        self._start_step()
        return None

    def _start_step(self) -> None:
        """Per-forward state at the start of a prefill or decode forward."""
        if self._state is not None:
            self._state.current = {}
            self._state.cache = {}
            self._state.kept_counts.append({})
            self._state.kept_masks.append({})

    def _begin_encoder(self, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """Start the encoder-side stage for this generation; the forward's changed kwargs, if any."""
        if self.encoder is None or self._state is None:
            return None
        state = self._state
        _check_counts(state.n_visual, " (encoder-side methods need the whole prompt in one forward)")
        return self.encoder.begin(input_ids, state.visual_index, state.valid, state.generator, kwargs)

    def begin(self, input_ids: torch.Tensor) -> None:
        """Prune a generation whose prompt is already in the cache (its prefill ran before, e.g.
        one prefill shared by several decodes): the next forward is its first decode step. Step-wise
        methods only (a prefill method decides on the prefill); call it inside the ``with`` block.
        :meth:`kept` then has no prefill entry: its step 0 is the first decode step.

        Args:
            input_ids: [B, P] the prompt (left-padded), as the prefill saw it.
        """
        if not self._all_step_wise:
            raise PruningError("begin() serves step-wise methods only; prefill methods must see the prefill")
        if self._context is None:
            raise PruningError("Pruner.begin() is called inside the pruner's with block")
        self._context.begin(input_ids)  # every participant begins (this one: on_forward)

    def _begin(self, shared: GenerationState, kwargs: dict[str, Any] | None = None) -> None:
        """A new generation (the shared state of its first forward, or of ``begin``)."""
        if not self._all_step_wise:  # prefill methods decide now, on the whole prompt
            _check_counts(shared.n_visual, " in this forward (prefill methods need the whole prompt in one forward)")
        self._state = _Generation(shared=shared, generator=torch.Generator().manual_seed(self.seed),
                                  device=shared.device)  # fmt: skip
        for method in self.methods:
            method.begin_generation(int(shared.tokens.shape[0]), kwargs)

    def _prompt_complete(self, state: _Generation) -> None:
        """Checks once the whole prompt has been seen (at the first decode step)."""
        _check_counts(state.n_visual)
        state.contiguous = _contiguous(state.visual_index, state.valid)
        if self._fast is not None and not state.contiguous and self.backend_name != "auto":
            warnings.warn("visual tokens are not one run of positions in every row; VisionPulse runs on the "
                          "gathered reference path", stacklevel=3)  # fmt: skip

    def attend(self, proceed: Callable[..., Any], base: str, module: Any, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, attention_mask: Any, **kwargs: Any) -> Any:  # fmt: skip
        """The context's text-layer attention call (the written cache slots): decide where a stage
        decides at this layer, then ``proceed`` (the base backend, then any recorder) with the
        hidden visual keys masked out (mask mode) or gathered away (physical mode), or through
        the decode backend (the fast path). ``base`` is the backend under every hook."""
        function, final_base = proceed, base
        state, layer = self._state, module.layer_idx
        if state is not None and state.device != query.device:  # a layer on another device (device_map)
            move_fields(state, query.device, _STATE_TENSORS)
            state.device = query.device
        if state is None or layer < self._first_layer:  # no stage decides or acts this shallow
            return function(module, query, key, value, attention_mask, **kwargs)
        prefill = query.shape[2] > 1
        if prefill and self._all_step_wise:  # step-wise methods decide and act at decode steps only
            return function(module, query, key, value, attention_mask, **kwargs)
        if self._fast is not None and not prefill and state.contiguous:
            return self._fast_attend(module, query, key, value, attention_mask, kwargs)
        if prefill and self.encoder is not None and self.encoder.decision is not None:
            for i, s, _ in self.stages:
                if s == ENCODER_STAGE:
                    state.persistent[(i, s)] = self.encoder.decision.keep.to(query.device)
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        started = time.perf_counter()
        allowed, applied, decided = self._decide(state, layer, query, key, attention_mask, scaling, prefill)
        if decided and not prefill:
            self.decision_s += time.perf_counter() - started
        state.kept_counts[-1][layer] = allowed
        if layer in self.boundaries:
            state.kept_masks[-1][layer] = allowed
        if not applied:
            return function(module, query, key, value, attention_mask, **kwargs)
        plan = self._plan(state, allowed, applied, query, key, attention_mask, final_base, prefill)
        if plan is None:
            return function(module, query, key, value, attention_mask, **kwargs)
        if isinstance(plan, _GatherPlan):
            return function(module, query, plan.gather(key), plan.gather(value), plan.mask, **kwargs)
        return function(module, query, key, value, plan, **kwargs)

    def _decide(self, state: _Generation, layer: int, query: torch.Tensor, key: torch.Tensor, attention_mask: Any,
                scaling: float, prefill: bool) -> tuple[torch.Tensor, tuple[tuple[int, int], ...], bool]:  # fmt: skip
        """The stages that decide at ``layer`` decide (or reselect); returns the visual tokens
        visible at this layer, the decisions that applies, and whether any stage decided."""
        allowed, applied = self._allowed(state, layer, prefill)
        decided = reselected = False
        for i, s, stage in self.stages:
            method = self.methods[i]
            if stage.decide_at != layer:
                continue
            if not prefill and not method.step_wise and method.reselects and (i, s) in state.persistent:
                others, _ = self._allowed(state, layer, prefill, skip=(i, s))
                decision = self._decision(state, query, key, attention_mask, scaling, others, prefill, layer, method)
                state.persistent[(i, s)] = method.reselect(s, decision, state.persistent[(i, s)]) & state.valid
                decided = reselected = True
                continue
            if method.step_wise == prefill:
                continue
            decision = self._decision(state, query, key, attention_mask, scaling, allowed, prefill, layer, method)
            keep = method.keep(s, decision) & allowed
            if prefill and not method.step_wise:
                keep, edits = method.edits(s, decision, keep)
                keep = keep & state.valid
                if edits:
                    state.edits.setdefault(stage.acts_from, []).extend(edits)
            decided = True
            (state.current if method.step_wise else state.persistent)[(i, s)] = keep
            if stage.acts_from <= layer and (method.step_wise or not method.dense_prefill):
                allowed, applied = allowed & keep, (*applied, (i, s))
        if reselected:
            allowed, applied = self._allowed(state, layer, prefill)
        return allowed, applied, decided

    def _plan(self, state: _Generation, allowed: torch.Tensor, applied: tuple[tuple[int, int], ...],
              query: torch.Tensor, key: torch.Tensor, attention_mask: Any, final_base: str,
              prefill: bool) -> torch.Tensor | _GatherPlan | None:  # fmt: skip
        """How this call hides the keys not ``allowed``: a mask (mask mode, prefill), a gather plan
        (physical mode), or None (nothing to hide). Layers that apply the same decisions share it."""
        cache_key = (applied, id(attention_mask), key.shape[2])
        if cache_key not in state.cache:
            hidden = self._hidden(state, allowed, key.shape[2])  # [B, T]
            plan: torch.Tensor | _GatherPlan | None = None
            if bool(hidden.any()) and self.mode == "physical" and not prefill:
                plan = _gather_plan(hidden, attention_mask, final_base, query.dtype)
            elif bool(hidden.any()):
                visible = _visible(attention_mask, query.shape[2], key.shape[2], query.device)
                plan = _as_mask(visible & ~hidden[:, None, None, :], final_base, query.dtype)
            state.cache[cache_key] = plan
        return state.cache[cache_key]

    def _fast_attend(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None,
                     kwargs: dict[str, Any]) -> tuple[torch.Tensor, None]:  # fmt: skip
        """A decode call from the anchor layer on, through the decode backend (VisionPulse alone)."""
        from vpstudy.backends.layout import KeyLayout
        from vpstudy.backends.reference import block_cover

        state, layer, method = self._state, module.layer_idx, self._fast
        assert state is not None and method is not None  # attend() routes here only then
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
            with torch.profiler.record_function("vpstudy::anchor_decision"):
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
        with torch.profiler.record_function("vpstudy::sparse_attention"):
            out = self.backend.sparse_decode(query[:, :, -1], key, value, layout, state.cache["kept"], scale=scaling)
        return out.unsqueeze(1), None  # [B, 1, H_q, D], as transformers' attention functions return

    def _decision(self, state: _Generation, query: torch.Tensor, key: torch.Tensor, attention_mask: Any,
                  scaling: float, allowed: torch.Tensor, prefill: bool, layer: int,
                  method: PruningMethod) -> Decision:  # fmt: skip
        """What a stage of ``method`` sees at ``layer``: the last query row's logits with the keys
        not ``allowed`` masked, and (prefill, where the method asks) the text rows' attention and
        the layer's input hidden states."""
        hidden_keys = self._hidden(state, allowed, key.shape[2])
        logits = apply_row_mask(row_logits(query[:, :, -1, :], key, scaling), _row(attention_mask))
        logits = logits.masked_fill(hidden_keys.unsqueeze(1), float("-inf"))
        decision = Decision(logits, state.visual_index, state.valid, allowed, state.n_visual, state.step,
                            state.generator, n_layers=self.n_layers, prefix=state.tokens,
                            prefix_mask=state.token_mask)  # fmt: skip
        if prefill and method.query_rows == "text":
            decision.text_index, decision.text_rows = _text_rows(state, query.shape[2])
            decision.text_probs = _rows_visual_probs(query, key, attention_mask, scaling, decision.text_index,
                                                     hidden_keys, state.visual_index, state.valid)  # fmt: skip
        if prefill and method.wants_hidden:
            decision.hidden = state.hidden.get(layer)
        return decision

    def _allowed(self, state: _Generation, layer: int, prefill: bool,
                 skip: tuple[int, int] | None = None) -> tuple[torch.Tensor, tuple[tuple[int, int], ...]]:  # fmt: skip
        """[B, N] real visual tokens visible at ``layer`` before this layer's own decisions, and
        which (method, stage) decisions that applies (``skip``: leave that decision out)."""
        allowed, applied = state.valid, cast(tuple[tuple[int, int], ...], ())
        for i, s, stage in self.stages:
            if stage.acts_from > layer or (i, s) == skip:
                continue
            method = self.methods[i]
            if not method.step_wise and (i, s) in state.persistent:
                if prefill and method.dense_prefill:
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
            KeptTrace(
                counts=counts[:, :, b].copy(),
                boundaries=list(self.boundaries),
                masks=masks[:, :, b, : int(valid[b].sum())].copy(),
            )  # fmt: skip
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
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
            ~visible, torch.finfo(dtype).min
        )
    return visible


@dataclass
class _GatherPlan:
    """Physical mode for one decode call: per row, the key positions that are not hidden (kept
    order; rows padded to the widest with position 0, masked), and the gathered mask."""

    index: torch.Tensor  # [B, W] long
    mask: torch.Tensor  # [B, 1, 1, W] in the base backend's format

    def gather(self, states: torch.Tensor) -> torch.Tensor:
        """[B, H_kv, T, D] -> [B, H_kv, W, D] (the W rows only: :func:`vpstudy.backends.cpu.gather_slots`)."""
        from vpstudy.backends.cpu import gather_slots

        return gather_slots(states, self.index)


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


def _text_rows(state: _Generation, n_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt rows after each row's last visual token: ([B, Q] positions, [B, Q] real)."""
    last = torch.where(state.valid, state.visual_index, torch.full_like(state.visual_index, -1)).amax(-1)  # [B]
    first = last + 1
    width = max(1, int((n_queries - first).max()))
    positions = first[:, None] + torch.arange(width, device=first.device)[None, :]
    real = positions < n_queries
    return positions.clamp(max=n_queries - 1), real


def _rows_visual_probs(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                       rows: torch.Tensor, hidden_keys: torch.Tensor, visual_index: torch.Tensor,
                       valid: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Attention probabilities (τ = 1, softmax over every visible key) of the query ``rows`` at
    the visual keys: query [B, H, Q_all, D], key [B, H_kv, T, D], rows [B, Q] -> [B, H, Q, N]."""
    batch, heads, _, dim = query.shape
    q = query.gather(2, rows[:, None, :, None].expand(batch, heads, rows.shape[1], dim)).float()
    k = key.float().repeat_interleave(heads // key.shape[1], dim=1)
    logits = torch.einsum("bhqd,bhtd->bhqt", q, k) * scaling
    visible = _visible(attention_mask, query.shape[2], key.shape[2], query.device)  # [B|1, 1|H, Q_all, T]
    visible = visible.expand(batch, visible.shape[1], -1, -1)
    visible = visible.gather(2, rows[:, None, :, None].expand(batch, visible.shape[1], rows.shape[1], key.shape[2]))
    logits = logits.masked_fill(~visible | hidden_keys[:, None, None, :], float("-inf"))
    probs = logits.softmax(-1).nan_to_num(0.0)
    return (
        probs.gather(3, visual_index[:, None, None, :].expand(batch, heads, rows.shape[1], -1))
        * valid[:, None, None, :]
    )
