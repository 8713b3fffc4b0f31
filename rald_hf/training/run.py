"""End-to-end jobs behind the CLI and the benchmarks: train, evaluate and predict.

Each function takes plain arguments that map one to one onto `RALDConfig` fields, `RALDTrainingArguments`
fields or its own parameters, so the CLI stays a thin layer of argument parsing.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import DatasetDict

from ..configuration_rald import RALDConfig
from ..image_processing_rald import RALDImageProcessor, to_rgb_image
from ..labels import LabelSpace, UnknownLabelsError
from ..modeling_rald import RALDForImageClassification
from .data import hold_out_split, load_image_dataset, make_train_transform, prepare_splits
from .metrics import classification_metrics, make_compute_metrics, plot_confusion_matrix, plot_tsne, write_metrics
from .trainer import RALDTrainer, RALDTrainingArguments, ReferenceBankCallback

__all__ = [
    "TrainingResult",
    "check_config_fields",
    "evaluate_checkpoint",
    "predict_images",
    "resolve_label_space",
    "train_rald",
]

logger = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    """Outputs of `train_rald`: the folder, the scored metrics and the files written."""

    output_dir: Path
    metrics: dict[str, Any]
    evaluated_split: str | None
    train_seconds: float
    is_main_process: bool = True
    files: dict[str, Path] = field(default_factory=dict)


def check_config_fields(fields: dict[str, Any]) -> None:
    """Raise a `ValueError` for names that are not `RALDConfig` fields, suggesting the closest ones.

    `PreTrainedConfig` keeps unknown keyword arguments as extra attributes, so a misspelt field would
    otherwise be stored and ignored.
    """
    known = {field.name for field in dataclasses.fields(RALDConfig)}
    unknown = [name for name in fields if name not in known]
    if unknown:
        hints = {name: difflib.get_close_matches(name, sorted(known), n=1) for name in unknown}
        described = ", ".join(
            f"{name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") for name, hint in hints.items()
        )
        raise ValueError(f"Unknown RALDConfig fields: {described}. The fields are listed in RALDConfig's docstring.")


def resolve_label_space(spec: LabelSpace | str | Path | None, splits_source: DatasetDict | None = None) -> LabelSpace:
    """Turn a label-space argument into a `LabelSpace`.

    Args:
        spec: A `LabelSpace`; a preset name; a path to a label-tree JSON file (`LabelSpace.from_dict` form);
            or ``None`` for the dataset's own class names with no tree.
        splits_source: The dataset, needed when ``spec`` is ``None``.
    """
    if isinstance(spec, LabelSpace):
        return spec
    if spec is None:
        if splits_source is None:
            raise ValueError("Without a preset or label tree the label space comes from the dataset; pass one")
        first = next(iter(splits_source.values()))
        from .data import find_columns

        _, label_column = find_columns(first)
        return LabelSpace.from_class_label(first.features[label_column])
    if str(spec) in LabelSpace.available_presets():
        return LabelSpace.from_preset(str(spec))
    path = Path(spec)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"Label tree file {path} not found")
        return LabelSpace.from_json_file(path)
    raise ValueError(
        f"Label space {spec!r} is neither a preset ({LabelSpace.available_presets()}) nor a label-tree JSON file"
    )


def _training_arguments(output_dir: Path, training_args: RALDTrainingArguments | dict | None) -> RALDTrainingArguments:
    if isinstance(training_args, RALDTrainingArguments):
        return training_args
    values = {
        "output_dir": str(output_dir),
        "eval_strategy": "epoch",
        "save_strategy": "epoch",
        "save_total_limit": 1,
        "load_best_model_at_end": True,
        "metric_for_best_model": "accuracy",
        "report_to": "none",
        "logging_steps": 10,
    }
    values.update(training_args or {})
    return RALDTrainingArguments(**values)


def _optimizer_name(args: RALDTrainingArguments) -> str:
    return str(getattr(args.optim, "value", args.optim))


def random_backbone_sgd_warning(config: RALDConfig, optimizer: str) -> str | None:
    """Return a warning when SGD is to train a randomly initialised backbone under a layer-normed head.

    On FER2013, SGD training of a ResNet18 from scratch stalled near the class prior whenever a layer norm
    sat between the backbone and the classifier (any RALD block, or pre-norm blocks). AdamW trained the same
    model; docs/benchmarks.md has the runs. Returns ``None`` when the combination does not arise.
    """
    normed_head = config.use_itrr or config.use_lgifo or config.norm_first
    if not normed_head or not optimizer.startswith("sgd"):
        return None
    return (
        f"Training a randomly initialised {config.backbone} with SGD: with a layer norm between the backbone and "
        "the classifier, SGD training from scratch stalled near the class prior on FER2013, while AdamW trained "
        "the same model. Load pretrained backbone weights (backbone_weights=..., rald-hf --backbone-weights), "
        "or train with AdamW (optim='adamw_torch', learning rate 1e-3, weight decay 0.05; rald-hf "
        "--optimizer adamw_torch --learning-rate 0.001 --weight-decay 0.05)."
    )


def train_rald(
    dataset: str | Path | DatasetDict,
    output_dir: str | Path,
    label_space: LabelSpace | str | Path | None = None,
    rald_l: bool = False,
    config_overrides: dict[str, Any] | None = None,
    backbone_weights: str | Path | None = None,
    training_args: RALDTrainingArguments | dict[str, Any] | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    train_split: str = "train",
    validation_split: str | None = "validation",
    test_split: str | None = "test",
    word_vectors: str | Path | None = None,
    word_aliases: dict[str, str] | None = None,
    tsne: bool = False,
    reference_bank_size: int = 128,
    augmentation: dict[str, Any] | None = None,
    init_from: str | Path | None = None,
    validation_fraction: float = 0.1,
) -> TrainingResult:
    """Train a RALD classifier on a dataset, evaluate it and save everything into ``output_dir``.

    Args:
        dataset: Anything `rald_hf.training.load_image_dataset` accepts, or a loaded `DatasetDict`.
        output_dir: Where checkpoints, the final model, its image processor, ``metrics.json``, the per-class
            table and ``confusion_matrix.png`` go.
        label_space: See `resolve_label_space`. The dataset's class names must all be in it.
        rald_l: Drop the tree and the hierarchy bias (RALD-L).
        config_overrides: `RALDConfig` fields, such as ``backbone``, ``image_size`` or ``num_neighbors``.
        backbone_weights: A local timm checkpoint for the backbone (see `RALDModel.load_backbone_weights`).
        training_args: `RALDTrainingArguments`, or a dict of fields that overrides this function's defaults
            (evaluation and saving every epoch, keeping the checkpoint with the best validation accuracy).
        max_train_samples: Train on a stratified, seeded subset of this size.
        max_eval_samples: Evaluate on stratified, seeded subsets of this size.
        train_split: Name of the training split.
        validation_split: Split for per-epoch evaluation and checkpoint selection, or ``None``. When the
            dataset has no split of the default name "validation", ``validation_fraction`` of the training
            split is held out for it.
        test_split: Split scored at the end into ``metrics.json``, or ``None`` to score the validation split.
        word_vectors: Word vectors for the label embeddings (default: the shipped GloVe vocabulary).
        word_aliases: Substitutes for label words that the vectors lack, such as ``{"bird": "animal"}``.
        tsne: Also save ``tsne.png``, a t-SNE map of the final image features of the scored split.
        reference_bank_size: Images of the training split whose backbone features are stored in the
            checkpoint for batch-independent inference (drawn class-balanced after training); 0 saves the
            checkpoint without a bank.
        augmentation: Arguments of `rald_hf.training.make_train_transform` (``scale``, ``hflip``,
            ``color_jitter``, ``random_erasing``) that replace its defaults.
        init_from: A RALD checkpoint (folder or Hub id) to start from. Its backbone and attention weights
            carry over, and the labels, tree, classifier and reference bank are made anew for this label
            space (`RALDPreTrainedModel.for_label_space`). ``config_overrides`` may then only change
            fields that do not define the architecture.
        validation_fraction: The stratified, seeded share of the training split held out as the validation
            split when the dataset has none; 0 trains without per-epoch evaluation instead.
    """
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be at least 0 and below 1, got {validation_fraction}")
    output_dir = Path(output_dir)
    args = _training_arguments(output_dir, training_args)
    # A preset or tree file is checked before the dataset loads, which may take long.
    space = resolve_label_space(label_space) if label_space is not None else None
    dataset_name = Path(str(dataset)).name if not isinstance(dataset, DatasetDict) else None
    if not isinstance(dataset, DatasetDict):
        dataset = load_image_dataset(dataset)
    if train_split not in dataset:
        raise ValueError(f"Split {train_split!r} not found; the dataset has {list(dataset)}")
    # A missing split under its default name is optional; a missing split named by the caller is a mistake.
    if validation_split is not None and validation_split not in dataset:
        if validation_split != "validation":
            raise ValueError(f"Validation split {validation_split!r} not found; the dataset has {list(dataset)}")
        if validation_fraction > 0:
            rest, held_out = hold_out_split(dataset[train_split], validation_fraction, args.seed)
            dataset = DatasetDict({**dataset, train_split: rest, "validation": held_out})
            logger.warning(
                "The dataset has no 'validation' split; holding out %d of its %d training images for it "
                "(validation_fraction=%g)",
                len(held_out),
                len(rest) + len(held_out),
                validation_fraction,
            )
        else:
            logger.warning("The dataset has no 'validation' split; training without per-epoch evaluation")
            validation_split = None
    if test_split is not None and test_split not in dataset:
        if test_split != "test":
            raise ValueError(f"Test split {test_split!r} not found; the dataset has {list(dataset)}")
        if validation_split is not None:
            logger.warning("The dataset has no 'test' split; scoring the validation split instead")
        else:
            logger.warning("The dataset has neither a 'test' nor a 'validation' split; nothing will be scored")
        test_split = None
    # The folder is created only once the data has loaded, so that a failed start leaves no empty folder.
    output_dir.mkdir(parents=True, exist_ok=True)

    if space is None:
        space = resolve_label_space(None, dataset)
    overrides = dict(config_overrides or {})
    check_config_fields(overrides)
    if rald_l:
        space = space.without_tree()
        overrides["use_hierarchy_bias"] = False
    if validation_split is None and args.eval_strategy != "no":
        args.eval_strategy = "no"
        args.load_best_model_at_end = False
    torch.manual_seed(args.seed)
    if init_from is not None:
        if backbone_weights is not None:
            raise ValueError("Pass either init_from (a RALD checkpoint) or backbone_weights, not both")
        model = load_checkpoint(init_from).for_label_space(
            space, word_vectors=word_vectors, word_aliases=word_aliases, **overrides
        )
    else:
        config = RALDConfig.from_label_space(space, vectors=word_vectors, word_aliases=word_aliases, **overrides)
        model = RALDForImageClassification(config)
    if backbone_weights is not None:
        model.load_backbone_weights(str(backbone_weights))
    config = model.config
    if init_from is None and backbone_weights is None:
        warning = random_backbone_sgd_warning(config, _optimizer_name(args))
        if warning:
            logger.warning(warning)
    num_parameters = sum(p.numel() for p in model.parameters())
    logger.info("Training RALD over %s: %s backbone, %.2f M parameters", space, config.backbone, num_parameters / 1e6)

    processor = RALDImageProcessor.from_backbone(model.rald.backbone, image_size=config.image_size)
    splits = prepare_splits(
        dataset,
        space,
        processor,
        train_transform=make_train_transform(config.image_size, processor, **(augmentation or {})),
        train_split=train_split,
        validation_split=validation_split,
        test_split=test_split,
        max_train_samples=max_train_samples,
        max_eval_samples=max_eval_samples,
        seed=args.seed,
    )
    train_labels = splits.labels(splits.train)
    bank_callback = ReferenceBankCallback(
        splits.for_evaluation(splits.train),
        size=reference_bank_size if model.rald.itrr is not None else 0,
        labels=train_labels,
        seed=args.seed,
    )
    trainer = RALDTrainer(
        model=model,
        args=args,
        train_dataset=splits.train,
        eval_dataset=splits.validation,
        processing_class=processor,
        compute_metrics=make_compute_metrics(space),
        train_labels=train_labels,
        callbacks=[bank_callback],
    )
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start

    trainer.save_model(str(output_dir))
    summary = {
        "dataset_name": dataset_name,
        "training_images": len(splits.train),
        "epochs": args.num_train_epochs,
        "batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "optimizer": _optimizer_name(args),
        "learning_rate": args.learning_rate,
        "schedule": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "seed": args.seed,
        "started_from": str(init_from or backbone_weights or "random initialisation"),
        "train_seconds": round(train_seconds, 1),
    }
    main_process = trainer.is_world_process_zero()
    if main_process:
        (output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    scored_name = test_split or validation_split
    scored = splits.test if test_split is not None else splits.validation
    result = TrainingResult(
        output_dir=output_dir,
        metrics={},
        evaluated_split=scored_name,
        train_seconds=train_seconds,
        is_main_process=main_process,
    )
    if scored is not None:
        # Every process takes part in predict; only the main process writes files.
        target = output_dir if main_process else None
        result.metrics, result.files = _score(trainer, scored, space, target, tsne=tsne)
        result.metrics["split"] = scored_name
        result.metrics["train_seconds"] = round(train_seconds, 1)
        if main_process:
            write_metrics(result.metrics, output_dir)
    return result


def _score(
    trainer: RALDTrainer,
    dataset: Any,
    space: LabelSpace,
    output_dir: Path | None,
    tsne: bool = False,
    prefix: str = "",
    flip: bool = False,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Predict a prepared split and compute its metrics. With ``output_dir``, also save the plots there.

    With ``flip``, each image is also predicted mirrored left to right and the two probability vectors are
    averaged. Returns the metrics and the paths of the output files: the plots, saved here, and the metrics
    file, which the caller writes once it has added its own fields.
    """
    prediction = trainer.predict(dataset, metric_key_prefix="test")
    probabilities = _probabilities(prediction.predictions)
    if flip:
        collate = trainer.data_collator
        trainer.data_collator = lambda features: _mirror(collate(features))
        try:
            mirrored = trainer.predict(dataset, metric_key_prefix="test")
        finally:
            trainer.data_collator = collate
        probabilities = (probabilities + _probabilities(mirrored.predictions)) / 2
    predictions = np.argmax(probabilities, axis=-1)
    metrics = classification_metrics(prediction.label_ids, predictions, space)
    trainer.model.eval()
    metrics["relation_mode"] = trainer.model.rald.resolve_relation_mode()
    metrics["flip"] = flip
    metrics["num_images"] = int(len(predictions))
    if output_dir is None:
        return metrics, {}
    files = {
        "metrics": output_dir / f"{prefix}metrics.json",
        "confusion_matrix": plot_confusion_matrix(
            metrics["confusion_matrix"], list(space.labels), output_dir / f"{prefix}confusion_matrix.png"
        ),
    }
    if tsne:
        features, labels = collect_features(trainer.model, dataset, trainer.args.per_device_eval_batch_size)
        files["tsne"] = plot_tsne(features, labels, space, output_dir / f"{prefix}tsne.png")
    return metrics, files


def _probabilities(predictions: np.ndarray | tuple) -> np.ndarray:
    """Return the softmax of the logits that ``Trainer.predict`` returns (its first item when it is a tuple)."""
    logits = predictions[0] if isinstance(predictions, tuple) else predictions
    return torch.from_numpy(logits).float().softmax(dim=-1).numpy()


def _mirror(batch: dict[str, Any]) -> dict[str, Any]:
    """Mirror the images of a collated batch left to right."""
    return {**batch, "pixel_values": batch["pixel_values"].flip(-1)}


@torch.no_grad()
def collect_features(
    model: RALDForImageClassification, dataset: Any, batch_size: int, max_images: int = 2000
) -> tuple[np.ndarray, np.ndarray]:
    """Return the final image features (F̂) and labels of up to ``max_images`` images of a prepared split."""
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    model.eval()
    device = next(model.parameters()).device
    features, labels = [], []
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=default_data_collator)
    seen = 0
    for batch in loader:
        outputs = model(batch["pixel_values"].to(device))
        features.append(outputs.last_hidden_state.float().cpu().numpy())
        labels.append(batch["labels"].numpy())
        seen += len(batch["labels"])
        if seen >= max_images:
            break
    return np.concatenate(features)[:max_images], np.concatenate(labels)[:max_images]


def evaluate_checkpoint(
    checkpoint: str | Path,
    dataset: str | Path | DatasetDict,
    split: str = "test",
    output_dir: str | Path | None = None,
    batch_size: int = 128,
    relation_mode: str | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    tsne: bool = False,
    shuffle: bool = True,
    progress: bool = True,
    flip: bool = False,
) -> dict[str, Any]:
    """Score a saved checkpoint on one split of a dataset; write metrics and plots when ``output_dir`` is set.

    Args:
        checkpoint: A folder written by `train_rald` or ``save_pretrained``.
        dataset: Anything `rald_hf.training.load_image_dataset` accepts, or a loaded `DatasetDict`.
        split: The split to score.
        output_dir: Where ``<split>_metrics.json``, the per-class table and the confusion matrix go. Without
            it, nothing is written and only the returned metrics remain.
        batch_size: Images per evaluation batch; in transductive mode this is how many images relate.
        relation_mode: Override the checkpoint's inference relation mode.
        max_eval_samples: Score a stratified, seeded subset of this size.
        seed: Seed of the subset and of the evaluation order.
        tsne: Also save a t-SNE map of the image features (needs ``output_dir``).
        shuffle: Shuffle the evaluation order with ``seed``. ``False`` keeps the dataset's order, which for a
            class-sorted split shows how much transductive relations leak the labels.
        progress: Show the Trainer's progress bar.
        flip: Also predict every image mirrored left to right and average the two probability vectors
            (test-time flip augmentation, twice the compute). In transductive mode the mirrored images relate
            to each other, in the same batches as the originals.
    """
    if tsne and output_dir is None:
        raise ValueError("tsne=True writes tsne.png, so it needs an output_dir (rald-hf: --output-dir)")
    # The dataset loads first, so that a wrong path fails before the model is read.
    if not isinstance(dataset, DatasetDict):
        dataset = load_image_dataset(dataset)
    model = load_checkpoint(checkpoint)
    if relation_mode is not None:
        model.config.inference_relation_mode = relation_mode
    processor = _load_processor(checkpoint, model)
    space = LabelSpace.from_config(model.config)
    try:
        splits = prepare_splits(
            dataset,
            space,
            processor,
            train_split=None,
            validation_split=split,
            test_split=None,
            max_eval_samples=max_eval_samples,
            seed=seed,
            shuffle_evaluation=shuffle,
        )
    except UnknownLabelsError as error:
        # A checkpoint's labels are fixed, so the usual advice (pick another label space) does not apply.
        raise UnknownLabelsError(
            error.missing,
            f"Label names {error.missing} of the dataset are not among the labels of checkpoint {checkpoint} "
            f"({list(space.labels)}). Score it on data with those classes, or fine-tune it to the dataset's "
            f"labels first (rald-hf train --init-from {checkpoint}).",
        ) from error
    # The Trainer needs an output folder even though evaluation saves nothing into it.
    with tempfile.TemporaryDirectory(prefix="rald-eval-") as scratch:
        args = RALDTrainingArguments(
            output_dir=scratch,
            per_device_eval_batch_size=batch_size,
            report_to="none",
            seed=seed,
            disable_tqdm=not progress,
        )
        trainer = RALDTrainer(model=model, args=args, processing_class=processor)
        if output_dir is not None:
            output_dir = Path(output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
        metrics, _ = _score(trainer, splits.validation, space, output_dir, tsne=tsne, prefix=f"{split}_", flip=flip)
    metrics["split"] = split
    metrics["shuffled"] = shuffle
    metrics["batch_size"] = batch_size
    if output_dir is not None:
        write_metrics(metrics, output_dir, prefix=f"{split}_")
    return metrics


def load_checkpoint(checkpoint: str | Path) -> RALDForImageClassification:
    """Load a RALD classifier from a folder or Hub id, with a clear error when neither exists."""
    try:
        return RALDForImageClassification.from_pretrained(str(checkpoint))
    except OSError as error:
        if Path(checkpoint).exists():
            raise
        raise FileNotFoundError(
            f"Checkpoint {checkpoint} not found: it is not a local folder, and loading it as a Hub id failed "
            f"({str(error).splitlines()[0]})"
        ) from error


def _load_processor(checkpoint: str | Path, model: RALDForImageClassification) -> RALDImageProcessor:
    if (Path(checkpoint) / "preprocessor_config.json").exists():
        return RALDImageProcessor.from_pretrained(str(checkpoint))
    logger.warning("%s has no preprocessor_config.json; using the backbone's normalisation", checkpoint)
    return RALDImageProcessor.from_backbone(model.rald.backbone, image_size=model.config.image_size)


def read_image(path: str | Path) -> Any:
    """Open an image file as 8-bit RGB with `to_rgb_image`.

    Raises:
        ValueError: When the file is missing, unreadable or not an image; the message names the file.
    """
    from PIL import Image

    try:
        with Image.open(path) as handle:
            handle.load()
            return to_rgb_image(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"Could not read image {path}: {error}") from error


@torch.no_grad()
def predict_images(
    checkpoint: str | Path | RALDForImageClassification,
    images: Sequence[str | Path | Any],
    top_k: int = 3,
    relation_mode: str | None = None,
    processor: RALDImageProcessor | None = None,
) -> list[list[tuple[str, float]]]:
    """Return the ``top_k`` fine labels and probabilities for each image.

    Args:
        checkpoint: A checkpoint folder or a loaded model.
        images: File paths or images (PIL, NumPy, tensors); files are read with `to_rgb_image`.
        top_k: How many labels to return per image.
        relation_mode: Override the model's inference relation mode.
        processor: The image processor; read from the checkpoint folder by default.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    loaded = [read_image(image) if isinstance(image, str | Path) else image for image in images]
    if isinstance(checkpoint, RALDForImageClassification):
        model = checkpoint
        processor = processor or RALDImageProcessor.from_backbone(model.rald.backbone, model.config.image_size)
    else:
        model = load_checkpoint(checkpoint)
        processor = processor or _load_processor(checkpoint, model)
    model.eval()
    pixel_values = processor(loaded)["pixel_values"].to(next(model.parameters()).device)
    probabilities = model(pixel_values, relation_mode=relation_mode).logits.softmax(dim=-1)
    top = probabilities.topk(min(top_k, probabilities.shape[-1]), dim=-1)
    return [
        [(model.config.id2label[int(i)], float(p)) for p, i in zip(values, indices, strict=True)]
        for values, indices in zip(top.values, top.indices, strict=True)
    ]
