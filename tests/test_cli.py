"""The rald-hf command line, end to end on a small image folder and on real FER2013 images."""

import json
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from sklearn.metrics import confusion_matrix

from rald_hf import RALDForImageClassification, RALDImageProcessor
from rald_hf.cli import build_parser, main
from rald_hf.training.run import evaluate_checkpoint, predict_images, read_image

from .training.test_data import CLASSES, _write_image
from .utils import tiny_config

TINY_TRAIN = [
    "--backbone",
    "test_efficientnet",
    "--image-size",
    "29",
    "--batch-size",
    "8",
    "--epochs",
    "1",
    "--learning-rate",
    "0.05",
    "--no-progress",
    "--set",
    "hidden_size=18",
    "--set",
    "num_attention_heads=3",
]


@pytest.fixture
def faces(tmp_path):
    """An image folder with train, validation and test splits of three classes."""
    for split, count in (("train", 8), ("validation", 4), ("test", 4)):
        for label_index, label in enumerate(CLASSES):
            for i in range(count):
                _write_image(tmp_path / "faces" / split / label / f"{i}.png", "rgb", 60 * label_index + 3 * i)
    return tmp_path / "faces"


def test_help_names_paper_differences():
    text = build_parser().format_help()
    for command in ("train", "evaluate", "predict", "push"):
        assert command in text
    train_help = subprocess.run(
        [sys.executable, "-m", "rald_hf.cli", "train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "Defaults that differ, and why" in train_help
    assert "--epochs 10" in train_help
    assert "300 epochs" in train_help


def test_train_evaluate_predict(faces, tmp_path, capsys, monkeypatch):
    output = tmp_path / "run"
    main(["train", "--dataset", str(faces), "--output-dir", str(output), "--preset", "fer2013-valence", *TINY_TRAIN])
    for name in (
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "metrics.json",
        "confusion_matrix.png",
    ):
        assert (output / name).exists(), f"{name} missing from the output folder"
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["split"] == "test"
    assert metrics["num_images"] == 12
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert "accuracy_valence" in metrics
    config = json.loads((output / "config.json").read_text())
    assert config["image_size"] == 29
    assert config["level_labels"][1] == ["unpleasant", "pleasant", "neutral"]
    printed = capsys.readouterr().out
    assert "test: accuracy" in printed

    main(
        [
            "evaluate",
            str(output),
            "--dataset",
            str(faces),
            "--split",
            "test",
            "--batch-size",
            "8",
            "--output-dir",
            str(tmp_path / "eval"),
        ]
    )
    evaluated = json.loads((tmp_path / "eval" / "test_metrics.json").read_text())
    # Same split, seed and batch size as the final scoring after training: the reloaded checkpoint agrees.
    assert evaluated["confusion_matrix"] == metrics["confusion_matrix"]
    assert (tmp_path / "eval" / "test_confusion_matrix.png").exists()

    # Without --output-dir the metrics are printed, and no file or temporary folder is left behind.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    capsys.readouterr()
    main(["evaluate", str(output), "--dataset", str(faces), "--batch-size", "8"])
    assert f"accuracy {100 * metrics['accuracy']:.2f} %" in capsys.readouterr().out
    assert list(scratch.iterdir()) == []

    image = faces / "test" / "sad" / "0.png"
    main(["predict", str(output), str(image), "--top-k", "2", "--json"])
    predictions = json.loads(capsys.readouterr().out)
    assert predictions[0]["image"] == str(image)
    scores = [entry["score"] for entry in predictions[0]["predictions"]]
    assert len(scores) == 2
    assert scores[0] >= scores[1]
    assert {entry["label"] for entry in predictions[0]["predictions"]} <= set(config["level_labels"][0])

    # An unreadable file is reported, and the readable files still get their predictions.
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(output), str(broken), str(image), "--top-k", "2", "--json"])
    assert exit_info.value.code == 1
    reported = json.loads(capsys.readouterr().out)
    assert reported[0]["image"] == str(broken)
    assert reported[0]["error"].startswith(f"Could not read image {broken}")
    assert reported[1] == predictions[0]


def test_train_on_flat_folder_with_word_alias(tmp_path, caplog):
    # One folder per class and no splits, and "hygge" is not in the shipped word vectors.
    folder = tmp_path / "flat"
    for label_index, label in enumerate(["happy", "sad", "hygge"]):
        for i in range(10):
            _write_image(folder / label / f"{i}.png", "rgb", 60 * label_index + 3 * i)
    output = tmp_path / "run"
    command = ["train", "--dataset", str(folder), "--output-dir", str(output), *TINY_TRAIN]
    with pytest.raises(SystemExit):
        main(command)
    assert "['hygge'] are missing from the word vectors" in caplog.text
    assert "--word-alias word=synonym" in caplog.text

    main([*command, "--word-alias", "hygge=content"])
    metrics = json.loads((output / "metrics.json").read_text())
    # Without validation and test splits, 10 % of the 30 images are held out, one image of each class.
    assert metrics["split"] == "validation"
    assert metrics["num_images"] == 3
    assert sorted(sum(row) for row in metrics["confusion_matrix"]) == [1, 1, 1]
    assert (output / "confusion_matrix.png").exists()


def test_train_with_label_tree_file(faces, tmp_path, caplog):
    tree = tmp_path / "tree.json"
    tree.write_text(
        json.dumps({"labels": ["sad", "angry", "happy"], "parent_of": {"sad": "low", "angry": "low", "happy": "high"}})
    )
    output = tmp_path / "run"
    main(["train", "--dataset", str(faces), "--output-dir", str(output), "--label-tree", str(tree), *TINY_TRAIN])
    config = json.loads((output / "config.json").read_text())
    assert config["level_labels"] == [["sad", "angry", "happy"], ["low", "high"]]
    assert config["use_hierarchy_bias"] is True
    # Random backbone weights, RALD blocks and the default SGD make the run warn and name the AdamW options.
    assert "Training a randomly initialised test_efficientnet with SGD" in caplog.text
    assert "--optimizer adamw_torch" in caplog.text


def test_rald_l_drops_tree(faces, tmp_path):
    output = tmp_path / "run"
    main(
        [
            "train",
            "--dataset",
            str(faces),
            "--output-dir",
            str(output),
            "--preset",
            "fer2013-valence",
            "--rald-l",
            *TINY_TRAIN,
        ]
    )
    config = json.loads((output / "config.json").read_text())
    assert config["level_labels"] == [["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]]
    assert config.get("use_hierarchy_bias", True) is False


def test_train_in_bf16_channels_last(faces, tmp_path):
    output = tmp_path / "run"
    main(["train", "--dataset", str(faces), "--output-dir", str(output), "--bf16", "--channels-last", *TINY_TRAIN])
    (state,) = output.glob("checkpoint-*/training_args.bin")
    args = torch.load(state, weights_only=False)
    assert args.bf16
    assert args.channels_last
    assert args.use_cpu
    metrics = json.loads((output / "metrics.json").read_text())
    assert 0 <= metrics["accuracy"] <= 1
    # The saved weights are ordinary float32 tensors that a plain evaluation loads.
    model = RALDForImageClassification.from_pretrained(output)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_unknown_dataset_label_exits_with_message(faces, tmp_path, caplog):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "train",
                "--dataset",
                str(faces),
                "--output-dir",
                str(tmp_path / "run"),
                "--preset",
                "rafdb",
                "--label-tree",
                "x",
            ]
        )
    assert exit_info.value.code == 2  # argparse: --preset and --label-tree exclude each other
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "train",
                "--dataset",
                str(faces),
                "--output-dir",
                str(tmp_path / "run"),
                "--preset",
                "fg-emotions",
                *TINY_TRAIN,
            ]
        )
    assert exit_info.value.code == 1
    assert "are not in the label space" in caplog.text


def test_evaluate_on_unknown_labels_suggests_fine_tuning(faces, tmp_path, caplog):
    output = tmp_path / "run"
    main(["train", "--dataset", str(faces), "--output-dir", str(output), *TINY_TRAIN])
    other = tmp_path / "other"
    for label_index, label in enumerate(["happy", "surprised"]):
        _write_image(other / "test" / label / "0.png", "rgb", 60 * label_index)
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(output), "--dataset", str(other)])
    assert exit_info.value.code == 1
    assert "['surprised'] of the dataset are not among the labels of checkpoint" in caplog.text
    assert f"rald-hf train --init-from {output}" in caplog.text


def test_set_requires_key_value():
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        main(["train", "--dataset", "x", "--output-dir", "y", "--set", "hidden_size"])


@pytest.mark.parametrize("fraction", ["-0.1", "1"])
def test_validation_fraction_is_checked(fraction, tmp_path, caplog):
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "x", "--output-dir", str(tmp_path / "run"), "--validation-fraction", fraction])
    assert f"validation_fraction must be at least 0 and below 1, got {float(fraction)}" in caplog.text


def test_word_alias_requires_pair():
    with pytest.raises(SystemExit, match="WORD=SUBSTITUTE"):
        main(["train", "--dataset", "x", "--output-dir", "y", "--word-alias", "hygge"])


def test_evaluate_flip_averages_mirrored_images(tmp_path):
    torch.manual_seed(3)
    model = RALDForImageClassification(tiny_config("fer2013-valence"))
    model.classifier.weight.data *= 30  # spread the untrained logits so that predictions differ between images
    model.save_pretrained(tmp_path / "model")
    RALDImageProcessor(image_size=35).save_pretrained(tmp_path / "model")
    labels = list(model.config.id2label.values())
    # Images whose left and right halves differ, so that mirroring changes the model's input.
    rng = np.random.default_rng(7)
    paths, names = [], []
    for label in CLASSES:
        for i in range(5):
            pixels = rng.integers(0, 256, size=(33, 37, 3), dtype=np.uint8)
            pixels[:, :18] //= 4
            path = tmp_path / "faces" / "test" / label / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
            paths.append(path)
            names.append(label)

    def probabilities(images):
        top = predict_images(tmp_path / "model", images, top_k=len(labels), relation_mode="self")
        return np.array([[dict(row)[label] for label in labels] for row in top])

    plain = probabilities(paths)
    mirrored = probabilities([ImageOps.mirror(read_image(path)) for path in paths])
    averaged = (plain + mirrored) / 2
    assert (averaged.argmax(-1) != plain.argmax(-1)).any(), "the flip must change a prediction to be tested"

    targets = [labels.index(name) for name in names]
    for flip, predicted in ((False, plain.argmax(-1)), (True, averaged.argmax(-1))):
        scored = evaluate_checkpoint(
            tmp_path / "model", tmp_path / "faces", split="test", relation_mode="self", flip=flip, progress=False
        )
        assert scored["confusion_matrix"] == confusion_matrix(targets, predicted, labels=range(len(labels))).tolist()
        assert scored["flip"] is flip


@pytest.mark.data
def test_fer2013_end_to_end(data_dir, tmp_path):
    """Train a few steps on real FER2013 images from pretrained weights, score, reload and predict."""
    output = tmp_path / "fer"
    weights = data_dir / "weights" / "mobilenetv2_100.in1k.safetensors"
    main(
        [
            "train",
            "--dataset", str(data_dir / "fer2013"),
            "--output-dir", str(output),
            "--preset", "fer2013",
            "--rald-l",
            "--backbone", "mobilenetv2_100",
            "--backbone-weights", str(weights),
            "--image-size", "48",
            "--epochs", "2",
            "--batch-size", "64",
            "--max-train-samples", "320",
            "--max-eval-samples", "192",
            "--no-progress",
        ]
    )  # fmt: skip
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["num_images"] == 192
    assert sum(metrics["support"].values()) == 192
    assert metrics["support"]["happy"] > metrics["support"]["disgust"]
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "confusion_matrix.png"):
        assert (output / name).exists(), f"{name} missing"
    with Image.open(output / "confusion_matrix.png") as figure:
        assert figure.size[0] > 300

    reloaded = tmp_path / "reloaded"
    main(
        [
            "evaluate", str(output),
            "--dataset", str(data_dir / "fer2013"),
            "--split", "test",
            "--batch-size", "64",
            "--max-eval-samples", "192",
            "--output-dir", str(reloaded),
        ]
    )  # fmt: skip
    again = json.loads((reloaded / "test_metrics.json").read_text())
    assert again["confusion_matrix"] == metrics["confusion_matrix"]
    assert again["accuracy"] == metrics["accuracy"]


def test_misspelt_set_field_is_rejected():
    with pytest.raises(SystemExit, match="'atention_residual' \\(did you mean 'attention_residual'\\?\\)"):
        main(["train", "--dataset", "x", "--output-dir", "y", "--set", "atention_residual=false"])


def test_missing_checkpoint_names_it(tmp_path, caplog):
    missing = tmp_path / "runs" / "nothere"
    with pytest.raises(SystemExit):
        main(["predict", str(missing), str(tmp_path / "face.png")])
    # Images are read before the model loads, so a missing image is reported first.
    assert "Could not read image" in caplog.text
    Image.new("L", (8, 8)).save(tmp_path / "face.png")
    caplog.clear()
    with pytest.raises(SystemExit):
        main(["predict", str(missing), str(tmp_path / "face.png")])
    assert f"Checkpoint {missing} not found" in caplog.text


def test_missing_backbone_weights_file(faces, tmp_path, caplog):
    with pytest.raises(SystemExit):
        main(
            [
                "train",
                "--dataset",
                str(faces),
                "--output-dir",
                str(tmp_path / "run"),
                "--backbone-weights",
                "/nope.safetensors",
                *TINY_TRAIN,
            ]
        )
    assert "Backbone weights file /nope.safetensors not found" in caplog.text


def test_failed_start_leaves_no_output_folder(tmp_path, caplog):
    output = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(["train", "--dataset", str(tmp_path / "nope"), "--output-dir", str(output), *TINY_TRAIN])
    assert "nope not found" in caplog.text
    assert not output.exists()


def test_evaluate_checks_dataset_first(tmp_path, caplog):
    with pytest.raises(SystemExit):
        main(["evaluate", str(tmp_path / "nothere"), "--dataset", str(tmp_path / "nope"), "--no-progress"])
    assert "nope not found" in caplog.text
    assert "Checkpoint" not in caplog.text


def test_explicit_missing_validation_split(faces, tmp_path, caplog):
    with pytest.raises(SystemExit):
        main(
            [
                "train",
                "--dataset",
                str(faces),
                "--output-dir",
                str(tmp_path / "run"),
                "--validation-split",
                "valid",
                *TINY_TRAIN,
            ]
        )
    assert "Validation split 'valid' not found" in caplog.text


def test_top_k_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "ckpt", "face.png", "--top-k", "0"])
    assert "must be at least 1" in capsys.readouterr().err
