"""Scoped attention hooks: one hook context per model, shared by the recorder and the pruner.

No class is patched and no modeling file is copied. A hook is a *registered attention function*
``<prefix><base>`` (transformers' ``AttentionInterface``, with the base's mask function
registered under the same name in ``AttentionMaskInterface``) that wraps the backend the text
model used before (``sdpa``, ``eager``, or another registered function, so hooks stack).
:class:`AttentionSwap` switches the text backbone to it and restores every (sub)config's
attention implementation exactly on exit.

**The hook context.** Everything that instruments a generation (the
:class:`~vpstudy.recorder.Recorder`, the :class:`~vpstudy.pruning.Pruner`) is a
:class:`Participant` of the model's one :class:`HookContext`. The first participant to enter
creates it, later ones join it (it is stored on the model, :meth:`HookContext.of`), and the last
to leave removes it, whatever the order in which they leave. While it exists the model has

- one registered attention function, ``vpstudy_hooks_<base>``, on the text backbone. At each
  text-layer attention call it cuts a static cache's unwritten slots (:class:`WrittenSlots`), then
  hands the call to the modifiers (``role = MODIFY``, the pruner), each of which may change what
  the base backend gets (mask, keys) and passes the call on; the base backend runs; then the
  observers (``role = OBSERVE``, the recorder) see the query, keys and mask the base backend
  got, so a recorder sees the attention the pruned model computes. The context is found from
  the attention module (an attribute it sets on each text attention module, removed on exit);
- one forward pre-hook on the model, which computes the per-generation state every participant
  reads (:class:`GenerationState`: the written cache slots, the visual positions from the family
  spec, the step counter, prefill chunks, whether decoding has begun, the tokens so far and their
  padding mask) once per forward and then tells each participant (:meth:`Participant.on_forward`,
  in the order they entered; one may return changed forward kwargs);
- one checked ``generate`` (:func:`guarded_generate`): a cache that cannot be read exactly, or a
  static cache too short for the generation, is refused in one line before anything runs.

On the last exit every (sub)config's attention implementation, ``generate`` and the hooks are
restored exactly. Participants keep only their own state (the recorder's buffers, the pruner's
decisions); stacking rules (one recorder and one pruner per model, no physical-mode pruner with
a recorder) are theirs (:meth:`Participant.check_join`).

Each forward's cache is read in the pre-hook (:func:`forward_call`): how many slots are written
before it (:mod:`vpstudy.caching`), so that the attention calls read only the written slots of a
preallocated (static) cache and the base backend gets only those: the call a dynamic cache makes.

Hooks that need no per-generation state (the dense decode baseline
:class:`vpstudy.backends.dense.DenseDecode`, the organism's training lever) use
:class:`AttentionSwap` directly.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch

from .attention import as_visible
from .caching import check_readable, check_room, written_slots
from .devices import move_fields
from .errors import VpstudyError

Wrapper = Callable[..., Any]  # wrapper(function, base, module, query, key, value, attention_mask, **kwargs)

HOOK_PREFIX = "vpstudy_hooks_"
CONTEXT_ATTR = "_vpstudy_hooks"  # the model's and its text attention modules' attribute holding the context

# the kinds of forward (GenerationState.kind)
START = "start"  # the first forward of a generation (its cache is empty): the prefill, or its first chunk
CHUNK = "chunk"  # a further multi-token forward before the first decode step (a chunked prefill)
DECODE = "decode"  # a decode step
BEGIN = "begin"  # no forward: a generation whose prompt is already in the cache (HookContext.begin)

# participant roles, in the order they see an attention call
MODIFY = 0
OBSERVE = 1

_BASES: dict[str, str] = {}  # registered hook name -> the backend it wraps


class HookError(VpstudyError):
    """The hook context cannot serve a participant (one-line message)."""


def base_function(module: Any, base: str) -> Callable[..., Any]:
    """The attention function registered as ``base`` (``eager`` is each modeling module's own)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":  # not in the registry: each model module defines its own
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def register(prefix: str, base: str, wrapper: Wrapper) -> str:
    """Register ``prefix + base`` once (attention + mask function) and return the name.

    The attention function calls ``wrapper(function, base, module, query, key, value,
    attention_mask, **kwargs)`` with ``function`` the base backend."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    name = prefix + base
    _BASES[name] = base
    if name in AttentionInterface._global_mapping:
        return name

    def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
        return wrapper(base_function(module, base), base, module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    mask_function = cast(Callable[..., Any], ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(base, sdpa_mask))
    AttentionMaskInterface.register(name, mask_function)
    return name


def final_base(name: str) -> str:
    """The backend under any registered hooks: ``vpstudy_hooks_vpstudy_dense_sdpa`` -> ``sdpa``
    (what decides the form a mask takes: additive float for ``eager``, boolean otherwise)."""
    while name in _BASES:
        name = _BASES[name]
    return name


def all_configs(config: Any) -> list[Any]:
    """A config and all its sub-configs (recursively)."""
    configs, queue = [], [config]
    while queue:
        c = queue.pop()
        configs.append(c)
        queue.extend(getattr(c, k) for k in c.sub_configs if getattr(c, k, None) is not None)
    return configs


@dataclass(frozen=True)
class ForwardCall:
    """What a model forward pre-hook learns about one forward.

    Attributes:
        input_ids: [B, Q] this forward's token ids (None if it was given embeddings).
        starts: whether it starts a generation (no cache, or an empty one: the prefill).
        offset: cache slots written before it (0 without a cache).
        cache: its ``past_key_values`` (None without one).
    """

    input_ids: Any
    starts: bool
    offset: int
    cache: Any

    @property
    def written(self) -> int:
        """Cache slots written once this forward's own keys are in: the keys its attention calls
        may read (``offset + Q``); the slots after them (a static cache's tail) are not written."""
        return self.offset + (0 if self.input_ids is None else int(self.input_ids.shape[1]))


def forward_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ForwardCall:
    """A model forward pre-hook's arguments as a :class:`ForwardCall`."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    cache = kwargs.get("past_key_values")
    offset = written_slots(cache)
    return ForwardCall(input_ids, cache is None or offset == 0, offset, cache)


class WrittenSlots:
    """An attention call restricted to the cache slots the current forward has written.

    A static cache hands every attention call all of its ``max_cache_len`` slots with a mask that
    hides the unwritten tail. :meth:`view` cuts the keys, the values and the mask to the written
    slots (views, no copy), and drops a decode call's mask where it hides nothing among them: the
    call a dynamic cache makes for the same step (for an unpadded batch, no mask, which also lets
    SDPA use grouped-query attention instead of repeating the KV heads). Masks other than
    transformers' [B, 1 or H, Q, T] tensors (a flex-attention ``BlockMask``, a flash-attention
    padding mask) leave the call as it was.
    """

    def __init__(self) -> None:
        self.written = 0
        self._clear: dict[int, bool] = {}

    def start(self, written: int) -> None:
        """A new forward: its attention calls may read ``written`` slots (:attr:`ForwardCall.written`)."""
        self.written, self._clear = written, {}

    def view(self, key: Any, value: Any, attention_mask: Any, queries: int) -> tuple[Any, Any, Any]:
        """``(key, value, attention_mask)`` of the written slots; ``queries`` = the call's query length."""
        written = self.written
        four_d = attention_mask is None or (hasattr(attention_mask, "dim") and attention_mask.dim() == 4)
        if not 0 < written < key.shape[2] or not four_d:
            return key, value, attention_mask
        key, value = key[:, :, :written], value[:, :, :written]
        if attention_mask is None:
            return key, value, None
        mask = attention_mask[..., :written]
        if queries == 1:  # one mask object serves every layer of a forward: look at it once
            clear = self._clear.get(id(attention_mask))
            if clear is None:
                clear = self._clear[id(attention_mask)] = bool(as_visible(mask).all())
            if clear:
                mask = None
        return key, value, mask


def _new_tokens(model: Any, prompt_tokens: int, kwargs: dict[str, Any]) -> int | None:
    """How many tokens a ``generate`` call may produce (``max_new_tokens``, else ``max_length``
    minus the prompt), from its arguments or the generation config; None if neither says."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if new is None:
        length = kwargs.get("max_length", getattr(config, "max_length", None))
        new = None if length is None else int(length) - prompt_tokens
    return None if new is None else int(new)


def guarded_generate(model: Any, who: str | Callable[[], str], generate: Callable[..., Any]) -> Callable[..., Any]:
    """``generate`` that first refuses, in one line (:class:`vpstudy.caching.CacheError`), a
    ``past_key_values`` cache ``who`` cannot read exactly or one too short for the prompt and
    ``max_new_tokens``, before anything runs. Without a ``generation_config`` argument it also
    passes ``disable_compile=True``: transformers compiles the forward of a static-cache
    generation on accelerators, and a compiled forward would not run the hooks as written.

    ``who`` names the reader in messages (a callable is asked at each call)."""

    @functools.wraps(generate)
    def checked(*args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get("past_key_values")
        if cache is not None:
            name = who() if callable(who) else who
            check_readable(cache, name)
            ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
            if ids is not None and hasattr(ids, "shape"):
                prompt = int(ids.shape[1])
                check_room(cache, prompt, _new_tokens(model, prompt, kwargs), name)
        if "generation_config" not in kwargs:
            kwargs.setdefault("disable_compile", True)
        return generate(*args, **kwargs)

    return checked


class AttentionSwap:
    """Switch a model's text backbone to the hook ``prefix + <current backend>`` for a ``with`` block.

    Args:
        model: a transformers VLM.
        prefix: the hook's name prefix (e.g. ``vpstudy_hooks_``).
        wrapper: see :func:`register`.
    """

    def __init__(self, model: Any, prefix: str, wrapper: Wrapper) -> None:
        self.model, self.prefix, self.wrapper = model, prefix, wrapper
        self._saved: list[tuple[Any, str | None]] = []

    @property
    def base(self) -> str:
        """The text backbone's attention implementation now."""
        return self.model.config.get_text_config()._attn_implementation

    def __enter__(self) -> str:
        self._saved = [(c, c._attn_implementation) for c in all_configs(self.model.config)]
        name = register(self.prefix, self.base, self.wrapper)
        self.model.set_attn_implementation({"text_config": name})
        return name

    def __exit__(self, *exc: object) -> None:
        text_config = self.model.config.get_text_config()
        text_base = next(impl for config, impl in self._saved if config is text_config)
        self.model.set_attn_implementation({"text_config": text_base})
        for config, impl in self._saved:  # every (sub)config exactly as it was
            config._attn_implementation_internal = impl


# --- the shared per-generation state ------------------------------------------------------------


def _one_mask(attention_mask: Any) -> Any:
    """The mask of full-attention layers from a dict of masks by attention type (as ``generate``
    prepares them for a static cache); anything else as it is."""
    if isinstance(attention_mask, dict):
        return attention_mask.get("full_attention", next(iter(attention_mask.values()), None))
    return attention_mask


def padding_mask(input_ids: torch.Tensor, attention_mask: Any, offset: int = 0,
                 pad_token_id: int | None = None) -> torch.Tensor:  # fmt: skip
    """[B, Q] long: 1 for the real tokens of a forward's ``input_ids`` [B, Q], 0 for padding.

    Read from the forward's ``attention_mask``: a [B, ≥ Q] padding mask (its last Q columns); the
    [B or 1, 1 or H, Q, T] attention mask, or a dict of them by attention type (what ``generate``
    passes on a static cache), whose last query row sees exactly the real keys among this
    forward's slots ``offset .. offset + Q - 1``; None (no mask: every token is attended). Any
    other mask (a flex-attention ``BlockMask``) falls back to the run of ``pad_token_id`` tokens
    at the start of the sequence (none after ``offset`` 0, or without a pad id).

    Args:
        input_ids: [B, Q] the forward's token ids.
        attention_mask: the forward's ``attention_mask`` keyword.
        offset: cache slots written before the forward.
        pad_token_id: the padding token, for the fallback.
    """
    batch, queries = input_ids.shape
    ones = torch.ones_like(input_ids)
    mask = _one_mask(attention_mask)
    if mask is None:
        return ones
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] >= queries:
        return mask[:, mask.shape[1] - queries :]
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-1] >= offset + queries:
        last = as_visible(mask[:, :1, -1, offset : offset + queries])[:, 0]  # [B or 1, Q]
        return last.expand(batch, queries).to(device=input_ids.device, dtype=input_ids.dtype)
    if pad_token_id is None or offset > 0:
        return ones
    return ((input_ids != pad_token_id).cumsum(dim=1) > 0).to(input_ids.dtype)


@dataclass
class GenerationState:
    """The per-generation state every participant shares, computed once per forward by the context.

    Attributes:
        visual_index: [B, N] long key positions of each row's visual tokens (left-aligned, padded
            with 0), from the family spec's placeholder tokens, collected across prefill chunks.
        visual_valid: [B, N] bool, which entries are real.
        n_visual: [B] long, visual tokens per row (N_v).
        tokens: [B, T] the generation's tokens so far: the prompt, then each forward's input.
        token_mask: [B, T] long, 1 for real tokens and 0 for (left) padding (:func:`padding_mask`).
        kind: the latest forward: :data:`START`, :data:`CHUNK`, :data:`DECODE`, or :data:`BEGIN`
            when the generation was begun by :meth:`HookContext.begin` and no forward has run.
        step: 0 during the prefill (all its chunks); t at the decode forward that predicts
            generated token t (its input is token t - 1).
        chunks: prefill forwards seen (1 unless the prefill came in chunks; 0 after ``begin``).
        decoding: a decode step has run (later multi-token forwards are not prefill chunks).
        call: the latest forward (None after ``begin``).
        forwards: forwards seen since the generation began.
    """

    visual_index: torch.Tensor
    visual_valid: torch.Tensor
    n_visual: torch.Tensor
    tokens: torch.Tensor
    token_mask: torch.Tensor
    kind: str = START
    step: int = 0
    chunks: int = 1
    decoding: bool = False
    call: ForwardCall | None = None
    forwards: int = 0

    TENSORS: ClassVar[tuple[str, ...]] = ("visual_index", "visual_valid", "n_visual", "tokens", "token_mask")

    @property
    def device(self) -> torch.device:
        """Where the state's tensors are."""
        return self.visual_index.device

    @property
    def first_decode(self) -> bool:
        """The latest forward is the first decode step (the whole prompt has been seen)."""
        return self.kind == DECODE and self.step == 1

    def to(self, device: torch.device) -> None:
        """Move the tensors to ``device`` in place (a layer on another device of a split model)."""
        move_fields(self, device, self.TENSORS)

    def add_chunk(self, input_ids: torch.Tensor, offset: int, spec: Any, config: Any, mask: torch.Tensor) -> None:
        """A further prefill chunk at cache slot ``offset``: its visual positions and tokens."""
        index, valid, _ = spec.visual_positions(input_ids, config)
        self.tokens = torch.cat([self.tokens, input_ids], dim=1)
        self.token_mask = torch.cat([self.token_mask, mask], dim=1)
        self.chunks += 1
        if index.shape[1] == 0:
            return
        rows = [torch.cat([self.visual_index[b, self.visual_valid[b]], index[b, valid[b]] + offset])
                for b in range(index.shape[0])]  # fmt: skip
        width = max(len(r) for r in rows)
        lengths = torch.tensor([len(r) for r in rows], device=index.device)
        self.visual_valid = torch.arange(width, device=index.device)[None, :] < lengths[:, None]
        self.visual_index = torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows])
        self.n_visual = self.visual_valid.sum(-1)


# --- participants and the context -----------------------------------------------------------------


class Participant:
    """What takes part in a model's :class:`HookContext` (the recorder, the pruner).

    A participant enters with ``HookContext.join(model, self)`` and leaves with
    ``context.leave(self)``. It implements:

    - :attr:`role`: :data:`MODIFY` (its :meth:`attend` may change what the base backend gets)
      or :data:`OBSERVE` (its :meth:`observe` sees each call after the base backend ran);
      modifiers see a call before observers, each group in the order it entered;
    - :attr:`who`: how messages name it (``"the recorder"``), and :meth:`error`, its one-line
      error type;
    - :meth:`check_join`: refuse to share the model with the participants already there;
    - :meth:`on_forward`: the shared state at each forward (and at :meth:`HookContext.begin`);
    - :meth:`attend` (modifiers) or :meth:`observe` (observers).
    """

    role: ClassVar[int] = OBSERVE
    who: ClassVar[str] = "vpstudy"

    @property
    def changes_keys(self) -> bool:
        """Whether its :meth:`attend` may hand the base backend other keys than the cache's, or
        skip it (no observer can then see the attention it computes)."""
        return False

    def error(self, message: str) -> VpstudyError:
        """The participant's one-line error for ``message``."""
        return HookError(message)

    def check_join(self, others: list[Participant]) -> None:
        """Raise (:meth:`error`) if it cannot share the model with ``others``; default: it can."""

    def on_forward(self, state: GenerationState, kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
        """A forward is about to run (``state.kind``: START, CHUNK, DECODE; or BEGIN with ``kwargs``
        None: :meth:`HookContext.begin`), ``state`` already updated for it.

        Returns:
            The forward's changed keyword arguments, or None to leave them (the next participant
            gets the changed ones).
        """
        return None

    def attend(self, proceed: Callable[..., Any], base: str, module: Any, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, attention_mask: Any, **kwargs: Any) -> Any:  # fmt: skip
        """A modifier's turn at one text-layer attention call (keys: the written slots).

        ``proceed(module, query, key, value, attention_mask, **kwargs)`` runs the rest: later
        modifiers, the base backend, then the observers, which see what it was given. ``base``
        is the backend under every hook (``sdpa``, ``eager``), for the form of a mask. Default:
        proceed unchanged.
        """
        return proceed(module, query, key, value, attention_mask, **kwargs)

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: Any, scaling: float,
                state: GenerationState) -> None:  # fmt: skip
        """An observer's turn at one text-layer attention call, after the base backend ran: the
        query [B, H, Q, D], the keys [B, H_kv, T, D] (written slots) and mask the backend got, the
        softmax scale and the shared state. Default: nothing."""


def _begun_with(state: GenerationState, input_ids: torch.Tensor) -> bool:
    """Whether ``state`` was begun by :meth:`HookContext.begin` for ``input_ids`` and no forward ran since."""
    if state.kind != BEGIN or state.forwards or state.tokens.shape != input_ids.shape:
        return False
    return bool(torch.equal(state.tokens, input_ids.to(state.device)))


def _dispatch(function: Callable[..., Any], base: str, module: Any, query: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor, attention_mask: Any, **kwargs: Any) -> Any:  # fmt: skip
    """The registered function ``vpstudy_hooks_<base>``: hand the call to the context serving this
    attention module (a module without one runs the base backend)."""
    context = module.__dict__.get(CONTEXT_ATTR)
    if context is None:
        return function(module, query, key, value, attention_mask, **kwargs)
    return context.attend(function, base, module, query, key, value, attention_mask, **kwargs)


class HookContext:
    """The one set of hooks on a model that every :class:`Participant` shares; see the module
    docstring. Create it through :meth:`join`, never directly.

    Attributes:
        model: the VLM.
        spec: its family spec.
        participants: in the order they entered.
        state: the current (or last) generation's shared state, None before the first.
        slots: the current forward's written cache slots.
    """

    def __init__(self, model: Any) -> None:
        from .loading import family_of

        self.model = model
        self.spec = family_of(model)
        self.participants: list[Participant] = []
        self.state: GenerationState | None = None
        self.slots = WrittenSlots()
        self._told: list[Participant] = []  # the participants that began the current generation
        self._modifiers: list[Participant] = []
        self._observers: list[Participant] = []
        self._modules = [layer.self_attn for layer in self.spec.text_layer_modules(model)]
        self._swap = AttentionSwap(model, HOOK_PREFIX, _dispatch)
        self._hook: Any = None
        self._saved_generate: Any = None
        self.base = ""  # the text backbone's attention implementation before the context

    # --- joining and leaving -----------------------------------------------------------------

    @staticmethod
    def of(model: Any) -> HookContext | None:
        """The context installed on ``model``, or None."""
        return model.__dict__.get(CONTEXT_ATTR)

    @classmethod
    def join(cls, model: Any, participant: Participant) -> HookContext:
        """Add ``participant`` to ``model``'s context, installing the context if it is the first.

        Raises:
            VpstudyError: the participant's :meth:`~Participant.check_join` refused the others
                (nothing on the model changed).
        """
        context = cls.of(model)
        participant.check_join(list(context.participants) if context is not None else [])
        if context is not None and participant in context.participants:
            raise participant.error(f"{participant.who} is already installed on this model")
        if context is None:
            context = cls(model)
            context._install()
        context.participants.append(participant)
        context._order()
        return context

    def leave(self, participant: Participant) -> None:
        """Remove ``participant``; the last to leave restores the model exactly."""
        if participant in self.participants:
            self.participants.remove(participant)
            self._order()
        if participant in self._told:
            self._told.remove(participant)
        if not self.participants and self.of(self.model) is self:
            self._uninstall()

    @property
    def who(self) -> str:
        """The participants, for messages (``"the recorder and the pruner"``)."""
        return " and ".join(p.who for p in self.participants) or "vpstudy"

    def _order(self) -> None:
        self._modifiers = [p for p in self.participants if p.role == MODIFY]
        self._observers = [p for p in self.participants if p.role != MODIFY]

    def _install(self) -> None:
        model = self.model
        self.base = self._swap.base
        self._swap.__enter__()
        try:
            for module in self._modules:
                module.__dict__[CONTEXT_ATTR] = self
            self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
            self._saved_generate = model.__dict__.get("generate")
            if hasattr(model, "generate"):
                model.generate = guarded_generate(model, lambda: self.who, model.generate)
            model.__dict__[CONTEXT_ATTR] = self
        except BaseException:
            self._uninstall()
            raise

    def _uninstall(self) -> None:
        model = self.model
        model.__dict__.pop(CONTEXT_ATTR, None)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._saved_generate is not None:
            model.generate = self._saved_generate
        else:
            model.__dict__.pop("generate", None)
        self._saved_generate = None
        for module in self._modules:
            if module.__dict__.get(CONTEXT_ATTR) is self:
                del module.__dict__[CONTEXT_ATTR]
        self._swap.__exit__()

    # --- per generation ----------------------------------------------------------------------

    def _pad_token_id(self) -> int | None:
        for config in (getattr(self.model, "generation_config", None), self.model.config.get_text_config()):
            pad = getattr(config, "pad_token_id", None)
            if isinstance(pad, int):
                return pad
        return None

    def _new_state(self, input_ids: torch.Tensor, attention_mask: Any, kind: str,
                   call: ForwardCall | None) -> GenerationState:  # fmt: skip
        index, valid, counts = self.spec.visual_positions(input_ids, self.model.config)
        mask = padding_mask(input_ids, attention_mask, 0, self._pad_token_id())
        return GenerationState(index, valid, counts, input_ids, mask, kind=kind, call=call,
                               chunks=0 if kind == BEGIN else 1)  # fmt: skip

    def begin(self, input_ids: torch.Tensor, attention_mask: Any = None) -> GenerationState:
        """Begin a generation whose prompt is already in the cache (its prefill ran before): the
        next forward is its first decode step. Every participant is told (``kind`` BEGIN).

        A second call for the same prompt before any forward (each participant's ``begin``) keeps
        the state, telling only the participants that joined since (or all of them again when it
        brings a padding mask the first call did not have).

        Args:
            input_ids: [B, P] the prompt (left-padded), as the prefill saw it.
            attention_mask: [B, P] its padding mask, if any.
        """
        state = self.state
        if state is not None and _begun_with(state, input_ids):
            mask = None if attention_mask is None else padding_mask(input_ids, attention_mask, 0, self._pad_token_id())
            if mask is not None and not torch.equal(mask.to(state.device), state.token_mask):
                state.token_mask, self._told = mask.to(state.device), []
        else:
            state = self.state = self._new_state(input_ids, attention_mask, BEGIN, None)
            self._told = []
        for participant in [p for p in self.participants if p not in self._told]:
            participant.on_forward(state, None)
            self._told.append(participant)
        return state

    def _pre_forward(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The model's forward pre-hook: update the shared state, then tell each participant."""
        call = forward_call(args, kwargs)
        input_ids = call.input_ids
        if input_ids is None:
            first = self.participants[0] if self.participants else Participant()
            raise first.error(f"{first.who} needs input_ids (visual positions are found from placeholder tokens)")
        self.slots.start(call.written)
        state = self.state
        if call.starts:
            check_readable(call.cache, self.who)
            check_room(call.cache, int(input_ids.shape[1]), None, self.who)
            state = self.state = self._new_state(input_ids, kwargs.get("attention_mask"), START, call)
        elif state is None:  # a generation that began outside the context, without begin()
            return None
        else:
            if state.device != input_ids.device:  # back from a split model's last device
                state.to(input_ids.device)
            if input_ids.shape[1] > 1 and not state.decoding:  # a further prefill chunk
                mask = padding_mask(input_ids, kwargs.get("attention_mask"), call.offset)
                state.add_chunk(input_ids, call.offset, self.spec, self.model.config, mask)
                state.kind = CHUNK
            else:
                state.kind, state.decoding, state.step = DECODE, True, state.step + 1
                state.tokens = torch.cat([state.tokens, input_ids], dim=1)
                state.token_mask = torch.cat([state.token_mask, torch.ones_like(input_ids)], dim=1)
            state.call = call
        state.forwards += 1
        changed = None
        for participant in list(self.participants):
            new = participant.on_forward(state, kwargs)
            if new is not None:
                kwargs = changed = new
        return None if changed is None else (args, changed)

    # --- attention ---------------------------------------------------------------------------

    def attend(self, function: Callable[..., Any], base: str, module: Any, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, attention_mask: Any, **kwargs: Any) -> Any:  # fmt: skip
        """One text-layer attention call (see the module docstring): the written slots, then the
        modifiers, the base backend ``function`` and the observers."""
        state = self.state
        if state is None:  # no generation traced yet
            return function(module, query, key, value, attention_mask, **kwargs)
        key, value, attention_mask = self.slots.view(key, value, attention_mask, query.shape[2])
        if state.device != query.device:  # a layer on another device (device_map)
            state.to(query.device)
        modifiers, observers, layer = self._modifiers, self._observers, module.layer_idx

        def run(i: int, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any,
                **kwargs: Any) -> Any:  # fmt: skip
            if i < len(modifiers):
                proceed = functools.partial(run, i + 1)
                return modifiers[i].attend(proceed, final_base(base), module, query, key, value, mask, **kwargs)
            output = function(module, query, key, value, mask, **kwargs)
            if observers:
                scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
                for observer in observers:
                    observer.observe(layer, query, key, mask, scaling, state)
            return output

        return run(0, module, query, key, value, attention_mask, **kwargs)
