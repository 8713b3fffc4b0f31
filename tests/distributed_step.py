"""One RALDTrainer step on a fixed global batch of FER2013 images, in one process or under torchrun.

Used by tests/test_distributed.py: the process of rank 0 saves the parameters after the step and the logged
loss, so that runs with one and with two processes can be compared.

Usage:
    python tests/distributed_step.py DATA_DIR OUTPUT SCOPE GLOBAL_BATCH
    torchrun --nproc_per_node 2 tests/distributed_step.py DATA_DIR OUTPUT SCOPE GLOBAL_BATCH
"""

import os
import sys
import tempfile
from pathlib import Path

import torch
from datasets import load_dataset

from rald_hf import LabelSpace, RALDConfig, RALDForImageClassification, RALDImageProcessor
from rald_hf.training import RALDTrainer, RALDTrainingArguments

# Run as a script, this file is outside the tests package; make the package importable for its helpers.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.utils import ImageList  # noqa: E402


def main() -> None:
    data_dir, output, scope, global_batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(1)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))

    space = LabelSpace.from_preset("fer2013")
    rows = load_dataset(os.path.join(data_dir, "fer2013"), split="test").shuffle(seed=0).select(range(global_batch))
    processor = RALDImageProcessor(image_size=32)
    images = processor([row["image"] for row in rows])["pixel_values"]
    mapping = torch.tensor(space.index_of_names(rows.features["label"].names))
    labels = mapping[torch.tensor(rows["label"])]

    torch.manual_seed(0)
    # ConvNeXt has no BatchNorm, whose batch statistics would differ by construction between the runs.
    config = RALDConfig.from_label_space(
        space,
        backbone="test_convnext",
        image_size=32,
        hidden_size=30,
        num_attention_heads=3,
        hidden_dropout_prob=0.0,
        num_neighbors=3,
        relation_scope=scope,
    )
    model = RALDForImageClassification(config)
    with tempfile.TemporaryDirectory() as work_dir:
        args = RALDTrainingArguments(
            output_dir=work_dir,
            per_device_train_batch_size=global_batch // world_size,
            max_steps=1,
            learning_rate=0.5,
            optim="sgd",
            lr_scheduler_type="constant",
            weight_decay=0.0,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            use_cpu=True,
            ddp_backend="gloo" if world_size > 1 else None,
            seed=3,
        )
        trainer = RALDTrainer(model=model, args=args, train_dataset=ImageList(images, labels))
        trainer.train()
        if trainer.is_world_process_zero():
            log = next(entry for entry in trainer.state.log_history if "loss" in entry)
            parameters = {name: p.detach().clone() for name, p in model.named_parameters()}
            torch.save({"parameters": parameters, "log": log, "world_size": world_size}, output)


if __name__ == "__main__":
    main()
