import io

import numpy as np
import pytest
import torch
from datasets import Dataset
from datasets import Image as DatasetImage
from PIL import Image
from transformers import AutoImageProcessor

from rald_hf import RALDImageProcessor, to_rgb_image


def test_gray_becomes_rgb():
    image = to_rgb_image(Image.new("L", (5, 4), 77))
    assert image.mode == "RGB"
    assert image.size == (5, 4)
    assert image.getpixel((0, 0)) == (77, 77, 77)


def test_sixteen_bit_is_scaled_not_clipped():
    array = np.full((6, 6), 32896, dtype=np.uint16)  # 128 * 257
    image = to_rgb_image(Image.fromarray(array))
    assert image.getpixel((0, 0)) == (128, 128, 128)


def test_sixteen_bit_png_file(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((6, 6), 65535, dtype=np.uint16)).save(path)
    with Image.open(path) as handle:
        assert handle.mode.startswith("I")
        assert to_rgb_image(handle).getpixel((0, 0)) == (255, 255, 255)


def test_transparency_composites_on_white():
    image = to_rgb_image(Image.new("RGBA", (3, 3), (200, 0, 0, 0)))
    assert image.getpixel((1, 1)) == (255, 255, 255)
    half = to_rgb_image(Image.new("RGBA", (3, 3), (0, 0, 0, 128)))
    assert half.getpixel((1, 1)) == (127, 127, 127)


def test_palette_with_transparency():
    palette_image = Image.new("P", (4, 4), 0)
    palette_image.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    palette_image.info["transparency"] = 0
    assert to_rgb_image(palette_image).getpixel((0, 0)) == (255, 255, 255)
    palette_image.info.pop("transparency")
    assert to_rgb_image(palette_image).getpixel((0, 0)) == (10, 20, 30)


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (8, 4), (0, 0, 0))
    image.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=100)
    with Image.open(buffer) as loaded:
        upright = to_rgb_image(loaded)
    assert upright.size == (4, 8)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((9, 7, 3), dtype=np.uint8),
        np.zeros((3, 9, 7), dtype=np.uint8),
        np.zeros((9, 7), dtype=np.float32),
        np.zeros((9, 7, 1), dtype=np.uint16),
    ],
)
def test_arrays_in_common_layouts(array):
    image = to_rgb_image(array)
    assert image.size == (7, 9)
    assert image.mode == "RGB"


def test_tensor_input():
    image = to_rgb_image(torch.ones(3, 5, 6))
    assert image.size == (6, 5)
    assert image.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.zeros((2, 3, 4, 5), dtype=np.uint8), "Expected an image array"),
        (np.full((4, 4), 3.0), r"values in \[0, 1\]"),
        (np.zeros((4, 4), dtype=np.int64), "Unsupported image array dtype int64"),
    ],
)
def test_bad_arrays_raise(value, message):
    with pytest.raises(ValueError, match=message):
        to_rgb_image(value)


def test_non_image_raises():
    with pytest.raises(TypeError, match="got the path 'face.png'; open it with PIL.Image.open"):
        to_rgb_image("face.png")
    with pytest.raises(TypeError, match="got int"):
        to_rgb_image(3)


def test_processor_output_and_normalization():
    processor = RALDImageProcessor(image_size=19, image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25))
    pixel_values = processor([Image.new("L", (40, 30), 255), Image.new("RGB", (8, 8), (0, 0, 0))])["pixel_values"]
    assert pixel_values.shape == (2, 3, 19, 19)
    torch.testing.assert_close(pixel_values[0], torch.full((3, 19, 19), 2.0))
    torch.testing.assert_close(pixel_values[1], torch.full((3, 19, 19), -2.0))


def test_processor_accepts_dataset_column():
    dataset = Dataset.from_dict({"image": [Image.new("L", (9, 9), 255), Image.new("L", (9, 9), 0)]})
    dataset = dataset.cast_column("image", DatasetImage())
    processor = RALDImageProcessor(image_size=11, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    pixel_values = processor(dataset["image"])["pixel_values"]
    assert pixel_values.shape == (2, 3, 11, 11)
    torch.testing.assert_close(pixel_values[0], torch.ones(3, 11, 11))
    torch.testing.assert_close(pixel_values[1], -torch.ones(3, 11, 11))


def test_processor_path_string_raises():
    with pytest.raises(TypeError, match="got the path 'face.png'"):
        RALDImageProcessor(image_size=11)("face.png")


def test_processor_round_trip_and_auto_class(tmp_path):
    processor = RALDImageProcessor(image_size=23, image_mean=(0.1, 0.2, 0.3), image_std=(0.4, 0.5, 0.6), crop_pct=0.9)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "image_processing_rald.py").exists()
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, RALDImageProcessor)
    assert (loaded.image_size, loaded.image_mean, loaded.image_std, loaded.crop_pct) == (
        23,
        [0.1, 0.2, 0.3],
        [0.4, 0.5, 0.6],
        0.9,
    )
    image = Image.new("RGB", (31, 29), (10, 120, 250))
    torch.testing.assert_close(loaded(image)["pixel_values"], processor(image)["pixel_values"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 0}, "image_size must be a positive integer"),
        ({"crop_pct": 1.5}, r"crop_pct must be in \(0, 1\]"),
    ],
)
def test_processor_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RALDImageProcessor(**kwargs)


def test_processor_from_backbone_uses_its_statistics():
    import timm

    backbone = timm.create_model("test_efficientnet", num_classes=0)
    processor = RALDImageProcessor.from_backbone(backbone, image_size=27)
    config = timm.data.resolve_data_config({}, model=backbone)
    assert processor.image_mean == list(config["mean"])
    assert processor.image_std == list(config["std"])
    assert processor.image_size == 27
