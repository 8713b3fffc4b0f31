"""Helpers for the tests: tiny RALD configs with distinct odd sizes."""

import torch

from rald_hf import LabelSpace, RALDConfig

# Odd, distinct sizes expose swapped dimensions: width 30 over 3 heads, images of 35 pixels, batches of 7.
TINY = dict(
    backbone="test_efficientnet",
    hidden_size=30,
    num_attention_heads=3,
    mlp_ratio=1.5,
    image_size=35,
    num_neighbors=3,
)
BATCH_SIZE = 7


def tiny_config(space: LabelSpace | str = "fg-emotions", **overrides) -> RALDConfig:
    """Build a small RALD config over a label space or preset name."""
    if isinstance(space, str):
        space = LabelSpace.from_preset(space)
    return RALDConfig.from_label_space(space, **{**TINY, **overrides})


def tiny_images(batch_size: int = BATCH_SIZE, size: int = 35, seed: int = 0) -> torch.Tensor:
    """Random images of shape (batch_size, 3, size, size)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, size, size, generator=generator)
