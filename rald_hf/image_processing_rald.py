"""Image processor for RALD: any image in, normalised ``pixel_values`` at the model's training size out.

This file is copied into every saved checkpoint for ``trust_remote_code`` loading, so it imports only
torch, timm, transformers, numpy and Pillow.
"""

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import timm.data
import torch
from PIL import Image, ImageOps
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

__all__ = ["RALDImageProcessor", "to_rgb_image"]

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb_image(image: Any, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert an image of any common kind to an upright 8-bit RGB PIL image.

    Handles PIL images in every mode (grayscale, palette, 16-bit, CMYK, with or without transparency),
    NumPy arrays and tensors in HWC or CHW layout (uint8, uint16, or floats in [0, 1]), and the EXIF
    orientation tag of photos. Transparent pixels are composited onto ``background``.

    Raises:
        ValueError: For arrays of an unsupported shape or dtype.
        TypeError: For objects that are not images.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    if isinstance(image, str | os.PathLike):
        raise TypeError(
            f"Expected a PIL image, NumPy array or tensor, got the path {str(image)!r}; "
            "open it with PIL.Image.open first"
        )
    if not isinstance(image, Image.Image):
        raise TypeError(f"Expected a PIL image, NumPy array or tensor, got {type(image).__name__}")

    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        # Scale 16-bit values to 8 bits; a plain convert("L") would clip everything above 255 to white.
        values = np.asarray(image, dtype=np.float64)
        maximum = 65535.0 if values.max() > 255 else 255.0
        image = Image.fromarray(np.round(values * (255.0 / maximum)).clip(0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.max() <= 1.0 else 1.0
        image = Image.fromarray(np.round(values * scale).clip(0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        image = Image.alpha_composite(canvas, rgba)
    return image.convert("RGB")


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"Expected an image array of shape (H, W), (H, W, C) or (C, H, W), got {array.shape}")
    if array.dtype == np.uint16:
        array = np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if array.size and (array.min() < 0 or array.max() > 1):
            raise ValueError("Float image arrays must hold values in [0, 1]; pass uint8 arrays for 0-255 values")
        array = np.round(array * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"Unsupported image array dtype {array.dtype}; use uint8, uint16 or float in [0, 1]")
    return Image.fromarray(array)


class RALDImageProcessor(BaseImageProcessor):
    """Resize, crop and normalise images as the model saw them in evaluation during training.

    Every image goes through `to_rgb_image`, then through timm's evaluation transform: resize to
    ``image_size / crop_pct``, centre-crop to ``image_size``, scale to [0, 1] and normalise with the
    backbone's mean and standard deviation.

    Args:
        image_size: Side of the square model input in pixels, the size the model was trained at.
        image_mean: Per-channel mean of the backbone's pretraining data.
        image_std: Per-channel standard deviation of the backbone's pretraining data.
        interpolation: Resampling filter name, as timm spells it (``"bicubic"``, ``"bilinear"``).
        crop_pct: Fraction of the resized image kept by the centre crop; 1.0 keeps the whole face.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int = 112,
        image_mean: tuple[float, ...] | list[float] = timm.data.IMAGENET_DEFAULT_MEAN,
        image_std: tuple[float, ...] | list[float] = timm.data.IMAGENET_DEFAULT_STD,
        interpolation: str = "bicubic",
        crop_pct: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values, got {image_mean} and {image_std}")
        self.image_size = image_size
        self.image_mean = [float(value) for value in image_mean]
        self.image_std = [float(value) for value in image_std]
        self.interpolation = interpolation
        self.crop_pct = float(crop_pct)

    @classmethod
    def from_backbone(cls, backbone: torch.nn.Module, image_size: int, **kwargs: Any) -> "RALDImageProcessor":
        """Build a processor with the mean, standard deviation and interpolation of a timm backbone."""
        data_config = timm.data.resolve_data_config({}, model=backbone)
        return cls(
            image_size=image_size,
            image_mean=data_config["mean"],
            image_std=data_config["std"],
            interpolation=data_config.get("interpolation", "bicubic"),
            **kwargs,
        )

    @property
    def transform(self) -> Any:
        """The timm evaluation transform for these settings, built on first use."""
        settings = (self.image_size, tuple(self.image_mean), tuple(self.image_std), self.interpolation, self.crop_pct)
        cached = self.__dict__.get("_transform")
        if cached is None or cached[0] != settings:
            transform = timm.data.create_transform(
                input_size=(3, self.image_size, self.image_size),
                is_training=False,
                interpolation=self.interpolation,
                mean=self.image_mean,
                std=self.image_std,
                crop_pct=self.crop_pct,
            )
            self.__dict__["_transform"] = cached = (settings, transform)
        return cached[1]

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output.pop("_transform", None)
        return output

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        """Turn one image or a list of images into ``pixel_values`` of shape (N, 3, image_size, image_size).

        Args:
            images: A PIL image, NumPy array or tensor, or a list or other iterable of them.
            return_tensors: Only ``"pt"`` (PyTorch) is supported.
        """
        if return_tensors not in ("pt", None):
            raise ValueError(f"RALDImageProcessor returns PyTorch tensors only; got return_tensors={return_tensors!r}")
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            images = list(images)
        elif isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif isinstance(images, Image.Image | np.ndarray | torch.Tensor | str | bytes):
            images = [images]
        elif isinstance(images, Iterable):
            images = list(images)  # for example a column of a `datasets` split, or a generator
        else:
            images = [images]
        if not images:
            raise ValueError("No images to process")
        pixel_values = torch.stack([self.transform(to_rgb_image(image)) for image in images])
        return BatchFeature({"pixel_values": pixel_values}, tensor_type="pt")
