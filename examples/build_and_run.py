"""Build an FG-Emotions RALD model, run it on random images and save it as a checkpoint with its image processor.

Usage:
    python examples/build_and_run.py [OUTPUT_DIR]
"""

import sys

import torch

from rald_hf import LabelSpace, RALDConfig, RALDForImageClassification, RALDImageProcessor


def main() -> None:
    output_dir = sys.argv[1] if len(sys.argv) > 1 else "rald-fg-untrained"

    space = LabelSpace.from_preset("fg-emotions")
    config = RALDConfig.from_label_space(space, backbone="resnet18", image_size=112)
    model = RALDForImageClassification(config).eval()
    print(f"{space}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")

    images = torch.randn(8, 3, config.image_size, config.image_size)
    with torch.no_grad():
        outputs = model(images)
    print("logits", tuple(outputs.logits.shape), "relations", tuple(outputs.image_relations.shape))
    print("first image:", config.id2label[int(outputs.logits[0].argmax())], "(untrained, so arbitrary)")

    # The image processor resizes to the model's image size with the backbone's mean and std; pipeline()
    # and rald-hf predict read it from the checkpoint folder.
    model.save_pretrained(output_dir)
    RALDImageProcessor.from_backbone(model.rald.backbone, image_size=config.image_size).save_pretrained(output_dir)
    print(f"Saved to {output_dir}")


if __name__ == "__main__":
    main()
