"""Hub workflows: model cards, uploads to a stand-in Hub, loading by Hub id, and new label sets."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from rald_hf import LabelSpace, RALDConfig, RALDForImageClassification, RALDImageProcessor
from rald_hf.hub import build_model_card

from .hub_server import HubStandIn
from .utils import ImageList, tiny_config, tiny_images

METRICS = {
    "accuracy": 0.6123,
    "macro_f1": 0.5012,
    "accuracy_coarse": 0.7,
    "per_class_accuracy": {"anxiety": 0.5},
    "support": {"anxiety": 4},
    "split": "test",
    "num_images": 40,
    "relation_mode": "reference",
}


def _metadata(card_text: str) -> dict:
    assert card_text.startswith("---\n")
    return yaml.safe_load(card_text.split("---\n", 2)[1])


def _checkpoint(tmp_path, with_bank: bool = True, **overrides):
    torch.manual_seed(0)
    model = RALDForImageClassification(tiny_config(**overrides))
    if with_bank:
        labels = torch.arange(20) % model.config.num_labels
        model.build_reference_bank(ImageList(tiny_images(20, seed=2), labels), size=9, labels=labels.tolist())
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    RALDImageProcessor(image_size=35).save_pretrained(folder)
    return model.eval(), folder


def test_card_with_metrics(tmp_path):
    model, _ = _checkpoint(tmp_path)
    card = str(build_model_card(model, METRICS, {"epochs": 3}, dataset="fer2013"))
    metadata = _metadata(card)
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-classification"
    assert metadata["license"] == "other"
    assert "rald" in metadata["tags"]
    assert metadata["datasets"] == ["fer2013"]
    results = metadata["model-index"][0]["results"]
    values = {metric["type"]: metric["value"] for result in results for metric in result["metrics"]}
    assert values == {"accuracy": 0.6123, "macro_f1": 0.5012}
    assert "| 0 | anxiety | fear | unpleasant |" in card
    assert "| accuracy | 61.23 % |" in card
    assert "| accuracy coarse | 70.00 % |" in card
    assert "reference bank of 9 training-image features" in card
    assert "research use only" in card
    assert "information derived from those faces" in card
    assert "Acta Electronica Sinica" in card
    assert "2024, no. 10" in card
    assert "epochs: 3" in card


def test_card_without_metrics_or_bank(tmp_path):
    model, _ = _checkpoint(tmp_path, with_bank=False, space="fer2013")
    card = str(build_model_card(model))
    metadata = _metadata(card)
    assert "model-index" not in metadata
    assert "No evaluation results were recorded" in card
    assert "no reference bank" in card
    assert "RALD-L" in card
    assert "information derived from those faces" not in card


def _hub_environment(hub: HubStandIn, tmp_path) -> dict:
    # The stand-in needs real HTTP, so the upload runs without HF_HUB_OFFLINE, which would block every URL.
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_TOKEN="hf_stand_in", HF_HOME=str(tmp_path / "hf_home"))
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    return env


def _check_upload(commit: dict, model: RALDForImageClassification, tmp_path) -> None:
    files = commit["files"]
    expected = {
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "configuration_rald.py",
        "modeling_rald.py",
        "image_processing_rald.py",
    }
    assert expected <= set(files), f"missing uploads: {expected - set(files)}"
    readme = files["README.md"].decode()
    assert "This model card has been automatically generated" not in readme
    assert "## Labels" in readme
    assert "## Training data and terms" in readme
    folder = tmp_path / "downloaded"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    loaded = RALDForImageClassification.from_pretrained(folder).eval()
    images = tiny_images(4, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).logits, model(images).logits, rtol=0, atol=1e-6)
    assert json.loads(files["preprocessor_config.json"])["image_size"] == 35


def test_cli_push_uploads_card_and_files(tmp_path):
    model, folder = _checkpoint(tmp_path)
    (folder / "metrics.json").write_text(json.dumps(METRICS))
    with HubStandIn() as hub:
        result = subprocess.run(
            [sys.executable, "-m", "rald_hf.cli", "push", str(folder), "org/rald-fg", "--dataset-name", "fer2013"],
            env=_hub_environment(hub, tmp_path),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert hub.unexpected == []
        assert hub.created == ["org/rald-fg"]
        assert len(hub.commits) == 1
        commit = hub.commits[0]
    assert commit["repo_id"] == "org/rald-fg"
    _check_upload(commit, model, tmp_path)
    metadata = _metadata(commit["files"]["README.md"].decode())
    assert metadata["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.6123


def test_model_push_to_hub_uses_rald_card(tmp_path):
    model, folder = _checkpoint(tmp_path)
    script = textwrap.dedent(
        """
        import sys
        from rald_hf import RALDForImageClassification
        model = RALDForImageClassification.from_pretrained(sys.argv[1])
        model.push_to_hub("org/rald-fg-copy", commit_message="Add weights")
        """
    )
    with HubStandIn() as hub:
        result = subprocess.run(
            [sys.executable, "-c", script, str(folder)],
            env=_hub_environment(hub, tmp_path),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert hub.unexpected == []
        commit = hub.commits[0]
    assert commit["summary"] == "Add weights"
    _check_upload(commit, model, tmp_path)


def _hub_cache(tmp_path, folder, repo_id: str = "org/rald-fg"):
    """Lay a checkpoint out as huggingface_hub's cache does: models--org--name/{refs,snapshots}."""
    revision = "a" * 40
    repo = tmp_path / "hf_home" / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return tmp_path / "hf_home"


_LOAD_BY_ID = textwrap.dedent(
    """
    import sys
    block, output = sys.argv[1], sys.argv[2]
    if block == "block":
        sys.modules["rald_hf"] = None
    else:
        import rald_hf  # noqa: F401
    import torch
    from transformers import AutoModel, AutoModelForImageClassification, AutoImageProcessor

    remote = block == "block"
    images = torch.load(sys.argv[3])
    classifier = AutoModelForImageClassification.from_pretrained("org/rald-fg", trust_remote_code=remote).eval()
    base = AutoModel.from_pretrained("org/rald-fg", trust_remote_code=remote).eval()
    processor = AutoImageProcessor.from_pretrained("org/rald-fg", trust_remote_code=remote)
    with torch.no_grad():
        logits = classifier(images).logits
        features = base(images).last_hidden_state
    torch.save({"logits": logits, "features": features, "module": type(classifier).__module__,
                "processor": type(processor).__name__, "size": processor.image_size}, output)
    """
)


@pytest.mark.parametrize("mode", ["installed", "block"])
def test_load_by_hub_id_offline(tmp_path, mode):
    model, folder = _checkpoint(tmp_path)
    hf_home = _hub_cache(tmp_path, folder)
    images = tiny_images(5, seed=8)
    torch.save(images, tmp_path / "images.pt")
    with torch.no_grad():
        expected = model(images)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    if mode == "block":
        env["PYTHONPATH"] = ""
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_BY_ID, mode, str(tmp_path / "out.pt"), str(tmp_path / "images.pt")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(loaded["logits"], expected.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded["features"], expected.last_hidden_state, rtol=0, atol=1e-6)
    assert loaded["processor"] == "RALDImageProcessor"
    assert loaded["size"] == 35
    if mode == "block":
        assert loaded["module"].startswith("transformers_modules.")
    else:
        assert loaded["module"] == "rald_hf.modeling_rald"


def test_other_label_set_needs_label_space(tmp_path):
    _, folder = _checkpoint(tmp_path, with_bank=False, space="fer2013")
    rafdb = RALDConfig.from_label_space(LabelSpace.from_preset("rafdb"), **{"backbone": "test_efficientnet"})
    # Same number of classes, other order: still another label set.
    with pytest.raises(
        ValueError, match=r"predicts the labels \['angry', .*config asks for \['surprise', .*label_space="
    ):
        RALDForImageClassification.from_pretrained(folder, config=rafdb)
    with pytest.raises(ValueError, match="instead of num_labels=..., pass label_space"):
        RALDForImageClassification.from_pretrained(folder, num_labels=7)


def test_same_label_config_loads(tmp_path):
    model, folder = _checkpoint(tmp_path, with_bank=False, space="fer2013")
    loaded = RALDForImageClassification.from_pretrained(folder, config=RALDConfig.from_pretrained(folder))
    assert loaded.config.id2label == model.config.id2label


def test_for_label_space_keeps_backbone_and_attention(tmp_path):
    source, folder = _checkpoint(tmp_path)
    space = LabelSpace.from_preset("fer2013")
    target = RALDForImageClassification.from_pretrained(folder, label_space=space)
    assert target.config.id2label == dict(enumerate(space.labels))
    assert target.config.use_hierarchy_bias is False
    assert target.rald.label_encoder.hierarchy_bias is None
    assert target.config.reference_bank_size == 0
    assert target.classifier.out_features == 7
    source_state = source.state_dict()
    for key, value in target.state_dict().items():
        if key.startswith(
            ("rald.backbone.", "rald.itrr.", "rald.lgifo.", "rald.image_proj.", "rald.label_encoder.layer.")
        ):
            torch.testing.assert_close(value, source_state[key], msg=f"{key} was not carried over")
    assert not torch.equal(
        target.rald.label_encoder.label_embeddings[:7], source.rald.label_encoder.label_embeddings[:7]
    )
    assert all(p.requires_grad for p in target.rald.backbone.parameters())


def test_for_label_space_rejects_architecture_changes(tmp_path):
    _, folder = _checkpoint(tmp_path, with_bank=False)
    model = RALDForImageClassification.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"\['hidden_size'\] define the architecture"):
        model.for_label_space(LabelSpace.from_preset("fer2013"), hidden_size=60)


@pytest.mark.data
def test_fine_tune_fg_emotions_checkpoint_on_fer2013(data_dir, tmp_path):
    """An FG-Emotions checkpoint becomes a FER2013 RALD-L model through --init-from and trains a few steps."""
    from rald_hf.cli import main

    source, folder = _checkpoint(tmp_path)
    output = tmp_path / "fer"
    main(
        [
            "train", "--dataset", str(data_dir / "fer2013"), "--output-dir", str(output),
            "--init-from", str(folder), "--preset", "fer2013", "--rald-l",
            "--epochs", "1", "--batch-size", "32", "--max-train-samples", "96", "--max-eval-samples", "64",
            "--reference-bank-size", "16", "--no-progress",
        ]
    )  # fmt: skip
    config = json.loads((output / "config.json").read_text())
    assert config["level_labels"] == [list(LabelSpace.from_preset("fer2013").labels)]
    assert config["backbone"] == "test_efficientnet"
    assert config["reference_bank_size"] == 16
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["started_from"] == str(folder)
    tuned = RALDForImageClassification.from_pretrained(output).eval()
    moved = [
        name
        for name, value in tuned.rald.backbone.state_dict().items()
        if value.is_floating_point() and not torch.equal(value, source.rald.backbone.state_dict()[name])
    ]
    assert moved, "training did not change the backbone, so it was frozen or not trained"
    from datasets import load_dataset

    from rald_hf.training import predict_images

    face = load_dataset(str(data_dir / "fer2013"), split="test")[0]["image"]
    predictions = predict_images(output, [face], top_k=7)
    assert {label for label, _ in predictions[0]} == set(LabelSpace.from_preset("fer2013").labels)
    assert sum(score for _, score in predictions[0]) == pytest.approx(1.0, abs=1e-4)
