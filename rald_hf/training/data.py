"""Image classification data through `datasets`: loading, label mapping by name, timm transforms.

Labels always travel by name: a dataset's class names are matched to the model's label space (with the
usual spellings in `rald_hf.labels.LABEL_SYNONYMS`), so FER2013's "happy" becomes the label space's
"happiness" and class order never matters.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm.data
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Image, load_dataset, load_from_disk
from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from sklearn.model_selection import train_test_split

from ..image_processing_rald import RALDImageProcessor, to_rgb_image
from ..labels import LabelSpace

__all__ = [
    "LabeledSplits",
    "find_columns",
    "hold_out_split",
    "label_mapping",
    "load_image_dataset",
    "make_train_transform",
    "prepare_splits",
    "stratified_subset",
    "with_image_transform",
]

logger = logging.getLogger(__name__)


def load_image_dataset(source: str | Path) -> DatasetDict:
    """Load a labelled image dataset with `datasets`.

    Args:
        source: A folder written by ``save_to_disk`` (read with `datasets.load_from_disk`); a folder of
            ``train``/``validation``/``test`` parquet files; an image folder with one subfolder per class
            (optionally under ``train/``, ``validation/`` and ``test/``); or a Hub dataset id, which needs
            network access.

    Returns:
        The splits as a `DatasetDict`.

    Raises:
        FileNotFoundError: For a path that looks local but does not exist.
    """
    path = Path(source)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = load_from_disk(str(path))
            return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
        return load_dataset(str(path))
    if path.exists():
        raise ValueError(f"Dataset path {source} is a file. Pass the folder that contains the dataset ({path.parent})")
    if str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"Dataset folder {source} not found. Check the path, or pass a Hub dataset id")
    return load_dataset(str(source))


def find_columns(dataset: Dataset) -> tuple[str, str]:
    """Return the names of the image column and the `ClassLabel` column of a dataset.

    Raises:
        ValueError: When either is missing, naming the columns the dataset has.
    """
    image_columns = [name for name, feature in dataset.features.items() if isinstance(feature, Image)]
    label_columns = [name for name, feature in dataset.features.items() if isinstance(feature, ClassLabel)]
    if not image_columns or not label_columns:
        raise ValueError(
            f"The dataset needs an Image column and a ClassLabel column; it has {dict(dataset.features)}. "
            "Cast the label column with dataset.cast_column(name, ClassLabel(names=[...]))."
        )
    return image_columns[0], label_columns[0]


def label_mapping(class_label: ClassLabel, space: LabelSpace) -> np.ndarray:
    """Map a dataset's label ids to the label space's fine-label ids, by name.

    Raises:
        ValueError: Listing every dataset class name that the label space lacks.
    """
    return np.asarray(space.index_of_names(class_label.names), dtype=np.int64)


def make_train_transform(
    image_size: int,
    processor: RALDImageProcessor,
    scale: tuple[float, float] = (0.8, 1.0),
    hflip: float = 0.5,
    color_jitter: float = 0.2,
    random_erasing: float = 0.25,
) -> Callable:
    """Build the timm training augmentation: random resized crop, flip, colour jitter and random erasing.

    Mean, standard deviation and interpolation come from ``processor``, so that training and evaluation
    normalise images alike.
    """
    return timm.data.create_transform(
        input_size=(3, image_size, image_size),
        is_training=True,
        scale=scale,
        ratio=(0.9, 1.1),
        hflip=hflip,
        color_jitter=color_jitter,
        re_prob=random_erasing,
        interpolation=processor.interpolation,
        mean=processor.image_mean,
        std=processor.image_std,
    )


def _decode(value: Any) -> PILImage.Image:
    """Open an undecoded `datasets` image ({"bytes", "path"}) or a PIL image, with a clear error."""
    if isinstance(value, PILImage.Image):
        return value
    source = value.get("path") or "an embedded image"
    try:
        if value.get("bytes") is not None:
            image = PILImage.open(io.BytesIO(value["bytes"]))
        else:
            image = PILImage.open(value["path"])
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(
            f"Could not decode image {source}: {error}. Remove or replace the file, or filter it out of the "
            "dataset before training."
        ) from error
    return image


def with_image_transform(
    dataset: Dataset,
    transform: Callable[[PILImage.Image], torch.Tensor],
    mapping: np.ndarray | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
) -> Dataset:
    """Return the dataset with a lazy transform that yields ``pixel_values`` and model ``labels``.

    Images are decoded on access (an undecodable file raises a `ValueError` naming it), converted to RGB
    by `rald_hf.image_processing_rald.to_rgb_image` and passed to ``transform``. Dataset label ids are
    translated to the model's through ``mapping``.
    """
    if image_column is None or label_column is None:
        image_column, label_column = find_columns(dataset)
    dataset = dataset.cast_column(image_column, Image(decode=False))

    def apply(batch: dict[str, list]) -> dict[str, list]:
        pixel_values = [transform(to_rgb_image(_decode(value))) for value in batch[image_column]]
        labels = batch[label_column]
        if mapping is not None:
            labels = mapping[np.asarray(labels, dtype=np.int64)].tolist()
        return {"pixel_values": pixel_values, "labels": labels}

    return dataset.with_transform(apply)


def _stratified_split(
    dataset: Dataset, size: int, seed: int, label_column: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted indices of ``size`` rows with the dataset's class proportions, and of the other rows.

    Stratification needs two images of every class and room for each class, so without them the draw is
    uniform.
    """
    if label_column is None:
        _, label_column = find_columns(dataset)
    labels = np.asarray(dataset.with_format(None)[label_column])
    counts = np.bincount(labels)
    classes = int((counts > 0).sum())
    stratified = counts[counts > 0].min() >= 2 and classes <= size <= len(dataset) - classes
    chosen, rest = train_test_split(
        np.arange(len(dataset)), train_size=size, random_state=seed, stratify=labels if stratified else None
    )
    return np.sort(chosen), np.sort(rest)


def stratified_subset(dataset: Dataset, size: int, seed: int, label_column: str | None = None) -> Dataset:
    """Select ``size`` rows with the class proportions of the whole dataset, reproducibly for a seed."""
    if size >= len(dataset):
        return dataset
    chosen, _ = _stratified_split(dataset, size, seed, label_column)
    return dataset.select(chosen)


def hold_out_split(
    dataset: Dataset, fraction: float, seed: int, label_column: str | None = None
) -> tuple[Dataset, Dataset]:
    """Split off a stratified, seeded ``fraction`` of the rows, as a validation split for a dataset without one.

    Returns:
        The remaining rows and the held-out rows.

    Raises:
        ValueError: For a fraction outside (0, 1), or a dataset too small to keep rows on both sides.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"The held-out fraction must be between 0 and 1, got {fraction}")
    size = round(fraction * len(dataset))
    if not 0 < size < len(dataset):
        raise ValueError(
            f"Holding out {fraction:g} of {len(dataset)} images leaves one side empty; add a validation split "
            "to the dataset or choose another fraction"
        )
    held_out, rest = _stratified_split(dataset, size, seed, label_column)
    return dataset.select(rest), dataset.select(held_out)


@dataclass
class LabeledSplits:
    """The splits of a dataset prepared for a model, and what was needed to prepare them."""

    train: Dataset | None
    validation: Dataset | None
    test: Dataset | None
    class_label: ClassLabel
    mapping: np.ndarray
    image_column: str
    label_column: str
    processor: RALDImageProcessor

    def labels(self, split: Dataset) -> np.ndarray:
        """Return the model label ids of a prepared split, without decoding any image."""
        return self.mapping[np.asarray(split.with_format(None)[self.label_column], dtype=np.int64)]

    def for_evaluation(self, split: Dataset) -> Dataset:
        """Return the rows of a prepared split with the evaluation transform instead of its own.

        The reference bank is built this way from the training rows, without augmentation.
        """
        return with_image_transform(
            split.with_format(None), self.processor.transform, self.mapping, self.image_column, self.label_column
        )


def prepare_splits(
    dataset: DatasetDict,
    space: LabelSpace,
    processor: RALDImageProcessor,
    train_transform: Callable | None = None,
    train_split: str | None = "train",
    validation_split: str | None = "validation",
    test_split: str | None = "test",
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    shuffle_evaluation: bool = True,
) -> LabeledSplits:
    """Select, subsample, shuffle and transform the splits of a dataset for training and evaluation.

    The training split gets ``train_transform`` (timm augmentation by default); the others get the image
    processor. Evaluation splits are shuffled with ``seed``, because batch attention over a class-sorted split
    (FER2013's files are sorted by class) lets the other images of a batch reveal the label.
    ``shuffle_evaluation=False`` keeps the stored order, to measure that leak.

    Raises:
        ValueError: For a split name the dataset lacks, splits with different class names, or class names
            that the label space lacks.
    """
    requested = [name for name in (train_split, validation_split, test_split) if name is not None]
    missing = [name for name in requested if name not in dataset]
    if missing:
        raise ValueError(f"Splits {missing} not found; the dataset has {list(dataset)}")
    if not requested:
        raise ValueError("Name at least one split to prepare")

    first = dataset[requested[0]]
    image_column, label_column = find_columns(first)
    class_label = first.features[label_column]
    for name in requested[1:]:
        other = dataset[name].features.get(label_column)
        if not isinstance(other, ClassLabel) or list(other.names) != list(class_label.names):
            raise ValueError(
                f"Split {name!r} has labels {getattr(other, 'names', other)}, split {requested[0]!r} has "
                f"{class_label.names}; all splits must share one ClassLabel"
            )
    mapping = label_mapping(class_label, space)
    if train_transform is None:
        train_transform = make_train_transform(processor.image_size, processor)

    def prepare(name: str | None, training: bool, limit: int | None) -> Dataset | None:
        if name is None:
            return None
        split = dataset[name]
        if len(split) == 0:
            raise ValueError(f"Split {name!r} is empty")
        if limit is not None:
            split = stratified_subset(split, limit, seed, label_column)
        if not training and shuffle_evaluation:
            split = split.shuffle(seed=seed)
        transform = train_transform if training else processor.transform
        return with_image_transform(split, transform, mapping, image_column, label_column)

    return LabeledSplits(
        train=prepare(train_split, True, max_train_samples),
        validation=prepare(validation_split, False, max_eval_samples),
        test=prepare(test_split, False, max_eval_samples),
        class_label=class_label,
        mapping=mapping,
        image_column=image_column,
        label_column=label_column,
        processor=processor,
    )
