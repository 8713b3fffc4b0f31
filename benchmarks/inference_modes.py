"""PrivateTest accuracy of trained checkpoints in each inference relation mode.

For each checkpoint (for example the RALD-L runs of benchmarks/train_fer2013.py, which store a reference bank)
the FER2013 test split is scored in: reference mode (batch-independent); transductive mode with shuffled
batches of 128 (the published protocol); transductive mode with the split's stored, class-sorted order, which
shows how batch attention leaks labels; transductive mode with batches of one image; and self mode (no
cross-image attention). Baseline checkpoints, scored once, give the reference point without ITRR.

Usage:
    python benchmarks/inference_modes.py --checkpoints runs/benchmarks/mnv2-64-rald-l-seed* \\
        --baselines runs/benchmarks/mnv2-64-baseline-seed* --write-docs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from rald_hf.training import evaluate_checkpoint, load_image_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import provenance, require_data_dir, write_section  # noqa: E402

# name: (relation mode, batch size, shuffled order)
PROTOCOLS: dict[str, tuple[str, int, bool]] = {
    "reference bank": ("reference", 128, True),
    "transductive, shuffled batches of 128": ("transductive", 128, True),
    "transductive, class-sorted batches of 128": ("transductive", 128, False),
    "transductive, batches of 1": ("transductive", 1, True),
    "self (no cross-image attention)": ("self", 128, True),
}


def score(checkpoint: Path, dataset: Any, mode: str | None, batch_size: int, shuffle: bool) -> float:
    metrics = evaluate_checkpoint(
        checkpoint, dataset, split="test", batch_size=batch_size, relation_mode=mode, shuffle=shuffle, seed=0
    )
    return 100 * metrics["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True, help="RALD checkpoints with a reference bank")
    parser.add_argument("--baselines", nargs="*", default=[], help="baseline checkpoints (no ITRR)")
    parser.add_argument("--results", default=str(Path(__file__).with_name("results") / "inference_modes.json"))
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()
    dataset = load_image_dataset(require_data_dir() / "fer2013")

    results: dict[str, dict[str, float]] = {}
    for checkpoint in map(Path, args.checkpoints):
        results[checkpoint.name] = {
            name: score(checkpoint, dataset, mode, batch, shuffle) for name, (mode, batch, shuffle) in PROTOCOLS.items()
        }
        print(checkpoint.name, results[checkpoint.name], flush=True)
    baselines = {Path(path).name: score(Path(path), dataset, None, 128, True) for path in args.baselines}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps({"rald": results, "baselines": baselines}, indent=2) + "\n")

    reference = np.array([r["reference bank"] for r in results.values()])
    lines = [
        "| evaluation | PrivateTest accuracy, mean over checkpoints (%) | per checkpoint | difference to reference "
        "mode (points) |",
        "| --- | --- | --- | --- |",
    ]
    for name in PROTOCOLS:
        values = np.array([r[name] for r in results.values()])
        difference = values - reference
        spread = f" ± {difference.std(ddof=1):.2f}" if len(difference) > 1 else ""
        per = ", ".join(f"{v:.2f}" for v in values)
        lines.append(f"| RALD-L, {name} | {values.mean():.2f} | {per} | {difference.mean():+.2f}{spread} |")
    if baselines:
        values = np.array(list(baselines.values()))
        per = ", ".join(f"{v:.2f}" for v in values)
        lines.append(f"| baseline (no ITRR) | {values.mean():.2f} | {per} | {values.mean() - reference.mean():+.2f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write_docs:
        checkpoints = ", ".join(f"`{name}`" for name in results)
        body = (
            provenance()
            + f"Checkpoints: {checkpoints} (each with its reference bank of training features); the test split is "
            "test.parquet (PrivateTest, 3,589 images), shuffled with seed 0 where shuffled.\n\n" + table
        )
        print(f"Wrote {write_section('inference_modes', body)}")


if __name__ == "__main__":
    main()
