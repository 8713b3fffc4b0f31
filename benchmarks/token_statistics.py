"""Statistics of the image tokens of trained RALD checkpoints and of the change each attention block makes.

For each checkpoint, on 512 shuffled FER2013 validation images in transductive batches of 128:
- outlier channels: the mean absolute value of the two largest channels of the image tokens (the projected
  backbone features that enter ITRR), divided by that of the median channel;
- image-specific share: the mean distance of each image's final token from the batch mean token, divided by
  the length of the batch mean token (small values mean the final tokens differ little between images);
- ITRR and LGIFO change: mean of |block output - block input| / |block input| over images (near zero means
  the trained model barely uses the block).

Usage:
    python benchmarks/token_statistics.py --checkpoints runs/benchmarks/resnet18-scratch-64-* --write-docs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from datasets import Dataset

from rald_hf import RALDImageProcessor
from rald_hf.training import load_image_dataset
from rald_hf.training.data import find_columns
from rald_hf.training.run import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import provenance, require_data_dir, write_section  # noqa: E402


def token_statistics(checkpoint: Path, split: Dataset, images: int = 512, batch_size: int = 128) -> dict[str, float]:
    """Measure outlier channels, the image-specific share and the change made by each block."""
    model = load_checkpoint(checkpoint).eval()
    processor = RALDImageProcessor.from_pretrained(str(checkpoint))
    image_column, _ = find_columns(split)
    sums = {"outliers": 0.0, "image_specific": 0.0, "ITRR": 0.0, "LGIFO": 0.0}
    batches = 0
    for start in range(0, images, batch_size):
        pixels = processor(split[start : start + batch_size][image_column])["pixel_values"]
        with torch.inference_mode():
            output = model.rald(pixels, relation_mode="transductive", output_hidden_states=True)
        tokens, related, guided = output.hidden_states
        channel_size = tokens.abs().mean(0)
        sums["outliers"] += (channel_size.topk(2).values.mean() / channel_size.median()).item()
        final = output.last_hidden_state
        shared = final.mean(0)
        sums["image_specific"] += ((final - shared).norm(dim=-1).mean() / shared.norm()).item()
        sums["ITRR"] += ((related - tokens).norm(dim=-1) / tokens.norm(dim=-1)).mean().item()
        sums["LGIFO"] += ((guided - related).norm(dim=-1) / related.norm(dim=-1)).mean().item()
        batches += 1
    return {name: value / batches for name, value in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True, help="trained RALD checkpoint folders")
    parser.add_argument("--images", type=int, default=512, help="validation images to measure on")
    parser.add_argument("--results", default=str(Path(__file__).with_name("results") / "token_statistics.json"))
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()
    split = load_image_dataset(require_data_dir() / "fer2013")["validation"].shuffle(seed=0).select(range(args.images))

    results = {}
    for checkpoint in map(Path, args.checkpoints):
        results[checkpoint.name] = token_statistics(checkpoint, split, args.images)
        print(checkpoint.name, results[checkpoint.name], flush=True)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=2) + "\n")

    lines = [
        "| checkpoint | largest two channels / median channel of the image tokens | image-specific share of the "
        "final tokens | ITRR change | LGIFO change |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, values in results.items():
        lines.append(
            f"| `{name}` | {values['outliers']:.1f} | {values['image_specific']:.2f} | {values['ITRR']:.2f} "
            f"| {values['LGIFO']:.2f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write_docs:
        body = (
            provenance()
            + f"{args.images} validation images (validation.parquet, shuffled with seed 0), transductive batches of "
            "128. See the script's docstring for the definition of each column.\n\n" + table
        )
        print(f"Wrote {write_section('token_statistics', body)}")


if __name__ == "__main__":
    main()
