"""Turning (question, image) pairs into model inputs, for every family.

transformers' own processors for Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision and InternVL
import torchvision through their video processors, which cannot be installed on CPU machines
here. :class:`FallbackProcessor` builds the same inputs from the tokenizer and the image
processor alone: it runs the image processor, expands each image prompt to as many placeholder
tokens as the family's counting rule gives (see :mod:`vpstudy.families`), tokenizes with left
padding and adds ``mm_token_type_ids`` where the family needs it.

:func:`prepare_batch` is the one entry point the recorder and CLI use, whichever processor
:func:`vpstudy.load` returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import BatchFeature

from .errors import VpstudyError
from .families import FamilySpec


class InputError(VpstudyError):
    """A prompt or image that cannot be turned into model inputs (one-line message)."""


class FallbackProcessor:
    """A processor for one family built from its tokenizer and image processor only.

    Called like a transformers processor: ``processor(text=[...], images=[...])`` returns a
    ``BatchFeature`` with ``input_ids`` and ``attention_mask`` ([B, T], left-padded), the image
    processor's tensors, and ``mm_token_type_ids`` ([B, T], 1 at image placeholders) for
    families whose M-RoPE needs it.
    """

    def __init__(self, spec: FamilySpec, tokenizer: Any, image_processor: Any, config: Any) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.tokenizer.padding_side = "left"
        self.chat_template = getattr(tokenizer, "chat_template", None)

    def __repr__(self) -> str:
        return f"FallbackProcessor(family={self.spec.name!r}, image_processor={type(self.image_processor).__name__})"

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        """The tokenizer's chat template applied to ``messages`` (a prompt string, or token ids
        with ``tokenize=True``), as ``tokenizer.apply_chat_template``."""
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        """One string per sequence of token ids, as ``tokenizer.batch_decode``."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        """One sequence of token ids as a string, as ``tokenizer.decode``."""
        return self.tokenizer.decode(*args, **kwargs)

    def __call__(
        self, text: Sequence[str], images: Sequence[Image.Image] | None = None, **_: Any
    ) -> BatchFeature:
        """Tokenize ``text`` with each image placeholder expanded to that image's visual-token count.

        Args:
            text: one prompt per row, holding one image placeholder per image, in order.
            images: the images of all prompts, in placeholder order.

        Returns:
            ``input_ids`` and ``attention_mask`` [B, T] (left-padded), the image processor's
            tensors, and ``mm_token_type_ids`` [B, T] for families that need it.

        Raises:
            InputError: the placeholders and the images do not match one to one.
        """
        images = list(images or [])
        image_inputs = dict(self.image_processor(images=images, return_tensors="pt")) if images else {}
        context = {"config": self.config, "image_processor": self.image_processor}
        placeholder = self.spec.image_token_text
        expanded, image_index = [], 0
        for prompt in text:
            pieces = prompt.split(placeholder)
            out = pieces[0]
            for piece in pieces[1:]:
                if image_index >= len(images):
                    raise InputError(f"prompt has more {placeholder!r} placeholders than images ({len(images)})")
                n = self.spec.count_image_tokens(image_inputs, image_index, context)
                out += placeholder * n + piece
                image_index += 1
            expanded.append(out)
        if image_index != len(images):
            raise InputError(f"{len(images)} images but {image_index} {placeholder!r} placeholders in the prompts")
        encoded = self.tokenizer(expanded, padding=True, return_tensors="pt", add_special_tokens=False)
        model_inputs = {k: v for k, v in image_inputs.items() if k not in self.spec.processor_only_keys}
        features = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], **model_inputs}
        if self.spec.needs_mm_token_type_ids:
            features["mm_token_type_ids"] = self.spec.visual_mask(encoded["input_ids"], self.config).long()
        return BatchFeature(features)


def tokenizer_of(processor: Any) -> Any:
    """The tokenizer behind ``processor`` (a transformers processor or a :class:`FallbackProcessor`)."""
    return getattr(processor, "tokenizer", processor)


def format_prompt(processor: Any, spec: FamilySpec, question: str) -> str:
    """A one-turn chat prompt holding one image and ``question``, ending at the assistant turn.

    Uses the chat template of the processor (or its tokenizer); without one, the family's image
    prompt followed by the question.
    """
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    for owner in (processor, tokenizer_of(processor)):
        if getattr(owner, "chat_template", None):
            return owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{spec.image_prompt}\n{question}"


def prepare_batch(
    processor: Any,
    spec: FamilySpec,
    config: Any,
    prompts: Sequence[str],
    images: Sequence[Image.Image],
    names: Sequence[str] | None = None,
) -> BatchFeature:
    """Model inputs for a batch of one-image prompts, left-padded, with visual positions checked.

    Args:
        processor: what :func:`vpstudy.load` returned (transformers processor or fallback).
        spec: the model's family.
        config: the model config (for placeholder ids).
        prompts: formatted prompts, each holding exactly one image prompt.
        images: one RGB image per prompt.
        names: where each prompt comes from (e.g. ``data.jsonl:line 3``), for error messages
            (default: ``prompt <i>``, its index in the batch).

    Returns:
        A ``BatchFeature`` with ``input_ids`` and ``attention_mask`` of shape [B, T], image
        tensors, and ``mm_token_type_ids`` where the family needs it.

    Raises:
        InputError: a prompt without an image placeholder, or whose placeholder count does not
            match what the image expands to.
    """
    if len(prompts) != len(images):
        raise InputError(f"{len(prompts)} prompts but {len(images)} images")
    for i, prompt in enumerate(prompts):
        where = f"prompt {i}" if names is None else f"{names[i]}: the prompt"
        count = prompt.count(spec.image_token_text)
        if count == 0:
            raise InputError(f"{where} holds no image placeholder {spec.image_token_text!r}: {prompt[:60]!r}")
        if count != 1:
            raise InputError(f"{where} holds {count} image placeholders {spec.image_token_text!r} for its one image"
                             + ("" if names is None else " (the question must not contain it)"))
    tokenizer = tokenizer_of(processor)
    tokenizer.padding_side = "left"
    inputs = processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True)
    inputs = BatchFeature(dict(inputs))
    visual = spec.visual_mask(inputs["input_ids"], config)
    if spec.needs_mm_token_type_ids and "mm_token_type_ids" not in inputs:
        inputs["mm_token_type_ids"] = visual.long()
    if not bool(visual.any(dim=1).all()):
        missing = [i for i, has in enumerate(visual.any(dim=1).tolist()) if not has]
        raise InputError(f"prompts {missing} have no visual tokens after processing")
    return inputs


def visual_positions(input_ids: torch.Tensor, spec: FamilySpec, config: Any) -> list[torch.Tensor]:
    """Per-sample key positions of visual tokens (a list of 1-D long tensors, one per row)."""
    mask = spec.visual_mask(input_ids, config)
    return [row.nonzero().flatten() for row in mask]
