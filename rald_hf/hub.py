"""Model cards and Hub uploads for RALD checkpoints, through `huggingface_hub`.

`push_to_hub` saves the weights (safetensors), config, image processor and remote code of a model into a
folder, adds a README model card built here, and uploads the folder in one commit. Importing this module
also makes ``model.push_to_hub(...)`` use it, so the card uploaded is this one and not transformers'
generic card.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from . import modeling_rald
from .image_processing_rald import RALDImageProcessor
from .labels import LabelSpace
from .modeling_rald import RALDPreTrainedModel

__all__ = ["build_model_card", "push_to_hub", "read_checkpoint_records"]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
TRAINING_SUMMARY_FILE = "training_summary.json"

_METRIC_NAMES = {"accuracy": "Accuracy", "macro_f1": "Macro-F1"}


def read_checkpoint_records(folder: str | Path | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Read ``metrics.json`` and ``training_summary.json`` from a checkpoint folder, where they exist."""
    if folder is None or not Path(folder).is_dir():
        return None, None
    records = []
    for name in (METRICS_FILE, TRAINING_SUMMARY_FILE):
        path = Path(folder) / name
        records.append(json.loads(path.read_text()) if path.exists() else None)
    return records[0], records[1]


def build_model_card(
    model: RALDPreTrainedModel,
    metrics: dict[str, Any] | None = None,
    training_summary: dict[str, Any] | None = None,
    license: str = "other",
    license_name: str | None = "training-data-terms",
    dataset: str | None = None,
    model_name: str | None = None,
) -> ModelCard:
    """Build the README model card of a RALD checkpoint.

    Args:
        model: The model; its config gives the labels, tree, architecture and reference bank.
        metrics: A ``metrics.json`` written by `rald_hf.training.train_rald`; without it the card says that
            no evaluation was recorded.
        training_summary: A ``training_summary.json`` written by `train_rald` (dataset, budget, recipe).
        license: The licence identifier of the weights. Weights trained on research-only data such as
            FER2013 cannot be more open than that data, hence ``"other"`` by default.
        license_name: Name of the licence when ``license`` is ``"other"``.
        dataset: Hub id or name of the training dataset, for the metadata and the terms section.
        model_name: Name used in the model index.
    """
    config = model.config
    space = LabelSpace.from_config(config)
    dataset = dataset or (training_summary or {}).get("dataset_name")
    model_name = model_name or f"rald-{config.label_space_name or 'custom'}-{config.backbone}"
    variant = "RALD" if config.use_hierarchy_bias and space.has_tree else "RALD-L"

    eval_results = []
    if metrics:
        for key, label in _METRIC_NAMES.items():
            if key in metrics:
                eval_results.append(
                    EvalResult(
                        task_type="image-classification",
                        dataset_type=dataset or "custom",
                        dataset_name=dataset or "custom",
                        dataset_split=metrics.get("split"),
                        metric_type=key,
                        metric_name=label,
                        metric_value=round(float(metrics[key]), 4),
                    )
                )
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        license_name=license_name if license == "other" else None,
        pipeline_tag="image-classification",
        tags=["rald", "facial-expression-recognition", "image-classification", "timm", config.backbone],
        datasets=[dataset] if dataset else None,
        model_name=model_name,
        eval_results=eval_results or None,
    )
    sections = [
        f"# {model_name}",
        _summary(config, space, variant),
        _labels_section(space),
        _usage_section(),
        _training_section(config, training_summary),
        _evaluation_section(metrics),
        _inference_section(config),
        _terms_section(config, dataset),
        _limits_section(config),
        _citation_section(),
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def _summary(config: Any, space: LabelSpace, variant: str) -> str:
    levels = " / ".join(f"{len(names)} {level}" for level, names in zip(space.level_names, space.levels, strict=True))
    tree = (
        "The label tree shapes the attention between labels (HLRR with a tree-distance bias)."
        if variant == "RALD"
        else "There is no label tree bias (RALD-L)."
    )
    return (
        f"A {variant} facial expression classifier built with `rald_hf`: a `{config.backbone}` image encoder "
        f"from timm, followed by attention across images (ITRR), across labels (HLRR) and from images to labels "
        f"(LGIFO). It predicts {space.num_labels} fine expression labels ({levels}) from "
        f"{config.image_size} x {config.image_size} pixel face images. {tree}"
    )


def _labels_section(space: LabelSpace) -> str:
    header = "| id | " + " | ".join(space.level_names) + " |"
    lines = ["## Labels", "", header, "| --- |" + " --- |" * space.num_levels]
    ancestors = [space.fine_to_level(depth) for depth in range(space.num_levels)]
    for index in range(space.num_labels):
        names = [space.levels[depth][ancestors[depth][index]] for depth in range(space.num_levels)]
        lines.append(f"| {index} | " + " | ".join(names) + " |")
    return "\n".join(lines)


def _usage_section() -> str:
    return "\n".join(
        [
            "## Use",
            "",
            "```python",
            "import rald_hf  # pip install rald-hf; without it pass trust_remote_code=True",
            "from transformers import pipeline",
            "",
            'classifier = pipeline("image-classification", model="REPO_OR_FOLDER")',
            'print(classifier("face.jpg", top_k=3))',
            "```",
            "",
            "or `rald-hf predict REPO_OR_FOLDER face.jpg`.",
        ]
    )


def _training_section(config: Any, summary: dict[str, Any] | None) -> str:
    lines = [
        "## Training",
        "",
        f"- Backbone: `{config.backbone}`, images of {config.image_size} px.",
        f"- Attention blocks: width {config.hidden_size or 'of the backbone'}, {config.num_attention_heads} heads, "
        f"feed-forward ratio {config.mlp_ratio}, lambda {config.attention_scale}, "
        f"{'residual' if config.attention_residual else 'no residual'} path, "
        f"{'pre' if config.norm_first else 'post'}-norm.",
        f"- Loss: cross-entropy plus NNLDL with weight {config.nnldl_weight}, k = {config.num_neighbors} "
        f"neighbours, {config.nnldl_weighting} neighbour weights, {config.nnldl_loss} divergence, "
        f"{config.nnldl_reduction} normalisation.",
    ]
    if summary:
        described = ", ".join(f"{key.replace('_', ' ')}: {value}" for key, value in summary.items())
        lines.append(f"- Recipe: {described}.")
    else:
        lines.append("- No training summary was recorded with this checkpoint.")
    return "\n".join(lines)


def _evaluation_section(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return "## Evaluation\n\nNo evaluation results were recorded for this checkpoint."
    lines = [
        "## Evaluation",
        "",
        f"On the `{metrics.get('split', 'held-out')}` split ({metrics.get('num_images', '?')} images, "
        f"{metrics.get('relation_mode') or 'no'} image relations):",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    for key, value in metrics.items():
        if key.startswith("accuracy") or key == "macro_f1":
            lines.append(f"| {key.replace('_', ' ')} | {100 * value:.2f} % |")
    per_class = metrics.get("per_class_accuracy")
    if per_class:
        lines += ["", "| label | accuracy | images |", "| --- | --- | --- |"]
        for name, accuracy in per_class.items():
            shown = "n/a" if accuracy is None else f"{100 * accuracy:.2f} %"
            lines.append(f"| {name} | {shown} | {metrics.get('support', {}).get(name, '?')} |")
    return "\n".join(lines)


def _inference_section(config: Any) -> str:
    if config.reference_bank_size:
        mode = (
            f"This checkpoint carries a reference bank of {config.reference_bank_size} training-image features, "
            "so by default each image attends to itself and the bank: its prediction does not depend on the other "
            "images passed with it."
        )
    else:
        mode = (
            "This checkpoint has no reference bank, so by default each image attends to the other images of its "
            "batch (transductive mode) and its prediction depends on them. Build a bank with "
            "`model.build_reference_bank(dataset)`, or pass `relation_mode='self'`, for batch-independent "
            "predictions."
        )
    setting = f"The setting is `inference_relation_mode = {config.inference_relation_mode!r}` in the config."
    return f"## Inference mode\n\n{mode} {setting}"


def _terms_section(config: Any, dataset: str | None) -> str:
    source = f"`{dataset}`" if dataset else "its training data"
    lines = [
        "## Training data and terms",
        "",
        f"The weights are derived from {source} and inherit its terms of use. FER2013, for example, is "
        "available for research use only, and so are weights trained on it.",
    ]
    if config.reference_bank_size:
        lines.append(
            f"The reference bank stores backbone features of {config.reference_bank_size} training face images "
            "together with their labels. These features are information derived from those faces; share the "
            "checkpoint only where the training data's terms allow it, or rebuild the bank from data you may share."
        )
    return "\n".join(lines)


def _limits_section(config: Any) -> str:
    return "\n".join(
        [
            "## Limits",
            "",
            "- Facial expression labels describe visible expressions, not felt emotions; do not use the model to "
            "judge people's states, intentions or character.",
            "- Accuracy depends on face crops similar to the training data (alignment, resolution, lighting) and "
            "differs across classes; see the per-class table above where it was recorded.",
            "- In transductive mode predictions change with the batch; class-sorted batches inflate accuracy.",
        ]
    )


def _citation_section() -> str:
    return "\n".join(
        [
            "## Citation",
            "",
            "RALD (relationship-awareness and label disambiguation) was published in Acta Electronica Sinica "
            "(电子学报), 2024, no. 10. Cite that article under its published title and authors. This checkpoint "
            "was built with `rald_hf`, an independent implementation.",
        ]
    )


def push_to_hub(
    model: RALDPreTrainedModel,
    repo_id: str,
    image_processor: RALDImageProcessor | None = None,
    metrics: dict[str, Any] | None = None,
    training_summary: dict[str, Any] | None = None,
    dataset: str | None = None,
    license: str = "other",
    commit_message: str = "Upload RALD model",
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Upload a model with its image processor, remote code and model card in one commit.

    Args:
        model: The model to upload.
        repo_id: The Hub repository, created if missing.
        image_processor: The processor to upload; by default the one saved in the folder the model was loaded
            from, or one built from the backbone's statistics and the config's image size.
        metrics: Evaluation results for the card and the model index; by default ``metrics.json`` of the
            folder the model was loaded from.
        training_summary: Training recipe for the card; by default that folder's ``training_summary.json``.
        dataset: Training dataset id or name for the card.
        license: Licence identifier of the weights.
        commit_message: Message of the commit.
        private: Create the repository as private.
        token: Hub token; by default the stored one.
        revision: Branch to commit to.
        create_pr: Open a pull request instead of committing to the branch.

    Returns:
        The `huggingface_hub.CommitInfo` of the upload.
    """
    source = model.config.name_or_path or None
    stored_metrics, stored_summary = read_checkpoint_records(source)
    metrics = metrics if metrics is not None else stored_metrics
    training_summary = training_summary if training_summary is not None else stored_summary
    if image_processor is None:
        if source and (Path(source) / "preprocessor_config.json").exists():
            image_processor = RALDImageProcessor.from_pretrained(source)
        else:
            backbone = getattr(model, "rald", model).backbone
            image_processor = RALDImageProcessor.from_backbone(backbone, image_size=model.config.image_size)
    card = build_model_card(model, metrics, training_summary, license=license, dataset=dataset)

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory(prefix="rald-push-") as folder:
        model.save_pretrained(folder)
        image_processor.save_pretrained(folder)
        card.save(str(Path(folder) / "README.md"))
        logger.info("Uploading %s to %s", sorted(p.name for p in Path(folder).iterdir()), repo_id)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )


def _push_model(model: RALDPreTrainedModel, repo_id: str, **kwargs: Any) -> Any:
    return push_to_hub(model, repo_id, **kwargs)


modeling_rald.set_push_handler(_push_model)
