"""Start a FER2013 RALD-L model from an FG-Emotions RALD checkpoint and fine-tune it briefly.

The FG-Emotions checkpoint here is a freshly built model saved to disk (no FG-Emotions weights are
published); replace SOURCE with the folder or Hub id of a trained one.

Usage:
    python examples/finetune_new_labels.py DATA_DIR [OUTPUT_DIR]

DATA_DIR must contain fer2013/ (train/validation/test parquet files) and weights/mobilenetv2_100.in1k.safetensors.
"""

import sys
from pathlib import Path

import torch

from rald_hf import LabelSpace, RALDConfig, RALDForImageClassification
from rald_hf.training import predict_images, train_rald


def main() -> None:
    data_dir = Path(sys.argv[1])
    output_dir = Path(sys.argv[2] if len(sys.argv) > 2 else "runs/finetune-example")

    # 1. An FG-Emotions RALD checkpoint: 33 fine labels under 6 coarse and 2 valence labels.
    source = output_dir / "fg-emotions-source"
    torch.manual_seed(0)
    config = RALDConfig.from_label_space(
        LabelSpace.from_preset("fg-emotions"), backbone="mobilenetv2_100", image_size=48
    )
    fg_model = RALDForImageClassification(config)
    fg_model.load_backbone_weights(str(data_dir / "weights" / "mobilenetv2_100.in1k.safetensors"))
    fg_model.save_pretrained(source)

    # 2. The same weights, started for FER2013's seven labels without a tree (RALD-L).
    fer_space = LabelSpace.from_preset("fer2013")
    fer_model = RALDForImageClassification.from_pretrained(source, label_space=fer_space)
    same = torch.equal(fer_model.rald.backbone.conv_stem.weight, fg_model.rald.backbone.conv_stem.weight)
    print(f"new labels: {list(fer_model.config.id2label.values())}; backbone carried over: {same}")

    # 3. Fine-tune through the same path as `rald-hf train --init-from`.
    result = train_rald(
        data_dir / "fer2013",
        output_dir / "fer2013",
        label_space=fer_space,
        rald_l=True,
        init_from=source,
        training_args={"num_train_epochs": 1, "per_device_train_batch_size": 64, "learning_rate": 0.03},
        max_train_samples=640,
        max_eval_samples=256,
        reference_bank_size=64,
    )
    print(f"test accuracy after a short fine-tuning: {100 * result.metrics['accuracy']:.1f} %")

    # 4. Predict FER2013 labels by name.
    from datasets import load_dataset

    face = load_dataset(str(data_dir / "fer2013"), split="test")[0]["image"]
    for label, score in predict_images(output_dir / "fer2013", [face], top_k=3)[0]:
        print(f"  {label:<10} {score:.3f}")


if __name__ == "__main__":
    main()
