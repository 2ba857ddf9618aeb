"""Tiny random models of every supported family, built from config, for tests and users.

``make_tiny(family, out_dir)`` writes a randomly initialised model (text hidden 64, 2 layers,
4 query / 2 KV heads, so GQA is exercised), a word-level tokenizer with a chat template, and the
family's image processor, all in ``save_pretrained`` form. Nothing is downloaded. The result
loads with :func:`vpstudy.load` and with ``AutoModelForImageTextToText.from_pretrained``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

import torch

from .families import FAMILIES, FamilySpec, get_family
from .loading import quiet_transformers

SPECIAL_TOKENS = [
    "<pad>",
    "<unk>",
    "<s>",
    "</s>",
    "<image>",
    "<video>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "USER:",
    "ASSISTANT:",
]
WORDS = (
    "the a an is are of to in on at and or not what which how many where there this that it "
    "image picture describe object objects colour color shape red green blue yellow black white "
    "square circle triangle left right top bottom middle next above below count yes no "
    "zero one two three four five six seven eight nine ten so then first second answer : , ."
).split()
PAD, UNK, BOS, EOS = 0, 1, 2, 3


def chat_template(image_prompt: str, preamble: str = "") -> str:
    """A chat template the word-level tokenizer can split: BOS, an optional fixed ``preamble``,
    then the turns, with ``image_prompt`` where a message holds ``{"type": "image"}`` and words
    separated by spaces."""
    return CHAT_TEMPLATE.replace("__PREAMBLE__", f"{preamble} " if preamble else "").replace("__IMAGE__", image_prompt)


CHAT_TEMPLATE = (
    "{{ bos_token }}__PREAMBLE__"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }} "
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}__IMAGE__ {% else %}{{ c['text'] }} {% endif %}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def make_tokenizer(spec: FamilySpec, extra_words: list[str] | None = None) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` holding every family's special tokens.

    Args:
        spec: family whose image prompt the chat template inserts.
        extra_words: words appended to the base vocabulary (e.g. a task's vocabulary).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(WORDS + list(extra_words or [])))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.padding_side = "left"
    tokenizer.chat_template = chat_template(spec.image_prompt)
    return tokenizer


# a builder returns the model config, the image processor, and (where the family's full processor
# can be built without torchvision) a factory for it
Built = tuple[Any, Any, Callable[[], Any] | None]


def text_config(vocab_size: int, defaults: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """Text-config fields of a tiny model: the common ones, then a builder's ``defaults``, then
    the caller's ``overrides`` (which win)."""
    config = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    config.update(defaults or {})
    config.update(overrides)
    return config


def _ids(tok: Any, *names: str) -> list[int]:
    return [tok.convert_tokens_to_ids(n) for n in names]


def _llava(tok: Any, text_overrides: dict[str, Any]) -> Built:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig

    (image,) = _ids(tok, "<image>")
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text_config(len(tok), **text_overrides)),
        image_token_index=image,  # read back as config.image_token_id
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=16,
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})

    def full_processor() -> Any:  # LlavaProcessor builds without torchvision: ship it too
        from transformers import LlavaProcessor

        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=tok.chat_template,
        )

    return config, image_processor, full_processor


def _llava_onevision(tok: Any, text_overrides: dict[str, Any]) -> Built:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionImageProcessorPil, Qwen2Config, SiglipVisionConfig

    image, video = _ids(tok, "<image>", "<video>")
    pinpoints = [[56, 56], [56, 112], [112, 56], [112, 112]]
    vision = SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=Qwen2Config(**text_config(len(tok), **text_overrides)),
        image_token_index=image,  # read back as config.image_token_id (and video_token_id)
        video_token_index=video,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaOnevisionImageProcessorPil(size={"height": 56, "width": 56}, image_grid_pinpoints=pinpoints)
    return config, processor, None


class _QwenTokenIds(TypedDict):
    """The special-token ids a Qwen-VL config takes (keyword arguments of its constructor)."""

    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int


def _qwen_ids(tok: Any) -> _QwenTokenIds:
    image, video, start, end = _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    return _QwenTokenIds(
        image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end
    )


def _qwen2_vl(tok: Any, text_overrides: dict[str, Any]) -> Built:
    from transformers import Qwen2VLConfig, Qwen2VLImageProcessorPil

    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    config = Qwen2VLConfig(
        text_config=(text := text_config(len(tok), {"rope_parameters": rope}, **text_overrides)),
        vision_config=dict(
            depth=2,
            embed_dim=64,
            hidden_size=text["hidden_size"],
            num_heads=4,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        **_qwen_ids(tok),
    )
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2)
    return config, processor, None


def _qwen2_5_vl(tok: Any, text_overrides: dict[str, Any]) -> Built:
    from transformers import Qwen2_5_VLConfig, Qwen2VLImageProcessorPil

    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    config = Qwen2_5_VLConfig(
        text_config=(text := text_config(len(tok), {"rope_parameters": rope}, **text_overrides)),
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            out_hidden_size=text["hidden_size"],
            patch_size=14,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        **_qwen_ids(tok),
    )
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2)
    return config, processor, None


def _qwen3_vl(tok: Any, text_overrides: dict[str, Any]) -> Built:
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig

    rope = {"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True, "rope_theta": 10000.0}
    config = Qwen3VLConfig(
        text_config=(text := text_config(len(tok), {"head_dim": 16, "rope_parameters": rope}, **text_overrides)),
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            out_hidden_size=text["hidden_size"],
            patch_size=16,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0],
        ),
        **_qwen_ids(tok),
    )
    processor = Qwen2VLImageProcessorPil(min_pixels=64 * 64, max_pixels=128 * 128, patch_size=16, merge_size=2)
    return config, processor, None


def _internvl(tok: Any, text_overrides: dict[str, Any]) -> Built:
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLVisionConfig, Qwen2Config

    (image,) = _ids(tok, "<IMG_CONTEXT>")
    vision = InternVLVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=[56, 56],
        patch_size=[14, 14],
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=Qwen2Config(**text_config(len(tok), **text_overrides)),
        image_token_id=image,
        image_seq_length=4,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
    )
    processor = GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=False)
    return config, processor, None


BUILDERS: dict[str, Callable[[Any, dict[str, Any]], Built]] = {
    "llava": _llava,
    "llava_onevision": _llava_onevision,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": _qwen3_vl,
    "internvl": _internvl,
}
assert set(BUILDERS) == set(FAMILIES), "every family needs a tiny-model builder"


def make_tiny(
    family: str,
    out_dir: str | Path,
    seed: int = 0,
    *,
    text_overrides: dict[str, Any] | None = None,
    extra_words: list[str] | None = None,
) -> Path:
    """Write a tiny random model of ``family`` to ``out_dir`` in ``save_pretrained`` form.

    Args:
        family: a key of :data:`vpstudy.families.FAMILIES`.
        out_dir: directory to write (created; existing files of the same names are replaced).
        seed: torch seed for the random weights; the same seed gives the same weights.
        text_overrides: text-config fields to change (e.g. ``num_hidden_layers=8`` for benchmarks).
        extra_words: words added to the tokenizer vocabulary.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    from transformers import AutoModelForImageTextToText

    spec = get_family(family)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(spec, extra_words)
    config, image_processor, full_processor = BUILDERS[family](tokenizer, dict(text_overrides or {}))
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa").eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.bos_token_id = BOS
    model.generation_config.eos_token_id = EOS
    with quiet_transformers():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    if full_processor is not None:
        full_processor().save_pretrained(out)
    (out / "vpstudy_tiny.json").write_text(json.dumps({"family": family, "seed": seed}) + "\n")
    return out


def make_tiny_dataset(out_dir: str | Path, n: int = 8, seed: int = 0, *, size: tuple[int, int] = (84, 84)) -> Path:
    """Write ``n`` random images and a ``data.jsonl`` in the dataset format vpstudy reads.

    Each image is a dark canvas with one coloured square; the question asks for its colour and
    the reference answer is the colour word. Image sizes vary slightly per example so that
    families with dynamic resolution give ragged visual-token counts in a batch.

    Returns:
        the path of ``data.jsonl``.
    """
    import numpy as np
    from PIL import Image

    colours = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        h, w = size[0] + 8 * int(rng.integers(0, 3)), size[1] + 8 * int(rng.integers(0, 3))
        pixels = np.full((h, w, 3), 20, dtype=np.uint8)
        name = list(colours)[int(rng.integers(len(colours)))]
        y, x = int(rng.integers(0, h - 24)), int(rng.integers(0, w - 24))
        pixels[y : y + 24, x : x + 24] = colours[name]
        Image.fromarray(pixels).save(out / "images" / f"{i:04d}.png")
        record = {
            "id": f"tiny-{i:04d}",
            "image": f"images/{i:04d}.png",
            "question": "what colour is the square",
            "answer": name,
        }
        lines.append(json.dumps(record))
    path = out / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
