import re
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage

from rald_hf import LabelSpace, RALDImageProcessor
from rald_hf.training import (
    find_columns,
    hold_out_split,
    label_mapping,
    load_image_dataset,
    prepare_splits,
    stratified_subset,
)

CLASSES = ["happy", "sad", "angry"]


def _write_image(path: Path, kind: str, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "gray":
        PILImage.new("L", (20, 24), value).save(path)
    elif kind == "rgba":
        PILImage.new("RGBA", (30, 30), (value, 0, 0, 128)).save(path)
    elif kind == "palette":
        PILImage.new("RGB", (16, 16), (0, value, 0)).convert("P").save(path)
    elif kind == "sixteen":
        PILImage.fromarray(np.full((18, 18), value * 200, dtype=np.uint16)).save(path)
    else:
        PILImage.new("RGB", (40, 32), (value, value, 0)).save(path)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """An image folder with train and test splits, one subfolder per class, and images of several modes."""
    kinds = ["gray", "rgba", "palette", "sixteen", "rgb"]
    for split, count in (("train", 5), ("test", 3)):
        for label_index, label in enumerate(CLASSES):
            for i in range(count):
                kind = kinds[(i + label_index) % len(kinds)]
                _write_image(tmp_path / split / label / f"{label}_{i}.png", kind, 40 * label_index + i)
    return tmp_path


def test_image_folder_loads_with_class_labels(image_folder):
    dataset = load_image_dataset(image_folder)
    assert set(dataset) == {"train", "test"}
    image_column, label_column = find_columns(dataset["train"])
    assert (image_column, label_column) == ("image", "label")
    assert sorted(dataset["train"].features["label"].names) == sorted(CLASSES)
    assert len(dataset["train"]) == 15


def test_save_to_disk_and_parquet_folders(image_folder, tmp_path):
    dataset = load_image_dataset(image_folder)
    saved = tmp_path / "saved"
    dataset.save_to_disk(str(saved))
    assert len(load_image_dataset(saved)["test"]) == 9
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    for split in dataset:
        dataset[split].to_parquet(str(parquet / f"{split}.parquet"))
    reloaded = load_image_dataset(parquet)
    assert len(reloaded["train"]) == 15
    assert reloaded["train"].features["label"].names == dataset["train"].features["label"].names


def test_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope not found"):
        load_image_dataset(tmp_path / "nope")


def test_file_path_names_its_folder(tmp_path):
    parquet_file = tmp_path / "train.parquet"
    parquet_file.write_bytes(b"")
    expected = f"is a file. Pass the folder that contains the dataset ({tmp_path})"
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_image_dataset(parquet_file)


def test_labels_map_by_name_not_index(image_folder):
    dataset = load_image_dataset(image_folder)
    space = LabelSpace.from_preset("rafdb")  # surprise, fear, disgust, happiness, sadness, anger, neutral
    mapping = label_mapping(dataset["train"].features["label"], space)
    names = dataset["train"].features["label"].names
    expected = {"happy": 3, "sad": 4, "angry": 5}
    assert mapping.tolist() == [expected[name] for name in names]


def test_unknown_label_names_are_listed(image_folder):
    dataset = load_image_dataset(image_folder)
    space = LabelSpace(["happiness", "neutral"])
    with pytest.raises(ValueError, match=r"\['angry', 'sad'\] are not in the label space"):
        prepare_splits(dataset, space, RALDImageProcessor(image_size=17), validation_split=None)


def test_prepared_splits_yield_tensors_of_any_image_mode(image_folder):
    dataset = load_image_dataset(image_folder)
    space = LabelSpace.from_preset("fer2013")
    processor = RALDImageProcessor(image_size=17)
    splits = prepare_splits(dataset, space, processor, validation_split="test", test_split=None)
    for split in (splits.train, splits.validation):
        for index in range(len(split)):
            item = split[index]
            assert item["pixel_values"].shape == (3, 17, 17)
            assert item["pixel_values"].dtype == torch.float32
            assert torch.isfinite(item["pixel_values"]).all()
    model_ids = {space.labels.index(name) for name in ("happy", "sad", "angry")}
    assert set(splits.labels(splits.train).tolist()) == model_ids


def test_evaluation_split_is_shuffled(image_folder):
    dataset = load_image_dataset(image_folder)
    raw_labels = dataset["test"]["label"]
    assert raw_labels == sorted(raw_labels), "the image folder is class-sorted"
    space = LabelSpace.from_preset("fer2013")
    splits = prepare_splits(dataset, space, RALDImageProcessor(image_size=17), validation_split="test", test_split=None)
    shuffled = splits.labels(splits.validation).tolist()
    assert sorted(shuffled) == sorted(splits.mapping[raw_labels].tolist())
    assert shuffled != sorted(shuffled)
    again = prepare_splits(dataset, space, RALDImageProcessor(image_size=17), validation_split="test", test_split=None)
    assert splits.labels(again.validation).tolist() == shuffled


def test_corrupt_image_error_names_file(image_folder):
    broken = image_folder / "train" / "sad" / "broken.png"
    broken.write_bytes(b"not a png at all")
    dataset = load_image_dataset(image_folder)
    splits = prepare_splits(
        dataset, LabelSpace.from_preset("fer2013"), RALDImageProcessor(image_size=17), validation_split=None
    )
    row = [i for i, value in enumerate(splits.train.with_format(None)["image"]) if "broken" in (value["path"] or "")]
    with pytest.raises(ValueError, match="Could not decode image .*broken.png"):
        splits.train[row[0]]


def test_missing_split_raises(image_folder):
    dataset = load_image_dataset(image_folder)
    with pytest.raises(ValueError, match=r"Splits \['validation'\] not found"):
        prepare_splits(dataset, LabelSpace.from_preset("fer2013"), RALDImageProcessor(image_size=17))


def test_dataset_without_class_label_raises():
    features = Features({"image": Image(), "emotion": Value("string")})
    dataset = Dataset.from_dict({"image": [], "emotion": []}, features=features)
    with pytest.raises(ValueError, match="needs an Image column and a ClassLabel column"):
        find_columns(dataset)


def test_stratified_subset_keeps_proportions():
    labels = [0] * 60 + [1] * 30 + [2] * 10
    dataset = Dataset.from_dict({"label": labels}, features=Features({"label": ClassLabel(names=["a", "b", "c"])}))
    subset = stratified_subset(dataset, 20, seed=0, label_column="label")
    counts = np.bincount(subset["label"], minlength=3).tolist()
    assert counts == [12, 6, 2]
    assert stratified_subset(dataset, 20, seed=0, label_column="label")["label"] == subset["label"]


def test_hold_out_split_is_stratified_and_disjoint():
    labels = [0] * 60 + [1] * 30 + [2] * 10
    dataset = Dataset.from_dict(
        {"label": labels, "row": list(range(100))},
        features=Features({"label": ClassLabel(names=["a", "b", "c"]), "row": Value("int32")}),
    )
    rest, held_out = hold_out_split(dataset, 0.2, seed=3, label_column="label")
    assert np.bincount(held_out["label"], minlength=3).tolist() == [12, 6, 2]
    assert sorted([*rest["row"], *held_out["row"]]) == list(range(100))
    assert list(hold_out_split(dataset, 0.2, seed=3, label_column="label")[1]["row"]) == list(held_out["row"])


@pytest.mark.parametrize(("fraction", "message"), [(0.0, "between 0 and 1"), (0.001, "leaves one side empty")])
def test_hold_out_split_rejects_bad_fractions(fraction, message):
    dataset = Dataset.from_dict({"label": [0, 1] * 5}, features=Features({"label": ClassLabel(names=["a", "b"])}))
    with pytest.raises(ValueError, match=message):
        hold_out_split(dataset, fraction, seed=0, label_column="label")


def test_stratified_subset_of_almost_all_rows():
    # Too few rows stay out to hold one of each class, so the draw falls back to uniform instead of failing.
    dataset = Dataset.from_dict(
        {"label": [0, 1, 2] * 10}, features=Features({"label": ClassLabel(names=["a", "b", "c"])})
    )
    assert len(stratified_subset(dataset, 29, seed=0, label_column="label")) == 29


def test_splits_with_different_classes_raise(image_folder):
    dataset = load_image_dataset(image_folder)
    other = dataset["test"].cast_column("label", ClassLabel(names=["angry", "happy", "surprise"]))
    mixed = DatasetDict({"train": dataset["train"], "test": other})
    with pytest.raises(ValueError, match="all splits must share one ClassLabel"):
        prepare_splits(
            mixed, LabelSpace.from_preset("fer2013"), RALDImageProcessor(image_size=17), validation_split=None
        )
