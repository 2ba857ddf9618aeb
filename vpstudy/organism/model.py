"""The organism's architecture: a tiny VLM of a real transformers family, built from config.

Two families are supported (:data:`ORGANISM_FAMILIES`):

- ``llava``: CLIP vision tower (width 64, 2 layers, 8-px patches on 64×64 images → 64 visual
  tokens after dropping CLS) + Llama text model;
- ``qwen2_vl``: Qwen2-VL vision tower (width 64, 2 layers, 8-px patches, 2-D RoPE inside the
  tower) + Qwen2 text model with M-RoPE. ``spatial_merge_size`` is 1, not the released models' 2:
  the same 64 visual tokens from 4-px patches merged 2×2 took about 1.5× the CPU time per
  training step (a 256-patch vision tower), which the 60-minute training budget cannot spare.

In both, each 16-px grid cell covers 2×2 visual tokens, and visual tokens are in row-major order
over an 8×8 token grid (:func:`vpstudy.organism.tasks.token_cells_to_visual`).

The tokenizer is word-level over the task vocabulary (:func:`vpstudy.organism.tasks.vocabulary`)
with a chat template that puts a short fixed preamble before the image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ..errors import VpstudyError
from ..families import FamilySpec, get_family, mrope_section
from ..processing import FallbackProcessor
from ..testing import chat_template, make_tokenizer, text_config
from .tasks import IMAGE_PX, vocabulary

ORGANISM_FAMILIES = ("llava", "qwen2_vl")
# the module whose output holds one feature per visual token (in the text model's width), in
# row-major order over the 8×8 token grid: what the training-only patch probe reads
VISUAL_FEATURES = {"llava": "model.multi_modal_projector", "qwen2_vl": "model.visual.merger"}
PREAMBLE = "you see a grid of objects"


class OrganismError(VpstudyError):
    """Bad organism settings or output directory (one-line message)."""


def check_family(family: str) -> None:
    """Raise :class:`OrganismError` unless there is an organism architecture for ``family``."""
    if family not in ORGANISM_FAMILIES:
        raise OrganismError(f"no organism for family {family!r}; choose one of {', '.join(ORGANISM_FAMILIES)}")


# text layers of each shipped organism: the LLaVA one needs 6 to localise (4 layers: 0.55 at its
# best layer, against the 0.70 target; see data/README.md), the Qwen2-VL one localises with 4
TEXT_LAYERS: dict[str, int] = {"llava": 6, "qwen2_vl": 4}


@dataclass(frozen=True)
class Architecture:
    """Sizes of an organism. Text: Llama (llava) or Qwen2 with M-RoPE (qwen2_vl)."""

    text_hidden: int = 128
    text_layers: int = 4
    text_intermediate: int = 384
    heads: int = 4
    kv_heads: int = 2
    vision_hidden: int = 64
    vision_layers: int = 2
    patch: int = 8  # pixels per visual token side: 8 gives 64 visual tokens, 4 gives 256

    @property
    def tokens_per_side(self) -> int:
        """Visual tokens per image side (the token grid is this squared, row-major)."""
        return IMAGE_PX // self.patch


def default_architecture(family: str, **overrides: Any) -> Architecture:
    """The shipped organism's architecture of ``family`` (:data:`TEXT_LAYERS`), with overrides."""
    return replace(Architecture(text_layers=TEXT_LAYERS.get(family, Architecture.text_layers)), **overrides)


@dataclass
class Parts:
    """What an organism is built from: config, tokenizer, image processor and the processor
    :func:`vpstudy.load` will return for it (``save_processor`` is saved too where it exists)."""

    config: Any
    tokenizer: Any
    image_processor: Any
    processor: Any
    save_processor: Callable[[], Any] | None


def _tokenizer(family: str, task: str) -> Any:
    tokenizer = make_tokenizer(get_family(family), vocabulary(task))
    tokenizer.chat_template = chat_template(get_family(family).image_prompt, PREAMBLE)
    return tokenizer


def _text(tokenizer: Any, arch: Architecture, **extra: Any) -> dict[str, Any]:
    return text_config(
        len(tokenizer),
        extra,
        hidden_size=arch.text_hidden,
        intermediate_size=arch.text_intermediate,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads,
        max_position_embeddings=512,
    )


def build_parts(family: str, arch: Architecture | None = None, task: str = "v1") -> Parts:
    """Config, tokenizer and processors of an untrained organism of ``family`` for the task
    version ``task`` (its vocabulary; :data:`vpstudy.organism.tasks.TASKS`)."""
    arch = arch or default_architecture(family)
    check_family(family)
    tokenizer = _tokenizer(family, task)
    spec = get_family(family)
    if family == "llava":
        return _llava_parts(tokenizer, arch)
    return _qwen2_vl_parts(tokenizer, arch, spec)


def _llava_parts(tokenizer: Any, arch: Architecture) -> Parts:
    """The LLaVA organism's parts: CLIP tower + Llama, the LLaVA processor."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor

    patch = arch.patch
    vision = CLIPVisionConfig(
        hidden_size=arch.vision_hidden,
        intermediate_size=2 * arch.vision_hidden,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=4,
        image_size=IMAGE_PX,
        patch_size=patch,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**_text(tokenizer, arch)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),  # read back as config.image_token_id
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,  # the default -2 would skip one of only two CLIP layers
        image_seq_length=(IMAGE_PX // patch) ** 2,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_PX}, crop_size={"height": IMAGE_PX, "width": IMAGE_PX}
    )

    def save_processor() -> Any:
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=tokenizer.chat_template,
        )

    return Parts(config, tokenizer, image_processor, save_processor(), save_processor)


def _qwen2_vl_parts(tokenizer: Any, arch: Architecture, spec: FamilySpec) -> Parts:
    """The Qwen2-VL organism's parts: Qwen2-VL tower (merge size 1) + Qwen2 with M-RoPE, vpstudy's
    fallback processor."""
    from transformers import Qwen2VLConfig, Qwen2VLImageProcessorPil

    section = mrope_section(arch.text_hidden // arch.heads)
    rope = {"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0}
    config = Qwen2VLConfig(
        text_config=_text(tokenizer, arch, rope_parameters=rope),
        vision_config=dict(
            depth=arch.vision_layers,
            embed_dim=arch.vision_hidden,
            hidden_size=arch.text_hidden,
            num_heads=4,
            mlp_ratio=2,
            patch_size=arch.patch,
            spatial_merge_size=1,
            temporal_patch_size=2,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=IMAGE_PX * IMAGE_PX, max_pixels=IMAGE_PX * IMAGE_PX, patch_size=arch.patch, merge_size=1
    )
    processor = FallbackProcessor(spec, tokenizer, image_processor, config)
    return Parts(config, tokenizer, image_processor, processor, None)
