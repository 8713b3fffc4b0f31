"""Accuracy of RALD variants against a linear-head baseline on FER2013, over several seeds.

Every row uses the same recipe and budget: a stratified, seeded training subset (7,245 images, the size of
FG-Emotions' training set, by default), the checkpoint with the best accuracy on validation.parquet
(PublicTest), scored on test.parquet (PrivateTest) with shuffled evaluation batches. Each run is stored as
JSON under --runs-dir, so an interrupted benchmark resumes where it stopped, and the table is rebuilt from
all stored runs.

Usage:
    python benchmarks/train_fer2013.py --variants baseline rald-l --seeds 0 1 2 --epochs 6 --write-docs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rald_hf.training import evaluate_checkpoint, train_rald

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import provenance, require_data_dir, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# The head every variant starts from: the defaults when the tables were measured. The library's default head
# is now the narrower one of "small-head", so each variant's record keeps meaning the model it trained.
MEASURED_HEAD = {"hidden_size": 256, "mlp_ratio": 4.0}
# Each variant: RALDConfig overrides, plus optional "label_space" and "training" (RALDTrainingArguments fields).
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"use_itrr": False, "use_lgifo": False, "nnldl_weight": 0.0, "hidden_size": None},
    "rald-l": {},
    "small-head": {"hidden_size": 128, "mlp_ratio": 2.0},
    "ln-head": {"use_itrr": False, "use_lgifo": False, "nnldl_weight": 0.0, "norm_first": True},
    "rald-valence": {"label_space": "fer2013-valence"},
    "no-itrr": {"use_itrr": False},
    "no-lgifo": {"use_lgifo": False},
    "no-nnldl": {"nnldl_weight": 0.0},
    "literal": {"attention_residual": False, "zero_init_last": False},
    "no-zero-init": {"zero_init_last": False},
    "nnldl-batch-mean": {"nnldl_reduction": "batch_mean"},
    "pre-norm": {"norm_first": True},
    "feature-bn": {"feature_norm": "batch_norm"},
    "nnldl-paper": {"nnldl_reduction": "paper"},
    "nnldl-ramp": {"training": {"nnldl_warmup_steps": 150}},
    "nnldl-uniform": {"nnldl_weighting": "uniform"},
    "nnldl-no-detach": {"nnldl_detach_target": False},
    "nnldl-self": {"nnldl_include_self": True},
    "nnldl-k10": {"num_neighbors": 10},
    "first-defaults": {"zero_init_last": False, "nnldl_reduction": "batch_mean"},
    "zero-init": {"zero_init_last": True, "nnldl_reduction": "batch_mean"},
    "zero-init-pre-norm": {"zero_init_last": True, "norm_first": True, "nnldl_reduction": "batch_mean"},
    "zero-init-no-nnldl": {"zero_init_last": True, "nnldl_weight": 0.0},
    "zero-init-nnldl-paper": {"zero_init_last": True, "nnldl_reduction": "paper"},
    "nnldl-features": {"nnldl_relation": "features"},
    "nnldl-features-batch-mean": {"nnldl_relation": "features", "nnldl_reduction": "batch_mean"},
    "zero-init-ramp": {
        "zero_init_last": True,
        "nnldl_reduction": "batch_mean",
        "training": {"nnldl_warmup_steps": 170},
    },
    "zero-init-paper-ramp": {
        "zero_init_last": True,
        "nnldl_reduction": "paper",
        "training": {"nnldl_warmup_steps": 170},
    },
}

# Training augmentation: "flip" suits short budgets, "default" is rald_hf's full timm augmentation.
AUGMENTATIONS: dict[str, dict[str, Any] | None] = {
    "flip": {"scale": (1.0, 1.0), "color_jitter": 0.0, "random_erasing": 0.0},
    "default": None,
}

DESCRIPTIONS = {
    "baseline": "backbone + linear head, cross-entropy",
    "rald-l": "RALD-L: ITRR + LGIFO + NNLDL, no tree (hidden_size 256, mlp_ratio 4)",
    "small-head": "RALD-L with hidden_size 128 and mlp_ratio 2 (the library's default head)",
    "ln-head": "backbone + projection to 256 + layer norm + linear head (RALD-L without its blocks and NNLDL)",
    "rald-valence": "RALD with the fer2013-valence tree",
    "no-itrr": "RALD-L without ITRR",
    "no-lgifo": "RALD-L without LGIFO",
    "no-nnldl": "RALD-L without NNLDL",
    "literal": "RALD-L without the residual path (equations as written)",
    "no-zero-init": "RALD-L with attention branches initialised at random instead of zero",
    "nnldl-batch-mean": "RALD-L, NNLDL summed over classes and averaged over images (7x the weight)",
    "pre-norm": "RALD-L with pre-norm blocks",
    "feature-bn": "RALD-L with backbone features batch-normalised before the projection",
    "nnldl-paper": "RALD-L, NNLDL divided by N*Cf (published normalisation, the default)",
    "nnldl-ramp": "RALD-L, NNLDL weight ramped in over 150 steps",
    "nnldl-uniform": "RALD-L, uniform neighbour weights",
    "nnldl-no-detach": "RALD-L, gradients through the NNLDL target",
    "nnldl-self": "RALD-L, an image counts among its own neighbours",
    "nnldl-k10": "RALD-L, k = 10 neighbours",
    "first-defaults": "RALD-L with random-initialised attention branches and NNLDL averaged over images",
    "zero-init": "RALD-L, attention branches start at zero (zero_init_last), NNLDL averaged over images",
    "zero-init-pre-norm": "as zero-init, with pre-norm blocks",
    "zero-init-no-nnldl": "RALD-L, zero_init_last, without NNLDL",
    "zero-init-nnldl-paper": "RALD-L, zero_init_last, NNLDL divided by N*Cf",
    "zero-init-ramp": "as zero-init, NNLDL weight ramped in over 3 epochs",
    "nnldl-features": "RALD-L, NNLDL neighbours by cosine similarity of backbone features",
    "nnldl-features-batch-mean": "as nnldl-features, NNLDL averaged over images (7x the weight)",
    "zero-init-paper-ramp": "RALD-L, zero_init_last, NNLDL divided by N*Cf and ramped in over 3 epochs",
}


# Trainer arguments of each --optimizer choice, and how the docs name it.
OPTIMIZERS: dict[str, dict[str, str]] = {
    "sgd": {"optim": "sgd", "optim_args": "momentum=0.9"},
    "adamw": {"optim": "adamw_torch"},
}
OPTIMIZER_NAMES = {"sgd": "SGD (momentum 0.9)", "adamw": "AdamW"}


def run_one(variant: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train and score one variant with one seed; return the stored record."""
    spec = dict(VARIANTS[variant])
    label_space = spec.pop("label_space", "fer2013")
    training = {
        "num_train_epochs": args.epochs,
        "per_device_train_batch_size": args.batch_size,
        "per_device_eval_batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        **OPTIMIZERS[args.optimizer],
        "weight_decay": args.weight_decay,
        "lr_scheduler_type": "cosine",
        "warmup_steps": args.warmup_steps,
        "seed": seed,
        "disable_tqdm": True,
        "logging_steps": 20,
        "save_only_model": True,
        "dataloader_num_workers": args.workers,
        "bf16": args.bf16,
        "channels_last": args.channels_last,
    }
    training.update(spec.pop("training", {}))
    overrides = {"backbone": args.backbone, "image_size": args.image_size, **MEASURED_HEAD, **spec}
    output_dir = Path(args.runs_dir) / f"{args.tag}-{variant}-seed{seed}"
    data_dir = require_data_dir("fer2013/ and weights/")
    weights = data_dir / "weights" / f"{args.backbone}.in1k.safetensors" if args.pretrained else None

    augmentation = AUGMENTATIONS[args.augmentation]
    result = train_rald(
        data_dir / "fer2013",
        output_dir,
        label_space=label_space,
        config_overrides=overrides,
        backbone_weights=weights,
        training_args=training,
        max_train_samples=args.train_size,
        augmentation=augmentation,
        reference_bank_size=args.bank_size,
    )
    # The published protocol: transductive relations in shuffled batches of the training batch size.
    transductive = evaluate_checkpoint(
        output_dir,
        data_dir / "fer2013",
        split="test",
        batch_size=args.batch_size,
        relation_mode="transductive",
        seed=seed,
    )
    return {
        "variant": variant,
        "seed": seed,
        "tag": args.tag,
        "validation_accuracy": best_validation_accuracy(output_dir),
        "test_accuracy": transductive["accuracy"],
        "test_macro_f1": transductive["macro_f1"],
        "test_accuracy_default_mode": result.metrics["accuracy"],
        "default_mode": result.metrics["relation_mode"],
        "train_seconds": result.train_seconds,
        "torch_threads": torch.get_num_threads(),
        "settings": {
            "backbone": args.backbone,
            "pretrained": args.pretrained,
            "image_size": args.image_size,
            "epochs": args.epochs,
            "train_size": args.train_size,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "augmentation": args.augmentation,
            "optimizer": args.optimizer,
            "weight_decay": args.weight_decay,
            "bf16": args.bf16,
            "channels_last": args.channels_last,
        },
    }


def mirrored_scores(output_dir: Path, batch_size: int, seed: int) -> dict[str, float]:
    """Score a run's checkpoint with test-time flips: each image also predicted mirrored, probabilities averaged.

    Validation is scored with and without the flip, so that the choice is made there. PrivateTest is scored
    only with it, because the record already contains its plain score. All scores use transductive mode, like
    ``test_accuracy``.
    """
    data_dir = require_data_dir("fer2013/")
    scores = {}
    for split, flip, key in (
        ("validation", False, "validation_accuracy_transductive"),
        ("validation", True, "validation_accuracy_flip"),
        ("test", True, "test_accuracy_flip"),
    ):
        metrics = evaluate_checkpoint(
            output_dir,
            data_dir / "fer2013",
            split=split,
            batch_size=batch_size,
            relation_mode="transductive",
            seed=seed,
            flip=flip,
            progress=False,
        )
        scores[key] = metrics["accuracy"]
    return scores


def best_validation_accuracy(output_dir: Path) -> float | None:
    """Read the best per-epoch validation accuracy of a run from the Trainer state of its last checkpoint."""
    states = sorted(output_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    if not states:
        return None
    return json.loads(states[-1].read_text()).get("best_metric")


def summarize(records: list[dict[str, Any]], tag: str, runs_dir: Path) -> str:
    """Build the Markdown table of one benchmark tag: mean and spread per variant, paired differences."""
    rows = [r for r in records if r["tag"] == tag]
    by_variant: dict[str, dict[int, dict[str, Any]]] = {}
    for record in rows:
        by_variant.setdefault(record["variant"], {})[record["seed"]] = record
    baseline = {seed: 100 * r["test_accuracy"] for seed, r in by_variant.get("baseline", {}).items()}
    lines = [
        "| variant | PrivateTest accuracy, transductive batches of 128, mean ± std (%) | per seed "
        "| paired difference to baseline (points) | with the reference bank (%) | best validation accuracy (%) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    mirrored = any("test_accuracy_flip" in r for r in rows)
    if mirrored:
        lines[0] += (
            " validation, transductive, without → with test-time flip (%) | PrivateTest with test-time flip (%) |"
        )
        lines[1] += " --- | --- |"
    for variant in VARIANTS:
        if variant not in by_variant:
            continue
        runs = by_variant[variant]
        seeds = sorted(runs)
        scores = {seed: 100 * runs[seed]["test_accuracy"] for seed in seeds}
        values = np.array([scores[s] for s in seeds])
        per_seed = ", ".join(f"{scores[s]:.2f}" for s in seeds)
        shared = sorted(set(scores) & set(baseline))
        paired = ""
        if variant != "baseline" and shared:
            differences = np.array([scores[s] - baseline[s] for s in shared])
            spread = f" ± {differences.std(ddof=1):.2f}" if len(differences) > 1 else ""
            paired = f"{differences.mean():+.2f}{spread} (n={len(differences)})"
        std = f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else ""
        reference = [
            100 * runs[s]["test_accuracy_default_mode"] for s in seeds if runs[s].get("default_mode") == "reference"
        ]
        reference_text = f"{np.mean(reference):.2f}" if reference else "n/a (no ITRR)"
        # Records written before the validation score was stored take it from the run folder.
        validation = [
            runs[s].get("validation_accuracy") or best_validation_accuracy(runs_dir / f"{tag}-{variant}-seed{s}")
            for s in seeds
        ]
        known = [100 * v for v in validation if v is not None]
        validation_text = f"{np.mean(known):.2f}" if known else "n/a"
        name = f"{variant}: {DESCRIPTIONS[variant]}"
        row = f"| {name} | {values.mean():.2f}{std} | {per_seed} | {paired} | {reference_text} | {validation_text} |"
        if mirrored:
            plain, flipped, test = (
                _mean_of(runs, seeds, key)
                for key in ("validation_accuracy_transductive", "validation_accuracy_flip", "test_accuracy_flip")
            )
            row += f" {plain} → {flipped} | {test} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def _mean_of(runs: dict[int, dict[str, Any]], seeds: list[int], key: str) -> str:
    """Return the mean of one score (in %) over the seeds whose records contain it, or "n/a"."""
    known = [100 * runs[s][key] for s in seeds if key in runs[s]]
    return f"{np.mean(known):.2f}" if known else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=float, default=6)
    parser.add_argument("--train-size", type=int, default=7245, help="training images; 0 for the whole split")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="sgd")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    parser.add_argument("--bf16", action="store_true", help="train under bfloat16 autocast")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory order for the backbone")
    parser.add_argument("--augmentation", choices=list(AUGMENTATIONS), default="flip", help="training augmentation")
    parser.add_argument("--bank-size", type=int, default=128, help="reference bank stored with each checkpoint")
    parser.add_argument("--tag", default="mobilenetv2-64", help="name of this benchmark configuration")
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "benchmarks"))
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "train_fer2013.jsonl"))
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    parser.add_argument(
        "--flip-scores",
        action="store_true",
        help="also score validation and PrivateTest with test-time flips for every run of --tag that lacks them",
    )
    parser.add_argument(
        "--no-train", action="store_true", help="train nothing; summarise the runs of --tag already in --results"
    )
    args = parser.parse_args()
    require_data_dir("fer2013/ and weights/")
    if args.train_size == 0:
        args.train_size = None

    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    records = []
    if results.exists():
        records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        done = {(r["tag"], r["variant"], r["seed"]) for r in records}
    for seed in args.seeds:
        for variant in args.variants:
            if (args.tag, variant, seed) in done or args.no_train:
                continue
            print(f"== {args.tag} {variant} seed {seed}", flush=True)
            record = run_one(variant, seed, args)
            records.append(record)
            with results.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            print(f"   accuracy {100 * record['test_accuracy']:.2f} %, {record['train_seconds']:.0f} s", flush=True)

    if args.flip_scores:
        missing = [r for r in records if r["tag"] == args.tag and "test_accuracy_flip" not in r]
        for record in missing:
            print(f"== {args.tag} {record['variant']} seed {record['seed']}: scoring with test-time flips", flush=True)
            output_dir = Path(args.runs_dir) / f"{args.tag}-{record['variant']}-seed{record['seed']}"
            record.update(mirrored_scores(output_dir, record["settings"]["batch_size"], record["seed"]))
        if missing:
            results.write_text("".join(json.dumps(record) + "\n" for record in records))

    table = summarize(records, args.tag, Path(args.runs_dir))
    print(table)
    if args.write_docs:
        print(f"Wrote {write_section(f'train_fer2013 {args.tag}', docs_body(records, args.tag, table))}")


def docs_body(records: list[dict[str, Any]], tag: str, table: str) -> str:
    """Describe the runs of one tag (the command that trains them, machine, budget) above their table."""
    rows = [r for r in records if r["tag"] == tag]
    settings = rows[0]["settings"]
    seeds = " ".join(str(seed) for seed in sorted({r["seed"] for r in rows}))
    # Records from before the optimizer was a choice all used SGD with the default weight decay.
    optimizer = settings.get("optimizer", "sgd")
    weight_decay = settings.get("weight_decay", 1e-4)
    optimizer_options = "" if optimizer == "sgd" else f" --optimizer {optimizer}"
    if weight_decay != 1e-4:
        optimizer_options += f" --weight-decay {weight_decay:g}"
    # Records from before these options trained in float32 with the default memory order.
    speed_options = "".join(
        flag for flag, key in ((" --bf16", "bf16"), (" --channels-last", "channels_last")) if settings.get(key)
    )
    variants = " ".join(variant for variant in VARIANTS if any(r["variant"] == variant for r in rows))
    train_command = (
        f"python benchmarks/train_fer2013.py --tag {tag} --backbone {settings['backbone']}"
        f"{'' if settings['pretrained'] else ' --no-pretrained'} --image-size {settings['image_size']} "
        f"--epochs {settings['epochs']:g} --train-size {settings['train_size'] or 0} "
        f"--batch-size {settings['batch_size']} --learning-rate {settings['learning_rate']:g} "
        f"--augmentation {settings['augmentation']}{optimizer_options}{speed_options} --seeds {seeds} "
        f"--variants {variants}"
    )
    seconds = [r["train_seconds"] for r in rows]
    # The machine line names the threads of the process that writes the table, so each run records its own.
    threads = sorted({r["torch_threads"] for r in rows if "torch_threads" in r})
    recorded = sum("torch_threads" in r for r in rows)
    threads_line = ""
    if recorded:
        threads_line = f"- torch threads per training run: {', '.join(map(str, threads))}"
        if recorded < len(rows):
            threads_line += f" (recorded by {recorded} of {len(rows)} runs; older records do not store it)"
        threads_line += "\n"
    return (
        f"Training command (the table lists which seed of each variant ran): `{train_command}`\n\n"
        + provenance("Table written by")
        + "Budget per run:\n\n"
        f"- data: {settings['epochs']:g} epochs of {settings['train_size'] or 'all'} training images at "
        f"{settings['image_size']} px, batch {settings['batch_size']}, {settings['augmentation']} augmentation\n"
        f"- model: {'ImageNet-pretrained' if settings['pretrained'] else 'randomly initialised'} "
        f"{settings['backbone']}\n"
        f"- optimizer: {OPTIMIZER_NAMES[optimizer]} at {settings['learning_rate']:g} with cosine decay, "
        f"weight decay {weight_decay:g}\n"
        f"- arithmetic: {'bfloat16 autocast' if settings.get('bf16') else 'float32'}"
        f"{', channels-last backbone' if settings.get('channels_last') else ''}\n"
        f"- time: {np.median(seconds):.0f} s per run (median of {len(seconds)}; wall time, with other runs "
        f"sharing the machine)\n{threads_line}\n" + table
    )


if __name__ == "__main__":
    main()
