"""``vpstudy.load``: a model and its processor, for any supported family.

A model is a local directory in ``save_pretrained`` form or a Hugging Face hub id ``org/name``
(``org/name@revision`` for a branch, tag or commit), read through transformers'
``from_pretrained`` and the hub cache (``HF_HOME``, ``HF_HUB_CACHE``); offline
(``HF_HUB_OFFLINE=1``) only the cache is read, and an id that is not there is refused in one line
before anything runs. ``device_map="auto"`` lets transformers and accelerate place a model larger
than one device (:mod:`vpstudy.devices`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .errors import VpstudyError
from .families import FamilySpec, family_for_config
from .processing import FallbackProcessor


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


def _load_processor(source: str, spec: FamilySpec, config: Any, **hub: Any) -> Any:
    """The family's transformers processor where it builds (with torchvision installed, as on GPU
    machines, for every family; without it, LLaVA's), else :class:`FallbackProcessor`, which builds
    the same inputs (``tests/test_hub.py`` compares them)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(source, **hub)
        if hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
            return processor
    except (ImportError, AttributeError, OSError, ValueError, TypeError, KeyError):
        pass  # e.g. a video processor that imports torchvision
    tokenizer = AutoTokenizer.from_pretrained(source, **hub)
    image_processor = AutoImageProcessor.from_pretrained(source, **hub)
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


# a local model directory needs one of each group (a sharded checkpoint's index lists its shards)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tekken.json")  # fmt: skip
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def looks_local(source: str) -> bool:
    """Whether ``source`` names a local directory rather than a hub model (``org/name``).

    Local: it exists; or it starts with ``.``, ``/`` or ``~``; or it has more than one ``/``;
    or it is ``a/b`` where ``a`` is an existing local directory (``data/organism-lava``). A bare
    name that does not exist (``gpt2``) and ``org/name`` whose ``org`` is no local directory are
    hub names.
    """
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")):
        return True
    parts = source.replace(os.sep, "/").split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether the environment asks for offline mode now (``HF_HUB_OFFLINE`` or
    ``TRANSFORMERS_OFFLINE``; read at each call, unlike huggingface_hub, which reads it at import)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return any((f or "").upper() in _TRUE for f in flags) or bool(constants.HF_HUB_OFFLINE)


def hub_cache() -> Path:
    """The hub cache the environment names now: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    huggingface_hub's default (``~/.cache/huggingface/hub``)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def split_hub_id(source: str) -> tuple[str, str | None]:
    """``org/name@revision`` as (``org/name``, ``revision``); the revision is None when not given."""
    repo, sep, revision = source.partition("@")
    return repo, (revision if sep and revision else None)


def hub_snapshot(repo: str, revision: str | None = None) -> str | None:
    """The commit hash of the cached snapshot of hub model ``repo`` at ``revision`` (default
    ``main``) that ``from_pretrained`` read, or None when its config.json is not in the cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, "config.json", cache_dir=str(hub_cache()), revision=revision)
    except ValueError:
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def check_hub_model(source: str) -> None:
    """Refuse, in one line, a hub id that cannot be read offline: with ``HF_HUB_OFFLINE`` set,
    the id (at its revision, default ``main``) must be in the hub cache with its config.json.
    Online, nothing is checked here (a hub that cannot be reached fails at load, in one line).

    Raises:
        ModelLoadError: naming the id, the cache directory and ``HF_HUB_OFFLINE``.
    """
    if not hub_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    repo, revision = split_hub_id(source)
    cache = hub_cache()
    try:
        found = try_to_load_from_cache(repo, "config.json", cache_dir=str(cache), revision=revision)
    except ValueError as e:  # not a valid repo id
        raise ModelLoadError(f"{source}: not a local model directory nor a hub id org/name ({e})") from None
    if not isinstance(found, str):
        at = f" at revision {revision}" if revision else ""
        raise ModelLoadError(f"{source}: model not in the Hugging Face cache {cache}{at}, and HF_HUB_OFFLINE=1 forbids "
                             f"downloading it; download it where the hub is reachable (hf download {repo}"
                             f"{' --revision ' + revision if revision else ''}) into that "
                             "cache, or unset HF_HUB_OFFLINE")  # fmt: skip


def check_model_dir(source: str | Path) -> None:
    """Refuse, in one line, a local model directory that cannot load: missing (naming a close
    sibling), not a directory, without a readable config.json, of an unsupported family, or
    without weights, tokenizer or image processor config; or whose safetensors weights are
    truncated or corrupt (their headers are read, not the tensors). Hub names (see
    :func:`looks_local`) are checked by :func:`check_hub_model` (offline: in the cache).

    Raises:
        ModelLoadError: one line naming the directory or file and what to do.
        UnsupportedFamilyError: config.json names a model type vpstudy has no spec for.
    """
    source = str(source)
    if not looks_local(source):
        check_hub_model(source)
        return
    path = Path(source).expanduser()
    if not path.exists():
        parent = path.parent if str(path.parent) else Path(".")
        siblings = [p.name for p in parent.iterdir() if p.is_dir()] if parent.is_dir() else []
        close = difflib.get_close_matches(path.name, siblings, n=1, cutoff=0.6)
        hint = f"; did you mean {parent / close[0]}?" if close else "; check the path"
        raise ModelLoadError(f"{source}: model directory does not exist{hint}")
    if not path.is_dir():
        raise ModelLoadError(f"{source}: is a file, not a model directory (save_pretrained form)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{source}: holds no config.json; pass a model directory in save_pretrained form")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{source}/config.json: cannot be read as JSON ({e}); copy the model again") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    family_for_config(SimpleNamespace(model_type=model_type), source=f"{source}/config.json")
    weights = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
    if not weights:
        raise ModelLoadError(f"{source}: holds no model weights ({' or '.join(WEIGHT_FILES[::2])}); copy or save "
                             "the complete model into it")  # fmt: skip
    _check_weight_files(source, weights[0])
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"{source}: holds no tokenizer (one of {', '.join(TOKENIZER_FILES[:4])}); save the "
                             "tokenizer into it (tokenizer.save_pretrained or processor.save_pretrained)")  # fmt: skip
    if not any((path / f).is_file() for f in IMAGE_PROCESSOR_FILES):
        raise ModelLoadError(f"{source}: holds no image processor config ({' or '.join(IMAGE_PROCESSOR_FILES)}); "
                             "save the processor into it (processor.save_pretrained)")  # fmt: skip


def _check_weight_files(source: str, first: Path) -> None:
    """Every weight file (an index's shards too) exists, and each safetensors header is whole."""
    files = [first]
    if first.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(first.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{first}: not a readable weight index ({type(e).__name__}: {e}); copy the model "
                                 "again") from None  # fmt: skip
        files = [first.parent / shard for shard in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{source}: weight shard {missing[0]} listed in {first.name} is missing "
                                 f"({len(missing)} of {len(files)} missing); copy the complete model")  # fmt: skip
    from safetensors import SafetensorError, safe_open

    for file in files:
        if file.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{file}: the weights cannot be read ({str(e).splitlines()[0]}): the file is "
                                 "truncated or corrupt; copy or download it again") from None  # fmt: skip


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that exists here: ``cpu``, ``cuda``/``cuda:N`` with CUDA,
    ``mps`` with Metal.

    Raises:
        ModelLoadError: an unknown device, or one this machine does not have (one line).
    """
    text = str(device)
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise ModelLoadError(f"device {text!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ModelLoadError(f"device {text!r}: {why} (torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {text!r}: there are {torch.cuda.device_count()} CUDA devices "
                                 f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")  # fmt: skip
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ModelLoadError(f"device {text!r}: Metal (mps) is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise ModelLoadError(f"device {text!r}: vpstudy runs on cpu, cuda or mps")
    return dev


def load(
    path_or_name: str | Path,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    device_map: str | dict[str, Any] | None = None,
    max_memory: Mapping[int | str, int | str] | None = None,
) -> tuple[Any, Any]:
    """Load a supported VLM and its processor.

    Args:
        path_or_name: a local directory in ``save_pretrained`` form, or a hub id ``org/name``
            (``org/name@revision``), downloaded into the hub cache or, offline
            (``HF_HUB_OFFLINE=1``), read from it.
        dtype: parameter dtype (``torch.float32`` by default; ``"bfloat16"`` etc. accepted).
        device: where to put the model (ignored with ``device_map``).
        attn_implementation: attention backend for the whole model outside vpstudy contexts.
        device_map: transformers' placement (``"auto"``, ``"balanced"``, ``"sequential"``, or a
            module -> device dict), passed to ``from_pretrained(device_map=...)``: a model larger
            than one device is split by layers over the devices (needs accelerate).
        max_memory: with ``device_map``, the devices to use and their budgets (bytes or
            ``"40GiB"``), as ``from_pretrained`` takes them (:func:`vpstudy.devices.rank_max_memory`).

    Returns:
        ``(model, processor)``: the model in eval mode, with ``model.vpstudy_family`` holding its
        :class:`~vpstudy.families.FamilySpec`; the processor is the family's transformers processor
        or a :class:`~vpstudy.processing.FallbackProcessor` with the same call signature.

    Raises:
        ModelLoadError: a missing or incomplete directory (see :func:`check_model_dir`), weights
            that do not load, a tokenizer without the family's image token, a device this machine
            does not have.
        UnsupportedFamilyError: a model type vpstudy has no spec for.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    source = str(path_or_name)
    local = looks_local(source)
    check_model_dir(source)
    revision: str | None = None
    if local:
        source = str(Path(source).expanduser())
    else:
        source, revision = split_hub_id(source)
    hub = {"revision": revision} if revision else {}
    if device_map is None:
        device = resolve_device(device)
    try:
        config = AutoConfig.from_pretrained(source, **hub)
    except (OSError, ValueError) as err:
        where = "" if local else f" (hub id; HF_HUB_OFFLINE={'1' if hub_offline() else 'unset'}, cache {hub_cache()})"
        raise ModelLoadError(f"{source}: cannot read model config{where} ({str(err).splitlines()[0]})") from None
    spec = family_for_config(config, source=f"{source}/config.json" if local else source)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with quiet_transformers():
        try:
            placement = {"device_map": device_map, "max_memory": max_memory} if device_map is not None else {}
            model: Any = AutoModelForImageTextToText.from_pretrained(  # gets vpstudy_* attributes below
                source, dtype=dtype, attn_implementation=attn_implementation, **placement, **hub
            )
        except ImportError as err:  # device_map without accelerate
            raise ModelLoadError(f"{source}: --device-map needs accelerate ({str(err).strip().splitlines()[0]}); "
                                 "pip install accelerate") from None  # fmt: skip
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise ModelLoadError(f"{source}: the weights do not load ({type(err).__name__}: "
                                 f"{str(err).strip().splitlines()[0] if str(err).strip() else err!r}); copy or save "
                                 "the model again") from None  # fmt: skip
        if device_map is None:
            model.to(device)
        model.eval()
        model.vpstudy_family = spec
        model.vpstudy_revision = None if local else hub_snapshot(source, revision)  # the hub snapshot read
        try:
            processor = _load_processor(source, spec, model.config, **hub)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"{source}: the tokenizer or image processor does not load "
                                 f"({str(err).strip().splitlines()[0] if str(err).strip() else err!r}); save the "
                                 "model's processor into it again (processor.save_pretrained)") from None  # fmt: skip
    _check_tokenizer(source, spec, processor)
    return model, processor


def _check_tokenizer(source: str, spec: FamilySpec, processor: Any) -> None:
    """The tokenizer knows the family's image placeholder (an empty or foreign tokenizer does not)."""
    from .processing import tokenizer_of

    tokenizer = tokenizer_of(processor)
    token_id = tokenizer.convert_tokens_to_ids(spec.image_token_text)
    if token_id is None or token_id == tokenizer.unk_token_id or len(tokenizer) < 2:
        raise ModelLoadError(f"{source}: the tokenizer ({len(tokenizer)} tokens) does not know the image token "
                             f"{spec.image_token_text!r} of the {spec.name} family; save the model's own tokenizer "
                             "into the directory")  # fmt: skip


def family_of(model: Any) -> FamilySpec:
    """The family spec of a model (set by :func:`load`, else looked up from its config)."""
    spec = getattr(model, "vpstudy_family", None)
    return spec if spec is not None else family_for_config(model.config, source=type(model).__name__)
