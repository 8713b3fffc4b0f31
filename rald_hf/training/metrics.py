"""Classification metrics with scikit-learn, and the plots that go with them.

Accuracy, macro-F1 and per-class accuracy for the fine labels, accuracy at every coarser level of the label
tree (a fine prediction counts as right at a level when its ancestor there is the true one), a confusion
matrix image and an optional t-SNE map of the image features.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from ..labels import LabelSpace

__all__ = [
    "classification_metrics",
    "make_compute_metrics",
    "per_class_table",
    "plot_confusion_matrix",
    "plot_tsne",
    "write_metrics",
]


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, space: LabelSpace) -> dict[str, Any]:
    """Score fine-label predictions against the truth.

    Args:
        labels: True fine-label ids, shape (N,).
        predictions: Predicted fine-label ids, shape (N,).
        space: The label space, for names and the tree.

    Returns:
        ``accuracy`` and ``macro_f1`` over the fine labels; ``accuracy_<level>`` for each coarser level;
        ``per_class_accuracy`` (name -> accuracy, ``None`` for classes absent from ``labels``);
        ``support`` (name -> count) and ``confusion_matrix`` (rows are true labels).
    """
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in shape")
    if labels.size == 0:
        raise ValueError("No predictions to score")
    class_ids = np.arange(space.num_labels)
    matrix = confusion_matrix(labels, predictions, labels=class_ids)
    support = matrix.sum(axis=1)
    per_class = {
        name: (float(matrix[i, i] / support[i]) if support[i] else None) for i, name in enumerate(space.labels)
    }
    metrics: dict[str, Any] = {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, labels=class_ids[support > 0], average="macro")),
    }
    for depth in range(1, space.num_levels):
        ancestor = space.fine_to_level(depth)
        metrics[f"accuracy_{space.level_names[depth]}"] = float(np.mean(ancestor[labels] == ancestor[predictions]))
    metrics["per_class_accuracy"] = per_class
    metrics["support"] = {name: int(count) for name, count in zip(space.labels, support, strict=True)}
    metrics["confusion_matrix"] = matrix.tolist()
    return metrics


def make_compute_metrics(space: LabelSpace) -> Callable[[Any], dict[str, float]]:
    """Return a `Trainer` ``compute_metrics`` function reporting the scalar metrics."""

    def compute_metrics(evaluation: Any) -> dict[str, float]:
        logits = evaluation.predictions[0] if isinstance(evaluation.predictions, tuple) else evaluation.predictions
        metrics = classification_metrics(evaluation.label_ids, np.argmax(logits, axis=-1), space)
        return {key: value for key, value in metrics.items() if isinstance(value, float)}

    return compute_metrics


def per_class_table(metrics: dict[str, Any]) -> str:
    """Format per-class accuracy and support as a Markdown table."""
    lines = ["| label | accuracy | images |", "| --- | --- | --- |"]
    for name, accuracy in metrics["per_class_accuracy"].items():
        shown = "n/a" if accuracy is None else f"{100 * accuracy:.2f} %"
        lines.append(f"| {name} | {shown} | {metrics['support'][name]} |")
    return "\n".join(lines) + "\n"


def write_metrics(metrics: dict[str, Any], output_dir: str | Path, prefix: str = "") -> Path:
    """Write ``metrics.json`` (or ``<prefix>metrics.json``) and a per-class Markdown table; return the JSON path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{prefix}metrics.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    (output_dir / f"{prefix}per_class_accuracy.md").write_text(per_class_table(metrics))
    return path


def plot_confusion_matrix(matrix: np.ndarray | list, names: list[str], path: str | Path, title: str = "") -> Path:
    """Save a row-normalised confusion matrix (true labels in rows) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    matrix = np.asarray(matrix, dtype=np.float64)
    rows = matrix.sum(axis=1, keepdims=True)
    normalized = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    size = max(6.0, 0.35 * len(names) + 3)
    figure, axes = plt.subplots(figsize=(size, size))
    display = ConfusionMatrixDisplay(normalized, display_labels=names)
    display.plot(ax=axes, cmap="Blues", values_format=".2f", colorbar=False, include_values=len(names) <= 12)
    axes.set_title(title or "Confusion matrix (rows: true label, normalised)")
    plt.setp(axes.get_xticklabels(), rotation=60, ha="right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def plot_tsne(features: np.ndarray, labels: np.ndarray, space: LabelSpace, path: str | Path, seed: int = 0) -> Path:
    """Save a t-SNE map of image features, coloured by fine label and, with a tree, marked by coarse label.

    Images of one coarse label share a marker, so a feature space shaped by the tree shows as groups of
    fine clusters with one marker.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if len(features) < 5:
        raise ValueError(f"t-SNE needs at least 5 images, got {len(features)}")
    perplexity = float(min(30, (len(features) - 1) // 3))
    points = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(features)

    markers = "os^Dv<>pPX*h"
    coarse = space.fine_to_level(1) if space.has_tree else np.zeros(space.num_labels, dtype=np.int64)
    colors = plt.get_cmap("tab20" if space.num_labels <= 20 else "gist_ncar", space.num_labels)
    figure, axes = plt.subplots(figsize=(9, 8))
    for label in np.unique(labels):
        chosen = labels == label
        axes.scatter(
            points[chosen, 0],
            points[chosen, 1],
            s=8,
            color=colors(label),
            marker=markers[coarse[label] % len(markers)],
            label=space.labels[label],
        )
    title = "t-SNE of image features, colour: fine label"
    if space.has_tree:
        title += f", marker: {space.level_names[1]} label"
    axes.set_title(title)
    axes.legend(markerscale=2, fontsize=7, ncol=2 if space.num_labels > 12 else 1, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)
