"""Helpers for the tests: tiny RALD configs with distinct odd sizes."""

import torch
from torch.utils.data import Dataset

from rald_hf import LabelSpace, RALDConfig

# Odd, distinct sizes expose swapped dimensions: width 30 over 3 heads, images of 35 pixels, batches of 7.
# The attention branches start random rather than at zero, as in a trained model, so that the tests see them act.
TINY = dict(
    zero_init_last=False,
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


class ImageList(Dataset):
    """A fixed list of images and labels, in the item format RALDTrainer and the reference bank expect."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.images[index], "labels": int(self.labels[index])}
