import json

import numpy as np
import pytest
from PIL import Image

from rald_hf import LabelSpace
from rald_hf.training import classification_metrics, plot_confusion_matrix, plot_tsne, write_metrics
from rald_hf.training.metrics import make_compute_metrics, per_class_table


def test_fine_metrics_values():
    space = LabelSpace(["joy", "fear", "rage"])
    labels = np.array([0, 0, 1, 1, 2, 2])
    predictions = np.array([0, 1, 1, 1, 2, 0])
    metrics = classification_metrics(labels, predictions, space)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["per_class_accuracy"] == {"joy": 0.5, "fear": 1.0, "rage": 0.5}
    assert metrics["support"] == {"joy": 2, "fear": 2, "rage": 2}
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # F1 per class: joy 0.5, fear 0.8, rage 2/3.
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_level_accuracy_from_fine_predictions():
    space = LabelSpace.from_preset("fg-emotions")
    anxiety, worry, thrill, lust = (space.labels.index(name) for name in ("anxiety", "worry", "thrill", "lust"))
    labels = np.array([anxiety, anxiety, thrill, lust])
    # worry is wrong but under the same coarse label (fear); lust is wrong at the coarse level (love, not
    # happiness) but right at the valence level (pleasant).
    predictions = np.array([anxiety, worry, lust, lust])
    metrics = classification_metrics(labels, predictions, space)
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["accuracy_coarse"] == pytest.approx(0.75)
    assert metrics["accuracy_valence"] == pytest.approx(1.0)


def test_absent_class_has_no_accuracy():
    space = LabelSpace(["joy", "fear", "rage"])
    metrics = classification_metrics(np.array([0, 1]), np.array([0, 2]), space)
    assert metrics["per_class_accuracy"]["rage"] is None
    assert "| rage | n/a | 0 |" in per_class_table(metrics)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="differ in shape"):
        classification_metrics(np.array([0, 1]), np.array([0]), LabelSpace(["a", "b"]))


def test_compute_metrics_for_trainer():
    class Prediction:
        predictions = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
        label_ids = np.array([0, 1, 1])

    metrics = make_compute_metrics(LabelSpace(["a", "b"]))(Prediction())
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert set(metrics) == {"accuracy", "macro_f1"}


def test_written_files(tmp_path):
    space = LabelSpace.from_preset("fer2013-valence")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 60)
    predictions = np.where(rng.random(60) < 0.6, labels, rng.integers(0, 7, 60))
    metrics = classification_metrics(labels, predictions, space)
    path = write_metrics(metrics, tmp_path)
    assert json.loads(path.read_text())["accuracy"] == pytest.approx(metrics["accuracy"])
    assert (tmp_path / "per_class_accuracy.md").read_text().startswith("| label | accuracy | images |")

    figure = plot_confusion_matrix(metrics["confusion_matrix"], list(space.labels), tmp_path / "cm.png")
    with Image.open(figure) as image:
        assert image.size[0] > 300
    features = rng.normal(size=(60, 8)) + labels[:, None]
    tsne = plot_tsne(features, labels, space, tmp_path / "tsne.png")
    with Image.open(tsne) as image:
        assert image.size[0] > 300
