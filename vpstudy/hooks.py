"""Scoped attention hooks: how the recorder and the pruner get into a model's text attention.

No class is patched and no modeling file is copied. A hook is a *registered attention function*
``<prefix><base>`` (transformers' ``AttentionInterface``, with the base's mask function
registered under the same name in ``AttentionMaskInterface``) that wraps the backend the text
model used before (``sdpa``, ``eager``, or another vpstudy hook, so hooks stack).
:class:`AttentionSwap` switches the text backbone to it and restores every (sub)config's
attention implementation exactly on exit.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

Wrapper = Callable[..., Any]  # wrapper(function, base, module, query, key, value, attention_mask, **kwargs)


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
    if name in AttentionInterface._global_mapping:
        return name

    def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
        return wrapper(base_function(module, base), base, module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(base, sdpa_mask))
    return name


def all_configs(config: Any) -> list[Any]:
    """A config and all its sub-configs (recursively)."""
    configs, queue = [], [config]
    while queue:
        c = queue.pop()
        configs.append(c)
        queue.extend(getattr(c, k) for k in c.sub_configs if getattr(c, k, None) is not None)
    return configs


def forward_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, bool]:
    """From a model forward pre-hook's arguments: the ``input_ids`` (None if absent) and whether
    this forward starts a generation (no cache, or an empty one: the prefill)."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    cache = kwargs.get("past_key_values")
    return input_ids, cache is None or cache.get_seq_length() == 0


class AttentionSwap:
    """Switch a model's text backbone to the hook ``prefix + <current backend>`` for a ``with`` block.

    Args:
        model: a transformers VLM.
        prefix: the hook's name prefix (e.g. ``vpstudy_record_``).
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


class Installation:
    """Install ``owner`` (a recorder or pruner) on a model for a ``with`` block: the attention
    hook (:class:`AttentionSwap`), ``owner`` registered for every text attention module in
    ``registry`` (what the hook looks up), and ``pre_forward`` as a forward pre-hook of the model
    (it sees each forward's ``input_ids`` and cache, to tell a prefill from a decode step)."""

    def __init__(self, model: Any, prefix: str, wrapper: Wrapper, modules: Any, registry: dict[int, Any],
                 owner: Any, pre_forward: Callable[..., Any]) -> None:  # fmt: skip
        self.swap = AttentionSwap(model, prefix, wrapper)
        self.model, self.modules, self.registry, self.owner, self.pre_forward = model, list(modules), registry, owner, pre_forward
        self._hook: Any = None

    @property
    def base(self) -> str:
        return self.swap.base

    def __enter__(self) -> Installation:
        self.swap.__enter__()
        for module in self.modules:
            self.registry[id(module)] = self.owner
        self._hook = self.model.register_forward_pre_hook(self.pre_forward, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._hook.remove()
        for module in self.modules:
            self.registry.pop(id(module), None)
        self.swap.__exit__(*exc)
