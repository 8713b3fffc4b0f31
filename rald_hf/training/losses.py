"""NNLDL, nearest-neighbour label distribution learning: a soft target from the most related images.

For image i, the k images most related to it by the ITRR scores Rv contribute their predicted class
distributions, weighted by r, to a target ``D_i = sum_j r_ij P_j / sum_j r_ij``. The loss ties the prediction
P_i to it. The loss depends on the batch by design: the neighbours are other images of the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..configuration_rald import RALDConfig

__all__ = ["NNLDLOptions", "nnldl_loss", "nnldl_target"]


@dataclass(frozen=True)
class NNLDLOptions:
    """The NNLDL choices of a `RALDConfig`; see its docstring for each field."""

    num_neighbors: int = 5
    include_self: bool = False
    relation: Literal["attention", "features"] = "attention"
    weighting: Literal["softmax", "raw", "uniform"] = "softmax"
    head_reduction: Literal["mean", "max"] = "mean"
    detach_target: bool = True
    loss: Literal["kl", "cross_entropy"] = "kl"
    reduction: Literal["batch_mean", "paper"] = "batch_mean"

    @classmethod
    def from_config(cls, config: RALDConfig) -> NNLDLOptions:
        return cls(
            num_neighbors=config.num_neighbors,
            include_self=config.nnldl_include_self,
            relation=config.nnldl_relation,
            weighting=config.nnldl_weighting,
            head_reduction=config.nnldl_head_reduction,
            detach_target=config.nnldl_detach_target,
            loss=config.nnldl_loss,
            reduction=config.nnldl_reduction,
        )


def nnldl_target(
    relations: torch.Tensor,
    neighbor_probs: torch.Tensor,
    options: NNLDLOptions,
    self_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Build each image's target distribution from its most related images.

    Args:
        relations: ITRR scores Rv, shape (N, H, K): image i of the batch against K candidate images.
        neighbor_probs: Predicted distributions of the K candidates, shape (K, Cf).
        options: The NNLDL choices.
        self_offset: Index of the batch's first image among the candidates, so that image i is candidate
            ``self_offset + i``. It is 0 when the candidates are the batch itself, and the position of this
            process's slice when they are the global batch of several processes.

    Returns:
        The targets (N, Cf) and the neighbour indices (N, k'), where k' = min(k, candidates), or ``None``
        when an image has no candidate (a batch of one image without ``include_self``).
    """
    num_images, _, num_candidates = relations.shape
    if options.head_reduction == "mean":
        scores = relations.mean(dim=1)  # (N, K)
    else:
        scores = relations.amax(dim=1)
    available = num_candidates if options.include_self else num_candidates - 1
    k = min(options.num_neighbors, available)
    if k < 1:
        return None

    if not options.include_self:
        rows = torch.arange(num_images, device=scores.device)
        scores = scores.index_put((rows, rows + self_offset), torch.tensor(float("-inf"), device=scores.device))
    top_scores, neighbors = scores.topk(k, dim=-1)  # (N, k)

    if options.weighting == "softmax":
        # softmax(Rv) renormalised over the k neighbours is a softmax over their scores.
        weights = top_scores.softmax(dim=-1)
    elif options.weighting == "raw":
        # Raw scores can be negative, and a negative weight has no meaning in a mean of distributions.
        weights = top_scores.clamp(min=0)
        total = weights.sum(dim=-1, keepdim=True)
        weights = torch.where(total > 0, weights / total.clamp(min=1e-12), torch.full_like(weights, 1.0 / k))
    else:
        weights = torch.full_like(top_scores, 1.0 / k)

    target = (weights.unsqueeze(-1) * neighbor_probs[neighbors]).sum(dim=1)  # (N, k, Cf) -> (N, Cf)
    if options.detach_target:
        target = target.detach()
    return target, neighbors


def nnldl_loss(
    logits: torch.Tensor,
    relations: torch.Tensor,
    options: NNLDLOptions,
    neighbor_logits: torch.Tensor | None = None,
    self_offset: int = 0,
) -> torch.Tensor:
    """Return the NNLDL loss summed over the images of the batch, as a scalar.

    The caller divides by the number of images (the batch size, or the item count over all accumulated
    micro-batches) to get a mean. With ``reduction="paper"`` each image's term is also divided by Cf, as in
    the published formula ``-1/(N*Cf) sum_i sum_c D_ic log P_ic``.

    Args:
        logits: The batch's logits, shape (N, Cf).
        relations: ITRR scores, shape (N, H, K).
        options: The NNLDL choices.
        neighbor_logits: Logits of the K candidates, shape (K, Cf); the batch's own logits by default.
        self_offset: See `nnldl_target`.

    Returns:
        A float32 scalar; zero (with a gradient path) when no image has a neighbour. Inputs in lower
        precision, such as the outputs of a forward pass under bfloat16 autocast, are cast to float32 first.
    """
    logits, relations = logits.float(), relations.float()
    if neighbor_logits is not None:
        neighbor_logits = neighbor_logits.float()
    if relations.shape[0] != logits.shape[0]:
        raise ValueError(f"relations cover {relations.shape[0]} images but logits {logits.shape[0]}")
    candidates = logits if neighbor_logits is None else neighbor_logits
    if relations.shape[-1] != candidates.shape[0]:
        raise ValueError(
            f"relations have {relations.shape[-1]} candidates but there are {candidates.shape[0]} candidate logits"
        )
    built = nnldl_target(relations, candidates.softmax(dim=-1), options, self_offset)
    if built is None:
        return logits.sum() * 0.0
    target, _ = built

    log_probs = F.log_softmax(logits, dim=-1)
    per_image = -(target * log_probs).sum(dim=-1)  # cross-entropy H(D, P)
    if options.loss == "kl":
        per_image = per_image + torch.xlogy(target, target).sum(dim=-1)  # minus the entropy of D
    if options.reduction == "paper":
        per_image = per_image / logits.shape[-1]
    return per_image.sum()
