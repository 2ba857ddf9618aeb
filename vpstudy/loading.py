"""``vpstudy.load``: a model and its processor, for any supported family."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .families import FamilySpec, family_for_config
from .processing import FallbackProcessor
from .errors import VpstudyError


class ModelLoadError(VpstudyError):
    """A model directory that cannot be loaded (one-line message naming the path)."""


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' informational logging and progress bars inside the block.

    Loading and saving small models prints shard lists and weight-loading bars, and probing
    processors that need torchvision logs warnings the fallback already handles.
    """
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


def _load_processor(source: str, spec: FamilySpec, config: Any) -> Any:
    """The family's transformers processor, or :class:`FallbackProcessor` where it cannot be built."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(source)
        if hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
            return processor
    except (ImportError, AttributeError, OSError, ValueError, TypeError, KeyError):
        pass  # e.g. a video processor that imports torchvision
    tokenizer = AutoTokenizer.from_pretrained(source)
    image_processor = AutoImageProcessor.from_pretrained(source)
    return FallbackProcessor(spec, tokenizer, image_processor, config)


_LOCATION_KEYS = ("_name_or_path", "_commit_hash")  # where a config was loaded from, not what the model is


def _without_location(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_location(v) for k, v in value.items() if k not in _LOCATION_KEYS}
    return value


def config_hash(config: Any) -> str:
    """A short stable hash of a model config (sha256 of its sorted JSON), to tell models apart.

    The path the config was loaded from (``_name_or_path``) is left out, so the same model
    loaded as ``data/x`` or ``/abs/data/x`` has one hash."""
    text = json.dumps(_without_location(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load(
    path_or_name: str | Path,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """Load a supported VLM and its processor.

    Args:
        path_or_name: a local directory in ``save_pretrained`` form, or a hub name where the hub
            is reachable.
        dtype: parameter dtype (``torch.float32`` by default; ``"bfloat16"`` etc. accepted).
        device: where to put the model.
        attn_implementation: attention backend for the whole model outside vpstudy contexts.

    Returns:
        ``(model, processor)``: the model in eval mode, with ``model.vpstudy_family`` holding its
        :class:`~vpstudy.families.FamilySpec`; the processor is the family's transformers processor
        or a :class:`~vpstudy.processing.FallbackProcessor` with the same call signature.

    Raises:
        ModelLoadError: missing directory or config.
        UnsupportedFamilyError: a model type vpstudy has no spec for.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    source = str(path_or_name)
    path = Path(source)
    looks_local = path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "holds no config.json"
        raise ModelLoadError(f"{source}: model directory {what}")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{source}: cannot read model config ({str(err).splitlines()[0]})") from None
    spec = family_for_config(config, source=f"{source}/config.json" if looks_local else source)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with quiet_transformers():
        model = AutoModelForImageTextToText.from_pretrained(
            source, dtype=dtype, attn_implementation=attn_implementation
        )
        model.to(device).eval()
        model.vpstudy_family = spec
        processor = _load_processor(source, spec, model.config)
    return model, processor


def family_of(model: Any) -> FamilySpec:
    """The family spec of a model (set by :func:`load`, else looked up from its config)."""
    spec = getattr(model, "vpstudy_family", None)
    return spec if spec is not None else family_for_config(model.config, source=type(model).__name__)
