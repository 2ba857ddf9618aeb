"""The benchmark model and its inputs: a random Qwen3-VL text decoder of the protocol's geometry
built on the device, a prompt of text around one run of N_v image placeholders with the model's
own M-RoPE positions, and the static KV cache it decodes on."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from vpstudy.bench.recording import image_grid

from .protocol import QWEN_TEXT_IDS, QWEN_VISION_IDS, BenchError, ModelGeometry, Protocol


def vision_ids(vocab: int) -> dict[str, int]:
    """Qwen3-VL's vision token ids where the vocabulary holds them, else its top four ids."""
    if vocab > max(QWEN_VISION_IDS.values()):
        return dict(QWEN_VISION_IDS)
    return {name: vocab - 4 + i for i, name in enumerate(QWEN_VISION_IDS)}


def text_id_limit(vocab: int) -> int:
    """Random text ids are drawn from ``[0, limit)``: below Qwen's special tokens and the vision ids."""
    return min(QWEN_TEXT_IDS, min(vision_ids(vocab).values()))


def model_config(geometry: ModelGeometry) -> Any:
    """A ``Qwen3VLConfig`` with ``geometry`` as its text model (tied embeddings, interleaved
    M-RoPE) and a tiny vision tower (never run; its merger outputs the text width)."""
    from transformers import Qwen3VLConfig

    rope = {"rope_type": "default", "mrope_section": geometry.mrope_section, "mrope_interleaved": True,
            "rope_theta": 5_000_000.0}  # fmt: skip
    text = dict(
        hidden_size=geometry.hidden, intermediate_size=geometry.intermediate, num_hidden_layers=geometry.layers,
        num_attention_heads=geometry.heads, num_key_value_heads=geometry.kv_heads, head_dim=geometry.head_dim,
        vocab_size=geometry.vocab, rope_parameters=rope, max_position_embeddings=262_144, rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )  # fmt: skip
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=geometry.hidden,
                  patch_size=16, spatial_merge_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])  # fmt: skip
    ids = vision_ids(geometry.vocab)
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                         image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
                         vision_start_token_id=ids["vision_start_token_id"],
                         vision_end_token_id=ids["vision_end_token_id"])  # fmt: skip


def build_model(protocol: Protocol) -> Any:
    """The random benchmark model, created directly on the device in the protocol's dtype, SDPA, eval mode."""
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(protocol.seed)
    with torch.device(protocol.device):
        config = model_config(protocol.geometry)
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=protocol.torch_dtype,
                                                             attn_implementation="sdpa")  # fmt: skip
    return model.eval()


def text_parameters(model: Any) -> int:
    """Parameters the language model reads per decode step: the text decoder and the LM head (a
    tied head shares the embedding's tensor and is counted once); the vision tower is left out."""
    unique = {id(p): p.numel() for p in [*model.model.language_model.parameters(), *model.lm_head.parameters()]}
    return sum(unique.values())


@dataclass
class Prompt:
    """One context's batch: input ids with a run of N_v image placeholders, and its positions.

    Attributes:
        input_ids: [B, T] long.
        position_ids: [4, B, T] long: the text (cache) position, then the three M-RoPE rows.
        rope_delta: [B, 1] long: M-RoPE position minus text position after the prompt.
        image_grid_thw: [B, 3] long: the (never run) image's patch grid the positions follow.
        n_visual: N_v.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    rope_delta: torch.Tensor
    image_grid_thw: torch.Tensor
    n_visual: int

    @property
    def length(self) -> int:
        """T, the prompt's length in tokens (the cache slot the first decode step writes)."""
        return int(self.input_ids.shape[1])

    def decode_positions(self, steps: int) -> torch.Tensor:
        """[steps, 4, B, 1] position ids of decode steps 0..steps-1 (step s writes cache slot T + s)."""
        batch = self.input_ids.shape[0]
        text = torch.arange(self.length, self.length + steps, device=self.input_ids.device).view(steps, 1, 1)
        text = text.expand(steps, batch, 1)
        mrope = text + self.rope_delta.view(1, batch, 1)
        return torch.stack([text, mrope, mrope, mrope], dim=1)


def build_prompt(model: Any, protocol: Protocol, n_visual: int, *, columns: int | None = None,
                 text_seed: int | None = None) -> Prompt:  # fmt: skip
    """Random text ids around one run of ``n_visual`` image placeholders, with the model's own
    M-RoPE positions (``get_rope_index`` given ``mm_token_type_ids`` and the image grid).

    Args:
        model: the benchmark model (:func:`build_model`); its ``get_rope_index`` gives the positions.
        protocol: batch, text tokens, seed, vocabulary and device of the prompt.
        n_visual: N_v, the number of image placeholder tokens.
        columns: merged-token columns of the image grid (default: the squarest grid). Prompts of
            several sizes with the same columns and ``text_seed`` share their beginning up to
            the end of the smaller image, token ids and positions alike (the grid is read row by row).
        text_seed: seed of the text ids (default: the protocol's seed + ``n_visual``).
    """
    ids = vision_ids(protocol.geometry.vocab)
    before = protocol.text_before
    generator = torch.Generator().manual_seed(protocol.seed + n_visual if text_seed is None else text_seed)
    text = torch.randint(0, text_id_limit(protocol.geometry.vocab), (protocol.batch, protocol.text_tokens),
                         generator=generator)  # fmt: skip
    visual = torch.full((protocol.batch, n_visual), ids["image_token_id"])
    input_ids = torch.cat([text[:, :before], visual, text[:, before:]], dim=1)
    input_ids[:, before - 1] = ids["vision_start_token_id"]
    input_ids[:, before + n_visual] = ids["vision_end_token_id"]
    input_ids = input_ids.to(protocol.device)
    merge = int(model.config.vision_config.spatial_merge_size)
    if columns is not None and (columns < 1 or n_visual % columns):
        raise BenchError(f"an image of {n_visual} visual tokens has no grid of {columns} columns")
    rows, cols = image_grid(n_visual) if columns is None else (n_visual // columns, columns)
    grid = torch.tensor([[1, rows * merge, cols * merge]] * protocol.batch, device=protocol.device)
    extra = {}  # transformers 5.23 places the image by mm_token_type_ids; older releases by <|vision_start|>
    if "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters:
        extra["mm_token_type_ids"] = (input_ids == ids["image_token_id"]).int()
    mrope, delta = model.model.get_rope_index(input_ids, image_grid_thw=grid, **extra)
    length = input_ids.shape[1]
    text_positions = torch.arange(length, device=input_ids.device).expand(1, protocol.batch, length)
    position_ids = torch.cat([text_positions, mrope.to(input_ids.device)], dim=0)
    return Prompt(input_ids, position_ids, delta.to(input_ids.device).view(-1, 1), grid, n_visual)


def static_cache(model: Any, max_len: int) -> Any:
    """A ``transformers.StaticCache`` of ``max_len`` slots per layer (allocated on first use)."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


def rewind(cache: Any, length: int) -> None:
    """Put a filled ``StaticCache`` back to its first ``length`` slots: the slots after them are
    zeroed and the write position set to ``length``, so that the next forward writes slot
    ``length`` (a prefill's cache reused by every method, without re-running or copying it)."""
    for layer in cache.layers:
        layer.keys[:, :, length:].zero_()
        layer.values[:, :, length:].zero_()
        layer.cumulative_length.fill_(length)


def dynamic_copy(model: Any, cache: Any, length: int) -> Any:
    """A ``transformers.DynamicCache`` holding a copy of the first ``length`` slots of a filled
    ``StaticCache``: what a dynamic-cache generation holds after the same prefill."""
    from transformers import DynamicCache

    copy = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        copy.update(layer.keys[:, :, :length], layer.values[:, :, :length], i)  # DynamicLayer concatenates: a copy
    return copy


def copy_prefix(model: Any, source: Any, length: int, max_len: int) -> Any:
    """A new ``StaticCache`` of ``max_len`` slots holding a copy of the first ``length`` slots of
    the filled static cache ``source`` (a prefix several prompts share, prefilled once)."""
    cache = static_cache(model, max_len)
    for mine, theirs in zip(cache.layers, source.layers, strict=True):
        mine.lazy_initialization(theirs.keys[:, :, :0], theirs.values[:, :, :0])
        mine.keys[:, :, :length].copy_(theirs.keys[:, :, :length])
        mine.values[:, :, :length].copy_(theirs.values[:, :, :length])
        mine.cumulative_length.fill_(length)
    return cache

