"""The ``rald-hf`` command line: train, evaluate, predict and push.

Every option maps onto a `RALDConfig` field, a `RALDTrainingArguments` field or an argument of the
functions in `rald_hf.training.run`; this module only parses arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from .labels import LabelSpace

__all__ = ["build_parser", "main"]

logger = logging.getLogger("rald_hf.cli")

TRAIN_EPILOG = """\
Defaults that follow the published recipe: ResNet18 backbone, batch size 128, SGD with momentum 0.9 at a
learning rate of 0.01, lambda = 0.125, sigma = 500, k = 5 neighbours.

Defaults that differ, and why:
  --epochs 10          the paper trains 300 epochs, which takes days on a CPU; raise it on a GPU.
  --image-size 112     the paper does not state it; 112 px keeps a ResNet18 epoch of FER2013 CPU-feasible
                       and is recorded in the checkpoint and its image processor.
  cosine learning-rate decay with a short warm-up, where the paper decays the rate every 100 epochs.
  a residual path around each attention block, whose branches start at zero (the equations have no such
  path, and the literal form trained far below a linear-head baseline in docs/benchmarks.md);
  --set attention_residual=false --set zero_init_last=false restores the literal form.
"""


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _config_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    from .training.run import check_config_fields

    overrides = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise SystemExit(f"--set expects KEY=VALUE (a RALDConfig field), got {pair!r}")
        overrides[key] = _parse_value(value)
    try:
        check_config_fields(overrides)
    except ValueError as error:
        raise SystemExit(f"--set: {error}") from error
    return overrides


def _word_aliases(pairs: Sequence[str]) -> dict[str, str] | None:
    aliases = {}
    for pair in pairs:
        word, separator, substitute = pair.partition("=")
        if not separator or not word.strip() or not substitute.strip():
            raise SystemExit(f"--word-alias expects WORD=SUBSTITUTE, such as calm=relaxed, got {pair!r}")
        aliases[word.strip()] = substitute.strip()
    return aliases or None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the epilog's layout and show the default of every option that has one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # An option without a default either describes its behaviour in its help text or has nothing to show.
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


RELATION_MODE_HELP = (
    "what each image attends to: 'reference' (itself and the stored bank of training features; independent of the "
    "batch), 'transductive' (the other images of its batch, as published), 'self' (only itself); default: the "
    "checkpoint's mode"
)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``rald-hf``."""
    parser = argparse.ArgumentParser(prog="rald-hf", description="Train, evaluate and run RALD expression models.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="train a model on a labelled image dataset",
        epilog=TRAIN_EPILOG,
        formatter_class=_HelpFormatter,
    )
    train.add_argument(
        "--dataset", required=True, help="dataset folder (parquet, image folder, save_to_disk) or Hub id"
    )
    train.add_argument("--output-dir", required=True, help="folder for checkpoints, the final model and metrics")
    labels = train.add_mutually_exclusive_group()
    labels.add_argument("--preset", choices=LabelSpace.available_presets(), help="label-space preset")
    labels.add_argument("--label-tree", help="JSON file with labels and their tree (see docs/training.md)")
    train.add_argument("--rald-l", action="store_true", help="drop the label tree and its attention bias (RALD-L)")
    train.add_argument("--backbone", help="timm model name of the image encoder (default: resnet18)")
    train.add_argument("--backbone-weights", help="local timm checkpoint to start the backbone from")
    train.add_argument(
        "--init-from",
        help="RALD checkpoint (folder or Hub id) whose backbone and attention weights start training; the "
        "labels, classifier and reference bank are made anew for this dataset's label space",
    )
    train.add_argument(
        "--image-size", type=int, help="input side in pixels (default: 112, or the --init-from checkpoint's)"
    )
    train.add_argument("--epochs", type=float, default=10, help="training epochs")
    train.add_argument("--batch-size", type=int, default=128, help="images per batch, which is also how many relate")
    train.add_argument("--learning-rate", type=float, default=0.01, help="peak learning rate")
    train.add_argument("--optimizer", choices=["sgd", "adamw_torch"], default="sgd", help="optimizer")
    train.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay")
    train.add_argument(
        "--warmup-steps",
        type=float,
        default=0.05,
        help="learning-rate warm-up: optimizer steps, or a fraction of all steps when below 1",
    )
    train.add_argument("--seed", type=int, default=0, help="seed of initialisation, subsets and data order")
    train.add_argument(
        "--max-train-samples", type=_positive_int, help="train on a stratified subset of this many images"
    )
    train.add_argument(
        "--max-eval-samples",
        type=_positive_int,
        help="score stratified subsets of this many validation and test images",
    )
    train.add_argument("--train-split", default="train", help="name of the training split")
    train.add_argument("--validation-split", default="validation", help="split that selects the best checkpoint")
    train.add_argument(
        "--validation-fraction",
        type=float,
        default=0.1,
        help="share of the training split held out for validation when the dataset has no 'validation' split; "
        "0 trains without validation",
    )
    train.add_argument("--test-split", default="test", help="split scored into metrics.json at the end")
    train.add_argument("--num-neighbors", type=int, default=5, help="k, the neighbours of each image in NNLDL")
    train.add_argument("--nnldl-weight", type=float, default=1.0, help="weight of the NNLDL term")
    train.add_argument("--nnldl-warmup-steps", type=int, default=0, help="steps over which NNLDL ramps in")
    train.add_argument("--class-weighting", choices=["none", "balanced"], default="none", help="cross-entropy weights")
    train.add_argument("--balanced-sampler", action="store_true", help="sample images inversely to class size")
    train.add_argument("--word-vectors", help="word2vec, GloVe or fastText file for the label embeddings")
    train.add_argument(
        "--word-alias",
        action="append",
        default=[],
        metavar="WORD=SUBSTITUTE",
        help="embed a label word that the word vectors lack as another word, such as calm=relaxed",
    )
    train.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    train.add_argument(
        "--bf16",
        action="store_true",
        help="compute in bfloat16 under autocast, with float32 weights; faster on CPUs with AMX and on GPUs from "
        "Ampere on",
    )
    train.add_argument(
        "--channels-last", action="store_true", help="channels-last memory order for the backbone's convolutions"
    )
    train.add_argument("--tsne", action="store_true", help="also plot a t-SNE map of the final image features")
    train.add_argument(
        "--reference-bank-size",
        type=int,
        default=128,
        help="training images whose features the checkpoint stores for batch-independent inference; 0 for none",
    )
    train.add_argument("--no-progress", action="store_true", help="hide progress bars")
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any other RALDConfig field, JSON value"
    )

    evaluate = commands.add_parser(
        "evaluate", help="score a checkpoint on a dataset split", formatter_class=_HelpFormatter
    )
    evaluate.add_argument("checkpoint", help="checkpoint folder")
    evaluate.add_argument("--dataset", required=True, help="dataset folder or Hub id")
    evaluate.add_argument("--split", default="test", help="split to score")
    evaluate.add_argument("--output-dir", help="where metrics and plots go; without it they are only printed")
    evaluate.add_argument(
        "--batch-size", type=int, default=128, help="images per batch; in transductive mode, how many relate"
    )
    evaluate.add_argument("--relation-mode", choices=["reference", "transductive", "self"], help=RELATION_MODE_HELP)
    evaluate.add_argument(
        "--max-eval-samples", type=_positive_int, help="score a stratified subset of this many images"
    )
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the subset and the evaluation order")
    evaluate.add_argument("--tsne", action="store_true", help="also plot a t-SNE map of the image features")
    evaluate.add_argument(
        "--flip",
        action="store_true",
        help="also score every image mirrored left to right and average the two probabilities (twice the time)",
    )
    evaluate.add_argument("--no-progress", action="store_true", help="hide progress bars")
    evaluate.add_argument(
        "--no-shuffle",
        action="store_true",
        help="keep the split's stored order (class-sorted in many datasets), to measure how much transductive "
        "relations leak the labels",
    )

    predict = commands.add_parser("predict", help="print the top labels of image files", formatter_class=_HelpFormatter)
    predict.add_argument("checkpoint", help="checkpoint folder")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--top-k", type=_positive_int, default=3, help="labels to print per image")
    predict.add_argument("--relation-mode", choices=["reference", "transductive", "self"], help=RELATION_MODE_HELP)
    predict.add_argument("--json", action="store_true", help="print JSON instead of text")
    predict.add_argument("--no-progress", action="store_true", help="hide progress bars")

    push = commands.add_parser(
        "push",
        help="upload a checkpoint with its model card to the Hugging Face Hub",
        formatter_class=_HelpFormatter,
    )
    push.add_argument("checkpoint", help="checkpoint folder")
    push.add_argument("repo_id", help="Hub repository, such as org/rald-fer2013")
    push.add_argument("--dataset-name", help="training dataset id or name for the model card")
    push.add_argument("--license", default="other", help="licence identifier of the weights (default: other)")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--commit-message", default="Upload RALD model", help="commit message")
    push.add_argument("--revision", help="branch to commit to")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    return parser


def _train(args: argparse.Namespace) -> None:
    from .training.run import train_rald

    overrides = {"num_neighbors": args.num_neighbors, "nnldl_weight": args.nnldl_weight}
    if args.init_from is None:
        # A checkpoint to start from brings its own backbone and image size.
        overrides["backbone"] = args.backbone or "resnet18"
        overrides["image_size"] = args.image_size or 112
    elif args.backbone:
        raise SystemExit("--backbone comes from the --init-from checkpoint; leave it out")
    elif args.image_size:
        overrides["image_size"] = args.image_size
    overrides.update(_config_overrides(args.set))
    training_args = {
        "num_train_epochs": args.epochs,
        "per_device_train_batch_size": args.batch_size,
        "per_device_eval_batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "optim": args.optimizer,
        "weight_decay": args.weight_decay,
        "lr_scheduler_type": "cosine",
        "warmup_steps": args.warmup_steps,
        "seed": args.seed,
        "nnldl_warmup_steps": args.nnldl_warmup_steps,
        "class_weighting": args.class_weighting,
        "balanced_sampler": args.balanced_sampler,
        "dataloader_num_workers": args.workers,
        "bf16": args.bf16,
        "channels_last": args.channels_last,
        "disable_tqdm": args.no_progress,
    }
    if args.optimizer == "sgd":
        training_args["optim_args"] = "momentum=0.9"
    result = train_rald(
        args.dataset,
        args.output_dir,
        label_space=args.preset or args.label_tree,
        rald_l=args.rald_l,
        config_overrides=overrides,
        backbone_weights=args.backbone_weights,
        training_args=training_args,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        train_split=args.train_split,
        validation_split=args.validation_split,
        test_split=args.test_split,
        word_vectors=args.word_vectors,
        word_aliases=_word_aliases(args.word_alias),
        tsne=args.tsne,
        reference_bank_size=args.reference_bank_size,
        init_from=args.init_from,
        validation_fraction=args.validation_fraction,
    )
    if result.metrics and result.is_main_process:
        print(
            f"{result.evaluated_split}: accuracy {100 * result.metrics['accuracy']:.2f} %, "
            f"macro-F1 {100 * result.metrics['macro_f1']:.2f} %; model and metrics in {result.output_dir}"
        )


def _evaluate(args: argparse.Namespace) -> None:
    from .training.metrics import per_class_table
    from .training.run import evaluate_checkpoint

    metrics = evaluate_checkpoint(
        args.checkpoint,
        args.dataset,
        split=args.split,
        output_dir=args.output_dir,
        batch_size=args.batch_size,
        relation_mode=args.relation_mode,
        max_eval_samples=args.max_eval_samples,
        seed=args.seed,
        tsne=args.tsne,
        shuffle=not args.no_shuffle,
        progress=not args.no_progress,
        flip=args.flip,
    )
    print(per_class_table(metrics))
    levels = ", ".join(f"{k} {100 * v:.2f} %" for k, v in metrics.items() if k.startswith("accuracy_"))
    print(
        f"{args.split} ({metrics['num_images']} images, {metrics['relation_mode']} relations"
        f"{', each also mirrored' if args.flip else ''}): "
        f"accuracy {100 * metrics['accuracy']:.2f} %, macro-F1 {100 * metrics['macro_f1']:.2f} %"
        + (f", {levels}" if levels else "")
    )


def _predict(args: argparse.Namespace) -> None:
    from .training.run import predict_images, read_image

    # An unreadable file is reported and skipped, so that the other files still get their predictions.
    readable, errors = {}, {}
    for index, path in enumerate(args.images):
        try:
            readable[index] = read_image(path)
        except ValueError as error:
            errors[index] = str(error)
            logger.error("%s", error)
    results = {}
    if readable:
        top_labels = predict_images(
            args.checkpoint, list(readable.values()), top_k=args.top_k, relation_mode=args.relation_mode
        )
        results = dict(zip(readable, top_labels, strict=True))

    if args.json:
        payload = []
        for index, path in enumerate(args.images):
            if index in errors:
                payload.append({"image": path, "error": errors[index]})
            else:
                predictions = [{"label": label, "score": score} for label, score in results[index]]
                payload.append({"image": path, "predictions": predictions})
        print(json.dumps(payload, indent=2))
    else:
        for index, path in enumerate(args.images):
            if index in results:
                print(path)
                for label, score in results[index]:
                    print(f"  {label:<16} {score:.4f}")
    if errors:
        sys.exit(1)


def _push(args: argparse.Namespace) -> None:
    from .hub import push_to_hub
    from .modeling_rald import RALDForImageClassification

    model = RALDForImageClassification.from_pretrained(args.checkpoint)
    commit = push_to_hub(
        model,
        args.repo_id,
        dataset=args.dataset_name,
        license=args.license,
        commit_message=args.commit_message,
        private=args.private or None,
        revision=args.revision,
        create_pr=args.create_pr,
    )
    print(f"Uploaded {args.checkpoint} to {args.repo_id}: {getattr(commit, 'commit_url', commit)}")


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``rald-hf`` with ``argv`` (default: the process arguments)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "no_progress", False):
        import datasets
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        datasets.disable_progress_bars()
        disable_progress_bars()
    handlers = {"train": _train, "evaluate": _evaluate, "predict": _predict, "push": _push}
    try:
        handlers[args.command](args)
    except (ValueError, OSError) as error:
        logger.error("%s", error or type(error).__name__)
        sys.exit(1)


if __name__ == "__main__":
    main()
