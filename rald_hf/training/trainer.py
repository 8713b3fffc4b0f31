"""RALDTrainer: the Hugging Face `Trainer` with RALD's loss, cross-entropy plus NNLDL.

Gradient accumulation. The Trainer counts the labelled images over all micro-batches of an optimizer step
(``num_items_in_batch``, summed over processes when ``average_tokens_across_devices`` is on) and passes the
count to `compute_loss`. Both terms are summed over a micro-batch's images and divided by that count, so
that the accumulated gradient is that of one large batch whenever each image's loss does not depend on
the other images (cross-image attention off and no NNLDL). With ITRR and NNLDL on, an image relates only
to the images of its own micro-batch, so accumulation gives a larger optimizer batch but not larger
relation batches.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from sklearn.utils.class_weight import compute_class_weight
from torch.utils.data import WeightedRandomSampler
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..modeling_rald import gather_across_processes
from .losses import NNLDLOptions, nnldl_loss

__all__ = ["RALDTrainer", "RALDTrainingArguments", "ReferenceBankCallback"]

logger = logging.getLogger(__name__)


@dataclass
class RALDTrainingArguments(TrainingArguments):
    """`TrainingArguments` with RALD's training options.

    ``remove_unused_columns`` defaults to ``False`` here, because datasets prepared by `rald_hf` produce
    ``pixel_values`` and ``labels`` in a lazy transform from columns with other names. On a machine without
    a GPU, launched with several processes (``torchrun``, ``accelerate launch``), ``use_cpu`` is switched on
    so that the processes train together with gloo. It is also switched on for ``bf16`` on a machine without
    any accelerator, so that bfloat16 autocast runs on the CPU.
    """

    nnldl_warmup_steps: int = field(
        default=0,
        metadata={"help": "Optimizer steps over which the NNLDL weight rises linearly from 0 to nnldl_weight."},
    )
    class_weighting: Literal["none", "balanced"] = field(
        default="none",
        metadata={"help": "'balanced' weights each image's cross-entropy by N / (classes * count of its class)."},
    )
    balanced_sampler: bool = field(
        default=False,
        metadata={"help": "Draw training images with probability inversely proportional to their class size."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep dataset columns the model does not take (needed by lazy transforms)."}
    )
    channels_last: bool = field(
        default=False,
        metadata={
            "help": "Keep the backbone's weights and the images in channels-last memory order, which makes "
            "convolutions faster on CPUs with oneDNN and on GPUs with tensor cores."
        },
    )

    def __post_init__(self) -> None:
        if not torch.cuda.is_available():
            # Pinned memory only helps copies to an accelerator; without one, torch warns on every loader.
            self.dataloader_pin_memory = False
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                # Under torchrun or accelerate launch without GPUs, transformers runs data parallelism on the
                # CPU (gloo) only with use_cpu; otherwise every process would train alone.
                self.use_cpu = True
        if self.bf16 and not torch.accelerator.is_available():
            # transformers accepts bf16 without an accelerator only with use_cpu, where autocast runs on the CPU.
            self.use_cpu = True
        super().__post_init__()
        if self.nnldl_warmup_steps < 0:
            raise ValueError(f"nnldl_warmup_steps must be >= 0, got {self.nnldl_warmup_steps}")
        if self.class_weighting not in ("none", "balanced"):
            raise ValueError(f"class_weighting={self.class_weighting!r} is not supported; use 'none' or 'balanced'")


class RALDTrainer(Trainer):
    """Train a `RALDForImageClassification` with cross-entropy plus the NNLDL term.

    NNLDL depends on the batch by design: each image's target comes from the predictions of the other images
    in its batch. The training logs report both terms as ``ce_loss`` and ``nnldl_loss`` (mean per optimizer
    step since the last log); ``loss`` is their weighted sum. Evaluation reports cross-entropy only, as
    ``eval_loss``.

    Args:
        *args: As for `transformers.Trainer`.
        train_labels: Model label ids of the training set, needed by ``class_weighting="balanced"`` and
            ``balanced_sampler``.
        **kwargs: As for `transformers.Trainer`.
    """

    # compute_loss divides by num_items_in_batch itself, so training_step must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, train_labels: np.ndarray | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Make the Trainer count the items of each accumulated step for compute_loss. RALD models themselves
        # set accepts_loss_kwargs = False, so nothing reaches their forward.
        self.model_accepts_loss_kwargs = True
        self.train_labels = None if train_labels is None else np.asarray(train_labels, dtype=np.int64)
        self.nnldl_options = NNLDLOptions.from_config(self.model.config)
        self.class_weights = self._make_class_weights()
        self._component_sums: dict[str, torch.Tensor] = {}
        self._component_step = 0
        self.add_callback(_WaitForCheckpoint())
        self.channels_last = getattr(self.args, "channels_last", False)
        if self.channels_last:
            self.accelerator.unwrap_model(self.model).rald.backbone.to(memory_format=torch.channels_last)

    def _make_class_weights(self) -> torch.Tensor | None:
        args = self.args
        if not isinstance(args, RALDTrainingArguments):
            return None
        if (args.class_weighting == "balanced" or args.balanced_sampler) and self.train_labels is None:
            raise ValueError(
                "class_weighting='balanced' and balanced_sampler need the training labels: pass "
                "RALDTrainer(..., train_labels=...) with the model label id of every training image"
            )
        if args.class_weighting != "balanced":
            return None
        num_labels = self.model.config.num_labels
        present = np.unique(self.train_labels)
        weights = np.ones(num_labels)
        weights[present] = compute_class_weight("balanced", classes=present, y=self.train_labels)
        return torch.tensor(weights, dtype=torch.float32)

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        args = self.args
        if not (isinstance(args, RALDTrainingArguments) and args.balanced_sampler):
            return super()._get_train_sampler(train_dataset)
        counts = np.bincount(self.train_labels, minlength=self.model.config.num_labels)
        weights = 1.0 / counts[self.train_labels]
        generator = torch.Generator().manual_seed(args.seed)
        return WeightedRandomSampler(weights.tolist(), num_samples=len(weights), replacement=True, generator=generator)

    def nnldl_weight(self) -> float:
        """Return the NNLDL weight at the current optimizer step, after the linear warm-up."""
        weight = float(self.model.config.nnldl_weight)
        warmup = getattr(self.args, "nnldl_warmup_steps", 0)
        if warmup > 0:
            weight *= min(1.0, self.state.global_step / warmup)
        return weight

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Return cross-entropy plus the weighted NNLDL term (training only), normalised per image.

        Both terms are sums over the batch's images divided by ``num_items_in_batch`` in training (the images
        of the whole accumulated step) and by the batch size otherwise.
        """
        labels = inputs["labels"]
        pixel_values = inputs["pixel_values"]
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        outputs = model(pixel_values=pixel_values)
        # Both terms are computed in float32, also when the forward pass ran under bfloat16 autocast.
        logits = outputs.logits.float()
        labels = labels.to(logits.device)
        training = model.training and num_items_in_batch is not None
        count = num_items_in_batch if training else labels.numel()
        count = torch.as_tensor(count, dtype=logits.dtype, device=logits.device).clamp(min=1)

        weight = None if self.class_weights is None else self.class_weights.to(logits.device, logits.dtype)
        ce_loss = F.cross_entropy(logits, labels, weight=weight, reduction="sum") / count
        loss = ce_loss
        nnldl = None
        nnldl_weight = self.nnldl_weight()
        relations = self._nnldl_relations(model, outputs) if model.training and nnldl_weight > 0 else None
        if relations is not None:
            candidate_logits, offset = logits, 0
            if relations.shape[-1] != logits.shape[0]:
                # Global relation scope: the candidates are the images of every process.
                candidate_logits, offset = gather_across_processes(logits)
            nnldl = nnldl_loss(logits, relations, self.nnldl_options, candidate_logits, offset) / count
            loss = loss + nnldl_weight * nnldl

        if model.training:
            self._record_component("ce_loss", ce_loss)
            if nnldl is not None:
                self._record_component("nnldl_loss", nnldl)
        if training and self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            # DDP averages gradients over processes, but the count already covers every process.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _nnldl_relations(self, model: torch.nn.Module, outputs: Any) -> torch.Tensor | None:
        """Return the relation scores NNLDL picks neighbours from, (N, H, K), or ``None`` when there are none.

        With ``nnldl_relation="attention"`` these are the ITRR scores, which are absent without ITRR. With
        ``"features"`` they are the cosine similarities of the backbone features, as one head.
        """
        global_scope = self._global_relations(model)
        if self.nnldl_options.relation == "features":
            features = F.normalize(outputs.backbone_features.detach().float(), dim=-1)  # (N, Dv)
            candidates = gather_across_processes(features)[0] if global_scope else features  # (K, Dv)
            return (features @ candidates.T).unsqueeze(1)  # (N, 1, K)
        relations = outputs.image_relations
        if relations is not None and relations.shape[-1] != relations.shape[0] and not global_scope:
            raise ValueError(
                f"NNLDL needs the relations among the {relations.shape[0]} batch images, got relations to "
                f"{relations.shape[-1]} images; train with relation_mode 'transductive' or 'self'"
            )
        return relations

    def _global_relations(self, model: torch.nn.Module) -> bool:
        unwrapped = self.accelerator.unwrap_model(model)
        return unwrapped.rald.uses_global_relations()

    def _record_component(self, name: str, value: torch.Tensor) -> None:
        total = self._component_sums.get(name)
        value = value.detach().float()
        self._component_sums[name] = value if total is None else total + value

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean ``ce_loss`` and ``nnldl_loss`` per optimizer step since the last training log."""
        if "loss" in logs and self._component_sums:
            steps = max(self.state.global_step - self._component_step, 1)
            # With average_tokens_across_devices each process's term is already divided by the global image
            # count, so the terms of all processes add up; otherwise each is a per-process mean.
            reduction = "sum" if self.args.average_tokens_across_devices else "mean"
            for name, total in self._component_sums.items():
                if self.accelerator.num_processes > 1:
                    total = self.accelerator.reduce(total.to(self.args.device), reduction=reduction)
                logs[name] = round(float(total) / steps, 4)
            self._component_sums = {}
            self._component_step = self.state.global_step
        super().log(logs, start_time)


class ReferenceBankCallback(TrainerCallback):
    """Keep a model's reference bank in step with its backbone during training.

    At the start of training the bank is removed, because training changes the backbone that produced its
    features (evaluation during training then runs in transductive mode). At the end, after the Trainer has
    loaded the best checkpoint, the bank is rebuilt from ``dataset`` with the final weights.

    Args:
        dataset: Training images preprocessed for evaluation (no augmentation), with ``labels``.
        size: M, the number of images in the bank; 0 builds none.
        labels: The label of every item of ``dataset``, to draw the bank without reading every image.
        per_class: Draw the bank class-balanced.
        seed: Seed of the draw.
    """

    def __init__(
        self,
        dataset: Any,
        size: int = 128,
        labels: np.ndarray | None = None,
        per_class: bool = True,
        seed: int = 0,
    ) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.dataset = dataset
        self.size = size
        self.labels = labels
        self.per_class = per_class
        self.seed = seed

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, model: Any = None, **kwargs: Any):
        if model is not None and model.rald.has_reference_bank:
            logger.info("Removing the reference bank: training changes the backbone that produced it")
            model.rald.clear_reference_bank()

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, model: Any = None, **kwargs: Any):
        if model is None or self.size == 0:
            return
        batch_size = args.per_device_eval_batch_size
        model.build_reference_bank(
            self.dataset,
            size=self.size,
            per_class=self.per_class,
            seed=self.seed,
            batch_size=batch_size,
            labels=self.labels,
        )


class _WaitForCheckpoint(TrainerCallback):
    """Hold every process until the main process has written a checkpoint.

    Only the main process writes checkpoints, and the others would otherwise reach the loading of the best
    checkpoint at the end of training before it exists on disk, and keep other weights.
    """

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if args.world_size > 1:
            PartialState().wait_for_everyone()
