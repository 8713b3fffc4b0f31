"""Training, evaluation and prediction: the Trainer with NNLDL, data through `datasets`, metrics and plots."""

from .data import (
    LabeledSplits,
    find_columns,
    hold_out_split,
    label_mapping,
    load_image_dataset,
    make_train_transform,
    prepare_splits,
    stratified_subset,
)
from .losses import NNLDLOptions, nnldl_loss, nnldl_target
from .metrics import classification_metrics, make_compute_metrics, plot_confusion_matrix, plot_tsne, write_metrics
from .run import TrainingResult, evaluate_checkpoint, predict_images, read_image, resolve_label_space, train_rald
from .trainer import RALDTrainer, RALDTrainingArguments, ReferenceBankCallback

__all__ = [
    "LabeledSplits",
    "NNLDLOptions",
    "RALDTrainer",
    "RALDTrainingArguments",
    "ReferenceBankCallback",
    "TrainingResult",
    "classification_metrics",
    "evaluate_checkpoint",
    "find_columns",
    "hold_out_split",
    "label_mapping",
    "load_image_dataset",
    "make_compute_metrics",
    "make_train_transform",
    "nnldl_loss",
    "nnldl_target",
    "plot_confusion_matrix",
    "plot_tsne",
    "predict_images",
    "prepare_splits",
    "read_image",
    "resolve_label_space",
    "stratified_subset",
    "train_rald",
    "write_metrics",
]
