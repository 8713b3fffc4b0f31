"""Checkpoints load through trust_remote_code in a process where rald_hf cannot be imported."""

import os
import subprocess
import sys
import textwrap

import torch

from rald_hf import RALDForImageClassification

from .utils import tiny_config, tiny_images

# Runs in a fresh interpreter. Setting sys.modules["rald_hf"] to None makes every import of it fail.
_LOADER = textwrap.dedent(
    """
    import sys
    sys.modules["rald_hf"] = None
    try:
        import rald_hf
    except ImportError:
        pass
    else:
        raise SystemExit("rald_hf is importable; the test would not check remote code")

    import torch
    from transformers import AutoModel, AutoModelForImageClassification

    folder, images_path, output_path = sys.argv[1:4]
    images = torch.load(images_path)
    classifier = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = classifier(images).logits
        features = base(images).last_hidden_state
    torch.save(
        {
            "logits": logits,
            "features": features,
            "classifier_module": type(classifier).__module__,
            "base_class": type(base).__name__,
            "labels": classifier.config.id2label,
        },
        output_path,
    )
    """
)


def test_remote_code_loads_without_rald_hf(tmp_path):
    torch.manual_seed(0)
    model = RALDForImageClassification(tiny_config()).eval()
    images = tiny_images()
    with torch.no_grad():
        expected = model(images)
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    torch.save(images, tmp_path / "images.pt")

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", _LOADER, str(checkpoint), str(tmp_path / "images.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"remote-code loading failed:\n{result.stderr[-3000:]}"

    loaded = torch.load(tmp_path / "out.pt")
    assert loaded["classifier_module"].startswith("transformers_modules."), loaded["classifier_module"]
    assert loaded["base_class"] == "RALDModel"
    assert loaded["labels"] == model.config.id2label
    # The outputs of the other process have differed by up to 7e-8, so they get a float32 tolerance.
    torch.testing.assert_close(loaded["logits"], expected.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded["features"], expected.last_hidden_state, rtol=0, atol=1e-6)
