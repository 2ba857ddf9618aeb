"""Model families as data.

Each supported vision-language family is one :class:`FamilySpec`: where its text decoder layers
live, which config fields hold the image/video placeholder token ids, how its rotary positions
work, how many placeholder tokens one image expands to, and how a prompt marks an image. Code
elsewhere reads these fields; it never branches on a family name.

Adding a family means adding one entry to :data:`FAMILIES` (and, if its placeholder count
follows a new rule, one function to :data:`TOKEN_COUNTERS`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from .errors import VpstudyError

RopeKind = Literal["rope", "mrope", "mrope_interleaved"]


class UnsupportedFamilyError(VpstudyError):
    """The model's ``config.model_type`` is not one vpstudy has a spec for."""


@dataclass(frozen=True)
class FamilySpec:
    """How one transformers VLM family is laid out.

    Attributes:
        name: short family name used on the command line and in run manifests.
        model_types: ``config.model_type`` values of this family.
        model_class: transformers class name of the generation model.
        text_layers: dotted attribute path from the generation model to the text decoder's
            ``nn.ModuleList`` of layers.
        placeholder_token_fields: config fields holding the ids of visual placeholder tokens
            (image, and video where the family has one). Key positions holding these ids are
            the visual positions.
        rope: rotary position kind of the text model (1-D RoPE or multimodal M-RoPE).
        needs_mm_token_type_ids: the model derives M-RoPE positions from ``mm_token_type_ids``;
            inputs built without the family processor must carry it (see environment notes).
        image_prompt: what a prompt holds where one image goes, before placeholder expansion.
        image_token_text: the placeholder token (as text) that is repeated once per visual token.
        token_counter: key into :data:`TOKEN_COUNTERS`, the rule giving the number of visual
            tokens one processed image expands to.
        processor_only_keys: image-processor outputs the family's processor consumes itself
            (they are not model inputs).
    """

    name: str
    model_types: tuple[str, ...]
    model_class: str
    text_layers: str
    placeholder_token_fields: tuple[str, ...]
    rope: RopeKind
    needs_mm_token_type_ids: bool
    image_prompt: str
    image_token_text: str
    token_counter: str
    processor_only_keys: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def text_layer_modules(self, model: nn.Module) -> nn.ModuleList:
        """The text decoder layers of ``model`` (an ``nn.ModuleList``)."""
        obj: Any = model
        for part in self.text_layers.split("."):
            obj = getattr(obj, part)
        return obj

    def placeholder_ids(self, config: Any) -> list[int]:
        """Token ids that mark visual key positions for a model with this ``config``."""
        ids = []
        for name in self.placeholder_token_fields:
            value = getattr(config, name, None)
            if value is not None:
                ids.append(int(value))
        return ids

    def visual_mask(self, input_ids: torch.Tensor, config: Any) -> torch.Tensor:
        """Boolean mask of visual positions, same shape as ``input_ids`` ([B, T])."""
        ids = torch.tensor(self.placeholder_ids(config), device=input_ids.device)
        return torch.isin(input_ids, ids)

    def visual_positions(self, input_ids: torch.Tensor, config: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where each row's visual tokens are, left-aligned and padded with position 0.

        Returns:
            ``(index, valid, counts)``: index [B, N] long key positions, valid [B, N] bool (which
            entries are real), counts [B] long; N is the largest count (0 if no row has any).
        """
        visual = self.visual_mask(input_ids, config)
        counts = visual.sum(dim=1)
        n_max = int(counts.max()) if counts.numel() else 0
        order = torch.argsort((~visual).to(torch.int8), dim=1, stable=True)[:, :n_max]
        valid = torch.arange(n_max, device=input_ids.device).unsqueeze(0) < counts.unsqueeze(1)
        return torch.where(valid, order, torch.zeros_like(order)), valid, counts

    def count_image_tokens(self, image_inputs: Mapping[str, Any], index: int, context: Mapping[str, Any]) -> int:
        """Number of placeholder tokens image ``index`` of a processed batch expands to."""
        return TOKEN_COUNTERS[self.token_counter](image_inputs, index, context)

    def vision_layout(self, model: nn.Module) -> VisionLayout:
        """Where encoder-side pruning reads this family's vision encoder (:class:`VisionLayout`).

        Raises:
            UnsupportedFamilyError: the family has no layout yet (LLaVA-OneVision's any-resolution
                crops and InternVL's pixel shuffle map patches to tokens in ways not written here).
        """
        builder = VISION_LAYOUTS.get(self.name)
        if builder is None:
            raise UnsupportedFamilyError(
                f"encoder-side pruning does not support family {self.name!r} yet "
                f"(supported: {', '.join(VISION_LAYOUTS)})"
            )
        return builder(model)

    def grid_shape(self, image_inputs: Mapping[str, Any], index: int, context: Mapping[str, Any]) -> list[int]:
        """Layout of the image's visual tokens (``[t, h, w]`` or ``[h, w]``), for figures.

        ``context`` holds ``config`` and ``image_processor`` and may hold ``n_visual``.
        """
        return GRID_SHAPES[self.token_counter](image_inputs, index, context)


# --- placeholder-count rules -------------------------------------------------------------------
# Each rule sees the image processor's output for a batch, the image's index in it, and a context
# (the model config and the image processor) and returns the number of visual tokens.


def _fixed_sequence(image_inputs: Mapping[str, Any], index: int, context: Mapping[str, Any]) -> int:
    """LLaVA-1.5: every image gives ``config.image_seq_length`` tokens."""
    return int(context["config"].image_seq_length)


def _fixed_grid(image_inputs: Mapping[str, Any], index: int, context: Mapping[str, Any]) -> list[int]:
    n = _fixed_sequence(image_inputs, index, context)
    side = math.isqrt(n)
    return [side, side] if side * side == n else [n]


def _qwen_merged_grid(image_inputs: Mapping[str, Any], index: int, context: Mapping[str, Any]) -> list[int]:
    t, h, w = (int(v) for v in image_inputs["image_grid_thw"][index])
    merge = int(context["image_processor"].merge_size)
    return [t, h // merge, w // merge]


def _qwen_tokens(image_inputs: Mapping[str, Any], index: int, context: Mapping[str, Any]) -> int:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: prod(grid_thw) / merge_size²."""
    return math.prod(_qwen_merged_grid(image_inputs, index, context))


def _internvl_tokens(image_inputs: Mapping[str, Any], index: int, context: Mapping[str, Any]) -> int:
    """InternVL: ``image_seq_length`` tokens per crop (one crop unless ``crop_to_patches``)."""
    config = context["config"]
    per_crop = int(config.image_seq_length)
    patches = image_inputs.get("num_patches")
    n_crops = int(patches[index]) if patches is not None else 1
    return per_crop * n_crops


def _internvl_grid(image_inputs: Mapping[str, Any], index: int, context: Mapping[str, Any]) -> list[int]:
    """``[crops, side, side]``; the crop count comes from ``context["n_visual"]`` when known
    (model inputs no longer carry ``num_patches``)."""
    per_crop = int(context["config"].image_seq_length)
    side = math.isqrt(per_crop)
    n_visual = context.get("n_visual") or _internvl_tokens(image_inputs, index, context)
    return [int(n_visual) // per_crop, side, side]


def _onevision_tokens(image_inputs: Mapping[str, Any], index: int, context: Mapping[str, Any]) -> int:
    """LLaVA-OneVision AnyRes: base grid + unpadded high-res grid + row newlines.

    Uses transformers' own ``LlavaOnevisionProcessor._get_number_of_features`` on an instance
    built without ``__init__`` (the processor itself cannot be constructed without torchvision),
    so the count follows the library exactly.
    """
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    config = context["config"]
    vision = config.vision_config
    counter = object.__new__(LlavaOnevisionProcessor)
    counter.image_processor = context["image_processor"]
    counter.num_image_tokens = (vision.image_size // vision.patch_size) ** 2
    counter.vision_aspect_ratio = getattr(config, "vision_aspect_ratio", "anyres_max_9")
    orig_h, orig_w = (int(v) for v in image_inputs["image_sizes"][index])
    height, width = image_inputs["pixel_values"][index].shape[-2:]
    n = counter._get_number_of_features(orig_h, orig_w, int(height), int(width))
    if config.vision_feature_select_strategy == "default":
        n -= 1
    return int(n)


def _onevision_grid(image_inputs: Mapping[str, Any], index: int, context: Mapping[str, Any]) -> list[int]:
    return [_onevision_tokens(image_inputs, index, context)]


TOKEN_COUNTERS: dict[str, Callable[[Mapping[str, Any], int, Mapping[str, Any]], int]] = {
    "fixed_sequence": _fixed_sequence,
    "qwen_grid": _qwen_tokens,
    "internvl_crops": _internvl_tokens,
    "onevision_anyres": _onevision_tokens,
}
GRID_SHAPES: dict[str, Callable[[Mapping[str, Any], int, Mapping[str, Any]], list[int]]] = {
    "fixed_sequence": _fixed_grid,
    "qwen_grid": _qwen_merged_grid,
    "internvl_crops": _internvl_grid,
    "onevision_anyres": _onevision_grid,
}

_QWEN2_VL = FamilySpec(
    name="qwen2_vl",
    model_types=("qwen2_vl",),
    model_class="Qwen2VLForConditionalGeneration",
    text_layers="model.language_model.layers",
    placeholder_token_fields=("image_token_id", "video_token_id"),
    rope="mrope",
    needs_mm_token_type_ids=True,
    image_prompt="<|vision_start|><|image_pad|><|vision_end|>",
    image_token_text="<|image_pad|>",
    token_counter="qwen_grid",
)

FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            name="llava",
            model_types=("llava",),
            model_class="LlavaForConditionalGeneration",
            text_layers="model.language_model.layers",
            placeholder_token_fields=("image_token_id",),
            rope="rope",
            needs_mm_token_type_ids=False,
            image_prompt="<image>",
            image_token_text="<image>",
            token_counter="fixed_sequence",
        ),
        FamilySpec(
            name="llava_onevision",
            model_types=("llava_onevision",),
            model_class="LlavaOnevisionForConditionalGeneration",
            text_layers="model.language_model.layers",
            placeholder_token_fields=("image_token_id", "video_token_id"),
            rope="rope",
            needs_mm_token_type_ids=False,
            image_prompt="<image>",
            image_token_text="<image>",
            token_counter="onevision_anyres",
        ),
        _QWEN2_VL,
        replace(
            _QWEN2_VL, name="qwen2_5_vl", model_types=("qwen2_5_vl",), model_class="Qwen2_5_VLForConditionalGeneration"
        ),
        replace(
            _QWEN2_VL,
            name="qwen3_vl",
            model_types=("qwen3_vl",),
            model_class="Qwen3VLForConditionalGeneration",
            rope="mrope_interleaved",
            extra={"deepstack": True},
        ),
        FamilySpec(
            name="internvl",
            model_types=("internvl",),
            model_class="InternVLForConditionalGeneration",
            text_layers="model.language_model.layers",
            placeholder_token_fields=("image_token_id",),
            rope="rope",
            needs_mm_token_type_ids=False,
            image_prompt="<img><IMG_CONTEXT></img>",
            image_token_text="<IMG_CONTEXT>",
            token_counter="internvl_crops",
            processor_only_keys=("num_patches",),
        ),
    )
}


def family_for_config(config: Any, source: str = "config.json") -> FamilySpec:
    """The spec whose ``model_types`` contains ``config.model_type``.

    Raises:
        UnsupportedFamilyError: one line naming the model type, the source and the supported ones.
    """
    model_type = getattr(config, "model_type", None)
    for spec in FAMILIES.values():
        if model_type in spec.model_types:
            return spec
    supported = ", ".join(t for s in FAMILIES.values() for t in s.model_types)
    raise UnsupportedFamilyError(
        f"{source}: model_type {model_type!r} is not a supported family (supported: {supported})"
    )


def get_family(name: str) -> FamilySpec:
    """The spec called ``name`` (as in :data:`FAMILIES`), with a one-line error otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedFamilyError(f"unknown family {name!r} (supported: {', '.join(FAMILIES)})") from None


@dataclass(frozen=True)
class TextGeometry:
    """Attention geometry of a text decoder: query heads, KV heads (GQA) and head size."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> TextGeometry:
        """The geometry of a transformers config (of its text config, for a composite VLM config)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = int(text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(
            num_layers=int(text.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
        )


def mrope_section(head_dim: int) -> list[int]:
    """An M-RoPE split (temporal, height, width) of ``head_dim / 2`` rotary pairs in Qwen2-VL's
    proportions (16, 24, 24 of 64): a quarter temporal, the rest halved between height and width."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


# --- what encoder-side pruning reads (vpstudy.pruning.encoder) ----------------------------------


@dataclass
class VisionLayout:
    """Where a family keeps what the encoder stage reads, and how patches map to LM tokens.

    Attributes:
        attention_module: the attention module of the vision layer whose output becomes the
            features.
        features_module: the module whose output is the features the language model receives.
        has_cls: the encoder prepends a [CLS] token that the features drop.
        merge: patches per language-model token (consecutive in the encoder's order).
        cls_dropped: the features drop the [CLS] token (LLaVA's ``"default"`` strategy).
    """

    attention_module: Any
    features_module: Any
    has_cls: bool
    merge: int
    cls_dropped: bool
    packed: bool  # features are [ΣN, D] (Qwen) rather than [n_images, N, D]

    def drop_cls(self, patches: torch.Tensor) -> torch.Tensor:
        """One image's patch-level values [P, ...] without the [CLS] entry when the features drop it."""
        return patches[1:] if self.has_cls and self.cls_dropped else patches

    def patches_to_tokens(self, values: torch.Tensor, n: int, reduce: str) -> torch.Tensor | None:
        """One image's patch-level values [P, ...] as [n, ...] per language-model token: each token's
        ``merge`` consecutive patches summed (``reduce="sum"``) or averaged (any other ``reduce``).
        None when the patches (after :meth:`drop_cls`) are not ``n * merge``."""
        values = self.drop_cls(values)
        if values.shape[0] != n * self.merge:
            return None
        grouped = values.reshape(n, self.merge, *values.shape[1:])
        return grouped.sum(1) if reduce == "sum" else grouped.mean(1)

    def project(self, module: Any, patches: torch.Tensor) -> torch.Tensor:
        """One image's patches [P, D_vision] passed through ``module`` (the features module) in its
        dtype: [P / merge, D_text] rows."""
        dtype = next(module.parameters()).dtype
        out = module(patches.to(dtype).unsqueeze(0) if not self.packed else patches.to(dtype))
        out = out[0] if isinstance(out, tuple) else out
        return out.reshape(-1, out.shape[-1])

    def split_features(self, output: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        """The features module's ``output`` as one [N_i, D] tensor per image (``counts``: each
        image's N_i, used to split the packed [ΣN, D] form)."""
        if self.packed:
            return list(torch.split(output, [int(c) for c in counts]))
        return list(output)

    def join_features(self, output: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """Per-image ``features`` back in the form and dtype of the features module's ``output``:
        [ΣN, D] when packed, else [n_images, N, D]."""
        if self.packed:
            return torch.cat(features).to(output.dtype)
        return torch.stack(features).to(output.dtype)

    def grid(self, n: int) -> tuple[int, int] | None:
        """(rows, columns) of an image's ``n`` tokens when they form a square, else None."""
        side = int(round(n**0.5))
        return (side, side) if side * side == n else None


def _path(model: Any, dotted: str) -> Any:
    obj = model
    for part in dotted.split("."):
        obj = obj[int(part)] if part.lstrip("-").isdigit() else getattr(obj, part)
    return obj


def _llava_layout(model: Any) -> VisionLayout:
    config = model.config
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise UnsupportedFamilyError("encoder-side pruning: several vision feature layers are not supported")
    layers = model.model.vision_tower.encoder.layers
    index = layer if layer < 0 else layer - 1  # hidden_states[k] is the output of layer k - 1
    return VisionLayout(
        attention_module=layers[index].self_attn,
        features_module=model.model.multi_modal_projector,
        has_cls=True,
        merge=1,
        cls_dropped=config.vision_feature_select_strategy == "default",
        packed=False,
    )


def _qwen_layout(model: Any) -> VisionLayout:
    visual = model.model.visual
    return VisionLayout(
        attention_module=visual.blocks[-1].attn,
        features_module=visual.merger,
        has_cls=False,
        merge=int(visual.spatial_merge_size) ** 2,
        cls_dropped=False,
        packed=True,
    )


VISION_LAYOUTS: dict[str, Callable[[Any], VisionLayout]] = {
    "llava": _llava_layout,
    "qwen2_vl": _qwen_layout,
    "qwen2_5_vl": _qwen_layout,
    "qwen3_vl": _qwen_layout,
}

ENCODER_FAMILIES: tuple[str, ...] = tuple(VISION_LAYOUTS)
"""The families encoder-side pruning supports (those with a :class:`VisionLayout`)."""
