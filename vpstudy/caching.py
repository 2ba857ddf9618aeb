"""Which KV cache a generation decodes on, and which caches the recorder and the pruner read exactly.

transformers hands an attention function every key its cache returns: for a ``DynamicCache`` the
keys written so far, for a ``StaticCache`` all ``max_cache_len`` preallocated slots, written or
not (``generate(..., cache_implementation="static")``). The recorder and the pruner therefore
take the number of *written* slots from the cache itself, at each forward, and read only those
(:func:`written_slots`); slot ``i`` is then token ``i`` of the (left-padded) prompt followed by
the generated tokens, on either cache.

That holds for transformers' full-attention layers, ``DynamicLayer`` and ``StaticLayer``
(:data:`EXACT_LAYERS`). Other layers break it, and a cache holding one is refused with a
:class:`CacheError` before any work starts: sliding-window layers keep a ring of the last W keys
(slot ≠ position once the window is full), quantized layers hand the attention dequantized keys,
indexed and linear-attention layers are other mechanisms.

Choosing (``vpstudy record --cache``, :class:`vpstudy.collect.RecordSettings`): ``static`` —
one preallocated cache per ``generate`` call, written in place (no per-step concatenation of the
whole cache, which is what a ``DynamicCache`` does at every step); ``dynamic`` — transformers'
default; ``auto`` (the default) — ``static`` where every text layer of the model gets an exact
static layer, else ``dynamic`` where that is exact, else an error (:func:`resolve_cache`).
"""

from __future__ import annotations

from typing import Any

from .errors import VpstudyError

CACHES = ("auto", "static", "dynamic")


class CacheError(VpstudyError):
    """A KV cache the recorder or the pruner cannot read exactly, or one too short for the
    generation asked of it (one line naming the cache and why)."""


def exact_layers() -> tuple[type, ...]:
    """The cache layer classes whose slots are token positions: ``DynamicLayer``, ``StaticLayer``
    (exact classes: their sliding-window, indexed and quantized subclasses are not)."""
    from transformers.cache_utils import DynamicLayer, StaticLayer

    return DynamicLayer, StaticLayer


def layer_classes(cache: Any) -> list[type]:
    """The layer classes of a transformers ``Cache`` (for a cache that adds its layers lazily,
    the class it will add)."""
    layers = [type(layer) for layer in getattr(cache, "layers", [])]
    lazy = getattr(cache, "layer_class_to_replicate", None)
    return layers or ([lazy] if lazy is not None else [])


def check_readable(cache: Any, who: str) -> None:
    """Raise :class:`CacheError` unless every layer of ``cache`` is exact (None, no cache, passes).

    Args:
        cache: the ``past_key_values`` of a forward (a transformers ``Cache``) or None.
        who: the reader, for the message (``"the recorder"``, ``"the pruner"``).
    """
    if cache is None:
        return
    if not hasattr(cache, "get_seq_length"):
        raise CacheError(f"{who} cannot read a past_key_values of type {type(cache).__name__}; "
                         "use a transformers DynamicCache or StaticCache")  # fmt: skip
    exact = exact_layers()
    other = sorted({c.__name__ for c in layer_classes(cache) if c not in exact})
    if other:
        raise CacheError(f"{who} cannot read a {type(cache).__name__} with {', '.join(other)} layers exactly (their "
                         "cache slots are not token positions); use a cache of full-attention DynamicLayer or "
                         "StaticLayer layers")  # fmt: skip


def written_slots(cache: Any) -> int:
    """Cache slots written so far (0 for no cache): the keys an attention call may read, before
    this forward's own."""
    return 0 if cache is None else int(cache.get_seq_length())


def capacity(cache: Any) -> int | None:
    """Slots a preallocated cache holds (``max_cache_len``); None for a cache that grows."""
    if cache is None or not getattr(cache, "layers", None):
        return None
    sizes = [int(layer.max_cache_len) for layer in cache.layers if hasattr(layer, "max_cache_len")]
    return min(sizes) if sizes else None


def check_room(cache: Any, prompt_tokens: int, new_tokens: int | None, who: str) -> None:
    """Raise :class:`CacheError` when a preallocated ``cache`` cannot hold a generation of
    ``new_tokens`` tokens after a ``prompt_tokens``-token prompt: the slots written already, the
    prompt and every generated token fed back (all but the last) must fit, ``written + prompt +
    new − 1`` (``new_tokens`` None: the prompt alone)."""
    slots = capacity(cache)
    if slots is None:
        return
    written = written_slots(cache)
    need = written + prompt_tokens + max(0, (new_tokens or 1) - 1)
    if need > slots:
        what = f"a {prompt_tokens}-token prompt" + (f" and {new_tokens} new tokens" if new_tokens else "")
        held = f" ({written} already written)" if written else ""
        raise CacheError(f"{who}: the static cache holds {slots} slots{held}; {what} need {need} "
                         f"(prompt + max_new_tokens - 1); allocate at least {need} slots")  # fmt: skip


def text_config(model: Any) -> Any:
    """The decoder config a cache of ``model`` is built from."""
    return model.config.get_text_config(decoder=True)


def cache_classes(model: Any, kind: str) -> list[type]:
    """The layer classes ``generate(cache_implementation=kind)`` gives ``model`` (``static`` or
    ``dynamic``), read from an unallocated cache of its config."""
    from transformers import DynamicCache, StaticCache

    config = text_config(model)
    cache = StaticCache(config=config, max_cache_len=1) if kind == "static" else DynamicCache(config=config)
    return layer_classes(cache)


def resolve_cache(model: Any, name: str = "auto") -> str:
    """``"static"`` or ``"dynamic"``: the cache ``name`` asks for, checked against ``model``.

    ``auto`` takes ``static`` when every text layer gets an exact static layer, else
    ``dynamic`` when that is exact.

    Raises:
        CacheError: an unknown name, or a cache the recorder cannot read exactly on this model
            (e.g. a sliding-window text model); nothing has run yet.
    """
    if name not in CACHES:
        raise CacheError(f"cache must be one of {', '.join(CACHES)}, got {name!r}")
    exact = exact_layers()
    kinds = ("static", "dynamic") if name == "auto" else (name,)
    found: dict[str, list[str]] = {}
    for kind in kinds:
        other = sorted({c.__name__ for c in cache_classes(model, kind) if c not in exact})
        if not other:
            return kind
        found[kind] = other
    why = "; ".join(f"a {kind} cache gets {', '.join(other)} layers" for kind, other in found.items())
    raise CacheError(f"cache {name}: {type(model).__name__} cannot be recorded exactly ({why}, whose slots are "
                     "not token positions)")  # fmt: skip


def generate_kwargs(kind: str) -> dict[str, Any]:
    """``generate`` arguments that decode on the resolved cache ``kind`` (``static`` or ``dynamic``)."""
    if kind not in ("static", "dynamic"):
        raise CacheError(f"resolve the cache first: got {kind!r}, expected static or dynamic")
    return {"cache_implementation": kind}
