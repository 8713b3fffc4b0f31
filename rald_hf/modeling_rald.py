"""PyTorch RALD model: a timm image encoder, ITRR, HLRR, LGIFO and a fine-label classifier.

RALD (relationship-awareness and label disambiguation) is the fine-grained facial expression recognition
method published in Acta Electronica Sinica (2024, no. 10). The label branch's tree-distance bias follows
the spatial encoding of Graphormer (Ying et al., "Do Transformers Really Perform Bad for Graph
Representation?", NeurIPS 2021). This file is copied into every saved checkpoint for ``trust_remote_code``
loading, so it imports only torch, timm, transformers and the configuration file.

Shape letters used in comments: N images in the batch, M images in the reference bank, K images an image
attends to (N, 1 or 1 + M), C label nodes of all levels, Cf fine labels, H heads, D block width, Dh = D / H,
Dv backbone feature width, Ds label embedding width.
"""

import hashlib
import operator
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from .configuration_rald import RALDConfig

logger = logging.get_logger(__name__)

__all__ = [
    "RALDForImageClassification",
    "RALDImageClassifierOutput",
    "RALDModel",
    "RALDModelOutput",
    "RALDPreTrainedModel",
]

RelationMode = Literal["transductive", "reference", "self"]

_version_counter = operator.attrgetter("_version")
_training_flag = operator.attrgetter("training")

# Uploads a model with its card and image processor; `rald_hf.hub` installs it on import. When this file
# runs as remote code without rald_hf, push_to_hub keeps transformers' own behaviour.
_PUSH_HANDLER: Callable[..., Any] | None = None


def set_push_handler(handler: Callable[..., Any] | None) -> None:
    """Make ``push_to_hub`` of RALD models call ``handler(model, repo_id, **kwargs)``."""
    global _PUSH_HANDLER
    _PUSH_HANDLER = handler


class _FieldTableOutput(ModelOutput):
    """`ModelOutput` whose field assignment looks the field names up in the dataclass's own table.

    ``ModelOutput.__setattr__`` collects the names anew on every assignment, and the dataclass constructor
    assigns every field. So building an output object took about 20 µs in a hot loop and 60 µs right after a
    MobileNetV2 call, most of a percent of the forward pass at batch 1. The stored values and dict entries
    are the same.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if value is not None and name in self.__dataclass_fields__:
            OrderedDict.__setitem__(self, name, value)
        object.__setattr__(self, name, value)


@dataclass
class RALDModelOutput(_FieldTableOutput):
    """Output of `RALDModel`.

    Args:
        last_hidden_state: Image features after ITRR and LGIFO (F̂), shape (N, D).
        image_relations: Raw relation scores λ·QKᵀ of ITRR, shape (N, H, K). K is N in transductive and self
            mode (the batch), the size of the global batch in multi-process training with global relation scope,
            and 1 + M in reference mode (the image itself, then the bank). ``None`` when ITRR is disabled, or in
            self and reference mode outside training.
        relation_offset: With global relation scope, the position of this process's first image in the global
            batch: image i of the batch is relation column ``relation_offset + i``. ``None`` otherwise.
        backbone_features: Pooled backbone features (F), shape (N, Dv).
        label_hidden_states: Label tokens after HLRR (S̃), shape (C, D).
        hidden_states: With ``output_hidden_states``: the projected backbone features, the ITRR output and
            the LGIFO output, each of shape (N, D).
    """

    last_hidden_state: torch.FloatTensor | None = None
    image_relations: torch.FloatTensor | None = None
    relation_offset: int | None = None
    backbone_features: torch.FloatTensor | None = None
    label_hidden_states: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class RALDImageClassifierOutput(_FieldTableOutput):
    """Output of `RALDForImageClassification`.

    Args:
        loss: Cross-entropy of the fine labels, when ``labels`` are given. The NNLDL term is added by
            `rald_hf.RALDTrainer`, not here.
        logits: Fine-label scores before softmax, shape (N, Cf).
        image_relations: See `RALDModelOutput`; NNLDL picks neighbours from them.
        relation_offset: See `RALDModelOutput`.
        last_hidden_state: Image features fed to the classifier (F̂), shape (N, D).
        backbone_features: Pooled backbone features (F), shape (N, Dv).
        hidden_states: See `RALDModelOutput`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    image_relations: torch.FloatTensor | None = None
    relation_offset: int | None = None
    last_hidden_state: torch.FloatTensor | None = None
    backbone_features: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class _Encoding(NamedTuple):
    """The fields of `RALDModelOutput` in a named tuple, which is cheaper to build than the output object."""

    last_hidden_state: torch.Tensor
    image_relations: torch.Tensor | None
    relation_offset: int | None
    backbone_features: torch.Tensor
    label_hidden_states: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    length, width = x.shape
    return x.view(length, num_heads, width // num_heads).transpose(0, 1)  # (L, D) -> (H, L, Dh)


def _split_fused_heads(x: torch.Tensor, num_heads: int, parts: int) -> tuple[torch.Tensor, ...]:
    """Split the output of a fused projection (L, parts * D) into ``parts`` tensors, each (H, L, Dh)."""
    length, width = x.shape
    return x.view(length, parts, num_heads, width // (parts * num_heads)).permute(1, 2, 0, 3).unbind(0)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    num_heads, length, head_width = x.shape
    return x.transpose(0, 1).reshape(length, num_heads * head_width)  # (H, L, Dh) -> (L, D)


def _is_plain(module: nn.Module, cls: type[nn.Module]) -> bool:
    """Return whether ``module`` is exactly a ``cls`` with no forward hooks, no ``forward`` set on the instance
    (as accelerate's hooks do) and no ``compile()``, so an equivalent computation may replace its call."""
    return (
        type(module) is cls
        and not (module._forward_hooks or module._forward_pre_hooks)
        and "forward" not in vars(module)
        and getattr(module, "_compiled_call_impl", None) is None
    )


def _exact_gelu(x: torch.Tensor) -> torch.Tensor:
    """Compute ``nn.GELU()`` (the exact, error-function form) as x/2 + x/2 · erf(x/√2).

    On CPU, ``F.gelu`` passes float32 tensors to oneDNN, which costs several microseconds per call whatever
    the size: more than the arithmetic for the rows of a small batch. In float32 these four elementwise
    operations give the same values to float rounding (within 2e-6 for |x| <= 12) in less time.
    """
    half = x * 0.5
    return torch.addcmul(half, half, torch.erf(x * 0.7071067811865476))


def hierarchy_buckets(distances: list[list[int]], sigma: int) -> tuple[list[list[int]], int]:
    """Turn tree distances into indices of the bias table.

    A distance d below ``sigma`` is its own bucket d; ``sigma`` (unrelated pairs) is the last bucket. Works
    on plain lists, so that models built on the meta device can size their bias table.

    Returns:
        The bucket index of every pair, same shape as ``distances``, and the number of buckets.
    """
    related = [value for row in distances for value in row if value < sigma]
    unrelated_bucket = max(related, default=0) + 1
    buckets = [[value if value < sigma else unrelated_bucket for value in row] for row in distances]
    return buckets, unrelated_bucket + 1


@dataclass
class InferenceConstants:
    """The parts of a forward pass that depend on weights only, never on the images.

    Args:
        label_tokens: HLRR output S̃, shape (C, D).
        label_keys: LGIFO keys of the label tokens, shape (H, C, Dh), or ``None`` without LGIFO.
        bank: ITRR keys and values of the reference bank, each of shape (H, M, Dh) and contiguous. ``None``
            outside reference mode.
        plan: The head laid out for evaluation calls without gradients (`EvaluationPlan`), or ``None`` in
            training, with gradients, or when a module of the head is not one RALD built or has hooks.
    """

    label_tokens: torch.Tensor
    label_keys: torch.Tensor | None
    bank: tuple[torch.Tensor, torch.Tensor] | None
    plan: "EvaluationPlan | None" = None


class _GatherRows(torch.autograd.Function):
    """All-gather equally sized row blocks; the backward pass returns each process the summed gradient of its
    own block. Built from ``all_gather`` and ``all_reduce``, which every backend (gloo, NCCL) supports."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor) -> torch.Tensor:
        ctx.rank = dist.get_rank()
        blocks = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(blocks, rows.contiguous())
        return torch.stack(blocks)  # (W, P, ...)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank]


def gather_across_processes(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate a tensor's rows from every process, keeping gradients, and find this process's rows.

    Batches may differ in size between processes (the last batch of an epoch), so rows are padded to the
    largest batch for the collective and the padding is removed afterwards. In the backward pass each process
    receives the gradients of its own rows summed over all processes. Data parallelism then averages the
    gradients, and the losses are scaled by the number of processes, so training matches one process that is
    given the whole global batch.

    Returns:
        The rows of all processes in rank order, shape (N_global, ...), and the index of this process's first
        row in them.
    """
    world_size, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = F.pad(tensor, (0, 0) * (tensor.ndim - 1) + (0, max(sizes) - tensor.shape[0]))
    blocks = _GatherRows.apply(padded)  # (W, max(sizes), ...)
    rows = torch.cat([blocks[i, :count] for i, count in enumerate(sizes)])
    return rows, sum(sizes[:rank])


def backbone_fingerprint(backbone: nn.Module, rounded_to: torch.dtype | None = None) -> str:
    """Summarise backbone weights in a short string that changes when the weights are trained further.

    Per tensor, the sum and the sum of squares, rounded to 4 significant digits so that the fingerprint
    survives device moves and casts to float64. Tiny weight changes below that precision go unnoticed.
    ``rounded_to`` first rounds each tensor to that dtype, which gives the fingerprint the weights will have
    after a cast to it.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in backbone.state_dict().items():
            if not tensor.is_floating_point():
                continue
            values = (tensor.detach() if rounded_to is None else tensor.detach().to(rounded_to)).double()
            digest.update(f"{name}:{float(values.sum()):.4g}:{float((values * values).sum()):.4g};".encode())
    return digest.hexdigest()[:16]


def bank_fingerprints(backbone: nn.Module) -> str:
    """Return the fingerprints the bank accepts, comma-separated: the weights as they are, then as casts to
    bfloat16 and float16 would round them, so that a cast model keeps its bank."""
    dtypes = (None, torch.bfloat16, torch.float16)
    return ",".join(dict.fromkeys(backbone_fingerprint(backbone, dtype) for dtype in dtypes))


def _tensors_key(tensors: Sequence[torch.Tensor | None]) -> tuple:
    """Return the storage addresses and in-place version counters of the tensors, for spotting changed weights."""
    try:
        # map with a C function loops in C, which is cheaper at batch 1 than a generator.
        return tuple(map(torch.Tensor.data_ptr, tensors)), tuple(map(_version_counter, tensors))
    except (RuntimeError, TypeError):
        # Tensors created under torch.inference_mode have no version counter, and a deleted tensor is None.
        # NOTE: in-place edits of inference tensors are not detected (see RALDModel.clear_inference_cache).
        return tuple(
            None if tensor is None else (tensor.data_ptr(), -1 if tensor.is_inference() else tensor._version)
            for tensor in tensors
        )


def select_reference_indices(labels: torch.Tensor, size: int, per_class: bool, seed: int) -> torch.Tensor:
    """Draw ``size`` item indices, class-balanced when ``per_class``, reproducibly for a seed."""
    generator = torch.Generator().manual_seed(seed)
    size = min(size, len(labels))
    if not per_class:
        return torch.randperm(len(labels), generator=generator)[:size].sort().values

    pools = {int(c): (labels == c).nonzero().flatten() for c in labels.unique()}
    pools = {c: pool[torch.randperm(len(pool), generator=generator)] for c, pool in pools.items()}
    quota = dict.fromkeys(pools, 0)
    remaining = size
    while remaining > 0:
        open_classes = [c for c in sorted(pools) if quota[c] < len(pools[c])]
        share, extra = divmod(remaining, len(open_classes))
        for position, c in enumerate(open_classes):
            take = min(share + (1 if position < extra else 0), len(pools[c]) - quota[c])
            quota[c] += take
            remaining -= take
    return torch.cat([pools[c][: quota[c]] for c in sorted(pools)]).sort().values


class RALDLayer(nn.Module):
    """An attention module followed by a feed-forward network, in one of three arrangements.

    With ``residual=False, norm_first=False`` (the published equations): ``y = Attn(x)``,
    ``out = Norm(y + FFN(y))``. ``residual=True`` adds ``x`` to ``Attn(x)``. ``norm_first=True`` gives
    pre-norm blocks: ``y = [x +] Attn(Norm(x))``, ``out = y + FFN(Norm(y))``.
    """

    def __init__(self, attention: nn.Module, config: RALDConfig, dim: int, normalize_context: bool) -> None:
        super().__init__()
        self.attention = attention
        self.residual = config.attention_residual
        self.norm_first = config.norm_first
        self.normalize_context = normalize_context
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps) if config.norm_first else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), act_layer=nn.GELU, drop=config.hidden_dropout_prob)
        # With zero_init_last, _init_weights starts both branches at zero, so the block starts as the identity
        # (post-norm blocks: as the layer norm of their input).
        # The mark sits on the Linear layers because transformers skips modules without parameters of their own.
        for last in (attention.proj, self.mlp.fc2):
            last._rald_zero_init = config.zero_init_last

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if context is not None and self.normalize_context:
            context = self.norm1(context)
        attended, scores = self.attention(self.norm1(x), context, **kwargs)
        hidden = x + attended if self.residual else attended

        if self.norm_first:
            return hidden + self.mlp(self.norm2(hidden)), scores
        return self.norm2(hidden + self.mlp(hidden)), scores

    def project_context(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalise context tokens as the block's input is normalised, then project them to keys and values."""
        if self.normalize_context:
            tokens = self.norm1(tokens)
        return self.attention.project_keys_values(tokens)


class ImageRelationAttention(nn.Module):
    """ITRR attention across images, which also returns its raw relation scores λ·QKᵀ per head."""

    def __init__(self, dim: int, num_heads: int, scale: float, attention_dropout: float, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = scale
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attention_dropout = nn.Dropout(attention_dropout)
        self.proj = nn.Linear(dim, dim)
        self.proj_dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend as `attend` does (same arguments), then apply the output projection and its dropout."""
        out, scores = self.attend(x, context, **kwargs)
        return self.proj_dropout(self.proj(out)), scores

    def attend(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mode: RelationMode = "transductive",
        bank: tuple[torch.Tensor, torch.Tensor] | None = None,
        need_scores: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from each of the N images in ``x`` to the images that ``mode`` selects, before the projection.

        Args:
            x: Image tokens, shape (N, D).
            context: Tokens of the images to attend to in transductive mode, shape (K, D), when these are
                more than ``x`` (the global batch of multi-process training). Defaults to ``x``.
            mode: ``"transductive"`` attends to the batch (or ``context``), ``"self"`` only to the image
                itself, ``"reference"`` to the image itself and the bank.
            bank: Keys and values of the reference bank, each (H, M, Dh), as `InferenceConstants.bank` holds
                them. Required in reference mode.
            need_scores: Return the relation scores in self and reference mode. Self mode does not need them
                for the attention, and reference mode computes a single image's attention in one
                ``scaled_dot_product_attention`` call, which does not return them.

        Returns:
            The heads' outputs, merged to shape (N, D), and the scores (N, H, K), or ``None`` in self and
            reference mode without ``need_scores``.
        """
        q, k, v = _split_fused_heads(self.qkv(x), self.num_heads, 3)  # 3 x (H, N, Dh)
        return self.relate(q, k, v, context, mode, bank, need_scores)

    def relate(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        context: torch.Tensor | None = None,
        mode: RelationMode = "transductive",
        bank: tuple[torch.Tensor, torch.Tensor] | None = None,
        need_scores: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend as `attend` does, from queries, keys and values (each (H, N, Dh)) already projected."""
        if mode == "reference":
            bank_keys, bank_values = bank  # 2 x (H, M, Dh)
            if q.shape[1] == 1 and not need_scores:
                # One image: its key and value go in front of the bank's, so one fused kernel does the attention
                # in fewer operations than the explicit form below.
                out = F.scaled_dot_product_attention(
                    q,
                    torch.cat([k, bank_keys], dim=1),  # (H, 1 + M, Dh)
                    torch.cat([v, bank_values], dim=1),
                    dropout_p=self.attention_dropout.p if self.training else 0.0,
                    scale=self.scale,
                )
                return _merge_heads(out), None
            self_scores = (q * k).sum(-1, keepdim=True)  # (H, N, 1)
            scores = torch.cat([self_scores, q @ bank_keys.transpose(-2, -1)], dim=-1) * self.scale  # (H, N, 1 + M)
            probs = scores.softmax(dim=-1)
            if self.training:
                probs = self.attention_dropout(probs)
            out = torch.baddbmm(probs[..., :1] * v, probs[..., 1:], bank_values)  # self term + bank terms
            if not need_scores:
                scores = None
        elif mode == "self":
            # Softmax over a single key is 1, so each image's output is its own value.
            scores = q @ k.transpose(-2, -1) * self.scale if need_scores else None  # (H, N, N)
            out = v
        else:
            if context is not None:
                k, v = self.project_keys_values(context)  # 2 x (H, K, Dh)
            scores = q @ k.transpose(-2, -1) * self.scale  # (H, N, K)
            out = self.attention_dropout(scores.softmax(dim=-1)) @ v

        return _merge_heads(out), None if scores is None else scores.transpose(0, 1)  # (N, H, K)

    def project_keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project tokens that need no query with the key and value rows of the fused projection.

        A plain ``nn.Linear`` projection is applied with its key and value rows only. Another module in its
        place (an adapter such as LoRA) or one with hooks is called as a module, and its query columns dropped.

        Returns:
            Keys and values, each of shape (H, K, Dh).
        """
        dim = self.proj.in_features
        if _is_plain(self.qkv, nn.Linear):
            keys_values = F.linear(tokens, self.qkv.weight[dim:], self.qkv.bias[dim:])  # (K, 2D)
        else:
            keys_values = self.qkv(tokens)[:, dim:]
        return _split_fused_heads(keys_values, self.num_heads, 2)


class LabelRelationAttention(nn.Module):
    """HLRR attention (HA-MSA): self-attention over label tokens with an additive tree-distance bias."""

    def __init__(self, dim: int, num_heads: int, scale: float, attention_dropout: float, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = scale
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, None]:
        q, k, v = _split_fused_heads(self.qkv(x), self.num_heads, 3)  # 3 x (H, C, Dh)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=bias,  # (C, C), the same for every head
            dropout_p=self.attention_dropout if self.training else 0.0,
            scale=self.scale,
        )
        return self.proj_dropout(self.proj(_merge_heads(out))), None


class LabelGuidedAttention(nn.Module):
    """LGIFO attention: image queries attend to label keys; the values are the label tokens themselves."""

    def __init__(self, dim: int, num_heads: int, scale: float, attention_dropout: float, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = scale
        self.attention_dropout = attention_dropout
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor, label_keys: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, None]:
        """Attend as `attend` does, then apply the output projection and its dropout."""
        out, _ = self.attend(x, labels, label_keys)
        return self.proj_dropout(self.proj(out)), None

    def fold_labels(
        self, labels: torch.Tensor, label_keys: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fold the query and output projections into the label keys and values.

        The scores of head h, ``scale * (W_q x + b_q)_h · k_hc``, are linear in the image token x, and the
        projected output ``W_o [Σ_c p_hc v_hc]_h`` is linear in the attention weights p. With label tokens that
        do not depend on the images, both maps can be computed once.

        Args:
            labels: Label tokens (C, D), which are also the values.
            label_keys: Their keys (H, C, Dh).

        Returns:
            Score weights (H * C, D) and biases (H * C,), so that the scores of all heads are one linear map of
            x, and the values after the output projection (H * C, D), without the projection's bias.
        """
        num_heads, count, head_width = label_keys.shape
        dim = labels.shape[1]
        query_weight = self.q.weight.view(num_heads, head_width, dim)
        query_bias = self.q.bias.view(num_heads, head_width)
        score_weight = torch.einsum("hcd,hde->hce", label_keys, query_weight) * self.scale  # (H, C, D)
        score_bias = torch.einsum("hcd,hd->hc", label_keys, query_bias) * self.scale  # (H, C)
        output_weight = self.proj.weight.view(dim, num_heads, head_width)
        projected_values = torch.einsum("hcd,ehd->hce", _split_heads(labels, num_heads), output_weight)  # (H, C, D)
        return (
            score_weight.reshape(num_heads * count, dim),
            score_bias.reshape(num_heads * count),
            projected_values.reshape(num_heads * count, dim),
        )

    def attend_folded(self, x: torch.Tensor, folded: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Compute `forward` in evaluation from `fold_labels`' output: two matrix products and a softmax.

        Returns:
            The projected output (N, D), with the projection's bias.
        """
        score_weight, score_bias, projected_values = folded
        probs = F.linear(x, score_weight, score_bias).view(len(x), self.num_heads, -1).softmax(dim=-1)
        return torch.addmm(self.proj.bias, probs.view(len(x), -1), projected_values)

    def attend(
        self, x: torch.Tensor, labels: torch.Tensor, label_keys: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, None]:
        """Attend from image tokens (N, D) to label tokens (C, D), before the projection.

        ``label_keys`` (H, C, Dh) may be precomputed. Returns the heads' outputs merged to (N, D), and
        ``None`` in place of relation scores.
        """
        q = _split_heads(self.q(x), self.num_heads)  # (H, N, Dh)
        k = self.project_keys(labels) if label_keys is None else label_keys  # (H, C, Dh)
        v = _split_heads(labels, self.num_heads)  # (H, C, Dh), no value projection
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attention_dropout if self.training else 0.0, scale=self.scale
        )
        return _merge_heads(out), None

    def project_keys(self, labels: torch.Tensor) -> torch.Tensor:
        """Project label tokens (C, D) to keys (H, C, Dh)."""
        return _split_heads(self.k(labels), self.num_heads)


class LabelEncoder(nn.Module):
    """HLRR branch: frozen label embeddings, projected to the block width and related through the tree.

    The embeddings (C, Ds) and the bias-table index of every node pair (C, C) are persistent buffers, so a
    checkpoint loaded on the meta device gets them back from its weights file.
    """

    def __init__(self, config: RALDConfig, dim: int, scale: float) -> None:
        super().__init__()
        embeddings = torch.tensor(config.label_embeddings, dtype=torch.float32)  # (C, Ds)
        buckets, num_buckets = hierarchy_buckets(config.hierarchy_distances, config.sigma)
        self.register_buffer("label_embeddings", embeddings, persistent=True)
        self.register_buffer("distance_buckets", torch.tensor(buckets), persistent=True)  # (C, C)
        self.proj = nn.Linear(embeddings.shape[1], dim)
        # One learnable scalar per distance bucket, shared by the heads.
        self.hierarchy_bias = nn.Embedding(num_buckets, 1) if config.use_hierarchy_bias else None
        attention = LabelRelationAttention(
            dim, config.num_attention_heads, scale, config.attention_dropout_prob, config.hidden_dropout_prob
        )
        self.layer = RALDLayer(attention, config, dim, normalize_context=False)
        self.final_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps) if config.norm_first else nn.Identity()

    def forward(self) -> torch.Tensor:
        tokens = self.proj(self.label_embeddings)  # (C, D)
        bias = None
        if self.hierarchy_bias is not None:
            bias = self.hierarchy_bias(self.distance_buckets).squeeze(-1).to(tokens.dtype)  # (C, C)
        tokens, _ = self.layer(tokens, bias=bias)
        return self.final_norm(tokens)


def _layer_norm(norm: tuple, x: torch.Tensor) -> torch.Tensor:
    """Apply a layer norm given as ``(normalized_shape, weight, bias, eps)``."""
    return F.layer_norm(x, *norm)


def _layer_norm_args(norm: nn.LayerNorm) -> tuple:
    return norm.normalized_shape, norm.weight, norm.bias, norm.eps


def _global_forward_hooks() -> bool:
    """Return whether a forward hook for every module is registered (``register_module_forward_hook``)."""
    hooks = torch.nn.modules.module
    return bool(getattr(hooks, "_global_forward_hooks", None) or getattr(hooks, "_global_forward_pre_hooks", None))


class _NotPlannable(Exception):
    """A module of the head is not what `EvaluationPlan` computes: another class, hooks, or compiled."""


class _Affine(NamedTuple):
    """A linear layer as one ``addmm``: its weight transposed to (in, out) and made contiguous, and its bias.

    For the few rows of a small batch on CPU, the product with the weight in this layout takes about half the
    time of ``F.linear`` with the layer's own (out, in) weight.
    """

    weight_t: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def of(cls, linear: nn.Linear) -> "_Affine":
        return cls(linear.weight.t().contiguous(), linear.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return x @ self.weight_t
        return torch.addmm(self.bias, x, self.weight_t)


class _BlockPlan(NamedTuple):
    """A `RALDLayer` around its attention: residual, layer norms and feed-forward network, as `RALDLayer.forward`
    computes them with dropout off."""

    residual: bool
    norm_first: bool
    norm1: tuple | None  # layer-norm arguments (`_layer_norm_args`), pre-norm blocks only
    norm2: tuple
    fc1: _Affine
    fc2: _Affine

    def run(self, x: torch.Tensor, attend: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        attended = attend(_layer_norm(self.norm1, x) if self.norm_first else x)
        hidden = x + attended if self.residual else attended
        inner = self.fc1(_layer_norm(self.norm2, hidden) if self.norm_first else hidden)
        inner = _exact_gelu(inner) if inner.device.type == "cpu" and inner.dtype == torch.float32 else F.gelu(inner)
        if self.norm_first:
            return hidden + self.fc2(inner)
        return _layer_norm(self.norm2, hidden + self.fc2(inner))


class EvaluationPlan:
    """RALD's image path after the backbone, as tensor operations on cached weights instead of module calls.

    At batch 1 after a small backbone, the Python work of about 40 calls of small modules costs more than
    their arithmetic. So evaluation calls without gradients run the head through this plan, which computes
    the same values as the modules with dropout off. Each linear layer becomes one
    ``addmm`` with its weight transposed (`_Affine`), and the layer norms and the exact GELU become functions.
    LGIFO's query and output projections are folded into the label keys and values
    (`LabelGuidedAttention.fold_labels`). The attention itself stays in the attention
    modules' methods (`ImageRelationAttention.relate`, `LabelGuidedAttention.attend_folded`).

    The plan is built with the inference constants, so it follows the same weight check (`RALDModel._weights_key`)
    and is rebuilt whenever a weight of the head changes. It is built only when every module of the head (all
    but the backbone and the label encoder) is of the class RALD creates, with no hooks, no ``forward`` set
    on the instance and no ``compile()`` (`_is_plain`). Each call first checks (`applies`) that the same
    modules, of the same classes, are still in place and in evaluation mode. After any hook registration,
    and on the first call, it also checks that none of them has a hook and that no global forward hook
    exists. If a check fails, the model calls its modules. So a hook added at any time runs, and an adapter
    put in a module's place is used from the next call.
    """

    def __init__(self, model: "RALDModel", label_tokens: torch.Tensor, label_keys: torch.Tensor | None) -> None:
        self._checked: list[tuple[dict, str, nn.Module]] = []
        take = self._take
        self.feature_norm = None
        if model.feature_norm is not None:
            norm = take(model, "feature_norm", nn.BatchNorm1d)
            if norm.running_mean is None or norm.weight is None:
                raise _NotPlannable("feature_norm without running statistics or affine weights")
            self.feature_norm = (norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
        image_proj = take(model, "image_proj", nn.Linear, nn.Identity)
        self.image_proj = _Affine.of(image_proj) if isinstance(image_proj, nn.Linear) else None

        self.itrr = None
        if model.itrr is not None:
            layer = take(model, "itrr", RALDLayer)
            attention = take(layer, "attention", ImageRelationAttention)
            take(attention, "attention_dropout", nn.Dropout)
            take(attention, "proj_dropout", nn.Dropout)
            qkv, proj = _Affine.of(take(attention, "qkv", nn.Linear)), _Affine.of(take(attention, "proj", nn.Linear))
            self.itrr = (self._block(layer), attention, qkv, proj)

        self.lgifo = None
        if model.lgifo is not None:
            layer = take(model, "lgifo", RALDLayer)
            attention = take(layer, "attention", LabelGuidedAttention)
            for name in ("q", "k", "proj"):
                take(attention, name, nn.Linear)
            take(attention, "proj_dropout", nn.Dropout)
            self.lgifo = (self._block(layer), attention, attention.fold_labels(label_tokens, label_keys))

        final_norm = take(model, "final_norm", nn.LayerNorm, nn.Identity)
        self.final_norm = _layer_norm_args(final_norm) if isinstance(final_norm, nn.LayerNorm) else None

        # What `applies` compares on every call, as tuples that `map` walks in C.
        self._parents, self._names, self._modules = (tuple(column) for column in zip(*self._checked, strict=True))
        self._classes = tuple(map(type, self._modules))
        self._handles_seen = -1  # so that the first call also looks for global hooks

    @classmethod
    def build(
        cls, model: "RALDModel", label_tokens: torch.Tensor, label_keys: torch.Tensor | None
    ) -> "EvaluationPlan | None":
        """Return the plan of ``model``'s head, or ``None`` when a module of the head is not plain."""
        try:
            return cls(model, label_tokens, label_keys)
        except _NotPlannable as error:
            logger.debug("Evaluation calls run the head's modules, without a plan: %s", error)
            return None

    def _take(self, parent: nn.Module, name: str, *classes: type) -> nn.Module:
        """Return ``parent``'s child ``name`` if it is a plain module of one of ``classes``, and record it for
        `applies`."""
        module = parent._modules.get(name)
        if type(module) not in classes or not _is_plain(module, type(module)):
            raise _NotPlannable(f"{name} is {type(module).__name__}, not a plain {[c.__name__ for c in classes]}")
        self._checked.append((parent._modules, name, module))
        return module

    def _block(self, layer: "RALDLayer") -> _BlockPlan:
        take = self._take
        norm1 = take(layer, "norm1", nn.LayerNorm if layer.norm_first else nn.Identity)
        norm2 = take(layer, "norm2", nn.LayerNorm)
        mlp = take(layer, "mlp", Mlp)
        fc1, act, fc2 = take(mlp, "fc1", nn.Linear), take(mlp, "act", nn.GELU), take(mlp, "fc2", nn.Linear)
        if act.approximate != "none":
            raise _NotPlannable("the feed-forward network's GELU is not the exact one")
        take(mlp, "drop1", nn.Dropout)
        take(mlp, "norm", nn.Identity)
        take(mlp, "drop2", nn.Dropout)
        return _BlockPlan(
            residual=layer.residual,
            norm_first=layer.norm_first,
            norm1=_layer_norm_args(norm1) if layer.norm_first else None,
            norm2=_layer_norm_args(norm2),
            fc1=_Affine.of(fc1),
            fc2=_Affine.of(fc2),
        )

    def applies(self) -> bool:
        """Return whether the modules the plan was built from are still in place and plain (see the class).

        Every hook registration takes a number from `RemovableHandle`, so the hooks of the modules need a new
        look only when that count has moved. ``forward`` set on an instance, or ``compile()``, after the plan
        was built is not seen; the plan computes the same values, and ``clear_inference_cache`` drops it.
        """
        handles = RemovableHandle.next_id  # read before the checks, so a hook registered meanwhile is seen next time
        if tuple(map(dict.get, self._parents, self._names)) != self._modules:
            return False  # a module was replaced, by an adapter for example
        if tuple(map(type, self._modules)) != self._classes:
            return False  # a module's class was changed in place, as torch.nn.utils.parametrize does
        if any(map(_training_flag, self._modules)):
            return False  # a module set to training on its own (batch-norm adaptation, Monte Carlo dropout)
        if handles != self._handles_seen:
            if _global_forward_hooks() or not all(_is_plain(module, type(module)) for module in self._modules):
                return False
            self._handles_seen = handles
        return True

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Compute `RALDModel.embed_features` (with running statistics): features (N, Dv) -> tokens (N, D)."""
        if self.feature_norm is not None:
            features = F.batch_norm(features, *self.feature_norm)
        return features if self.image_proj is None else self.image_proj(features)

    def relate(
        self, tokens: torch.Tensor, mode: RelationMode, bank: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Compute the ITRR block on image tokens (N, D), as `RALDModel.itrr` does in evaluation.

        Returns:
            The tokens after the block, and the relation scores (N, H, N) in transductive mode or ``None``.
        """
        block, attention, qkv, proj = self.itrr
        relations = None

        def attend(x: torch.Tensor) -> torch.Tensor:
            nonlocal relations
            q, k, v = _split_fused_heads(qkv(x), attention.num_heads, 3)
            out, relations = attention.relate(q, k, v, mode=mode, bank=bank, need_scores=False)
            return proj(out)

        return block.run(tokens, attend), relations

    def guide(self, tokens: torch.Tensor) -> torch.Tensor:
        """Compute the LGIFO block on image tokens (N, D), as `RALDModel.lgifo` does in evaluation."""
        block, attention, folded = self.lgifo
        return block.run(tokens, lambda x: attention.attend_folded(x, folded))

    def run(
        self, features: torch.Tensor, mode: RelationMode | None, bank: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """Run the head on backbone features (N, Dv).

        Returns:
            A tuple of four (N, D) tensors (the image tokens, the tokens after ITRR, the tokens after LGIFO
            and the last hidden state), and the ITRR relation scores in transductive mode or ``None``.
        """
        tokens = self.embed(features)
        related, relations = (tokens, None) if self.itrr is None else self.relate(tokens, mode, bank)
        guided = related if self.lgifo is None else self.guide(related)
        last = guided if self.final_norm is None else _layer_norm(self.final_norm, guided)
        return (tokens, related, guided, last), relations


class RALDPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading conventions shared by the RALD models."""

    config: RALDConfig
    config_class = RALDConfig
    base_model_prefix = "rald"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # The Trainer must not pass num_items_in_batch to forward: RALDTrainer computes the loss itself.
    accepts_loss_kwargs = False
    _no_split_modules = ["RALDModel"]

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """Save as `PreTrainedModel.save_pretrained` does, with every RALD class in the config's ``auto_map``.

        transformers records only the saved class, so a checkpoint of the classifier would otherwise not load
        through ``AutoModel`` with ``trust_remote_code=True``.
        """
        if self.is_remote_code():
            classes = {
                "AutoConfig": RALDConfig,
                "AutoModel": RALDModel,
                "AutoModelForImageClassification": RALDForImageClassification,
            }
            self.config.auto_map = {
                auto_class: f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}" for auto_class, cls in classes.items()
            }
        super().save_pretrained(save_directory, *args, **kwargs)

    def push_to_hub(self, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        """Upload the model, its image processor, remote code and a RALD model card to the Hub.

        With `rald_hf` installed this is `rald_hf.hub.push_to_hub`, which writes its own model card (labels,
        tree, recipe, metrics, terms of the training data); see there for the arguments. Otherwise it is
        `PreTrainedModel.push_to_hub`.
        """
        if _PUSH_HANDLER is None:
            return super().push_to_hub(repo_id, *args, **kwargs)
        if args:
            raise TypeError("Pass push_to_hub options by keyword")
        return _PUSH_HANDLER(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        *model_args: Any,
        label_space: Any = None,
        word_vectors: Any = None,
        **kwargs: Any,
    ) -> "RALDPreTrainedModel":
        """Load a checkpoint as `PreTrainedModel.from_pretrained` does, optionally for another label set.

        Args:
            pretrained_model_name_or_path: A Hub id or a checkpoint folder.
            label_space: A `rald_hf.LabelSpace` for a new label set. The model keeps the checkpoint's
                backbone and attention weights and gets new label embeddings, distances, classifier and no
                reference bank (see `for_label_space`). Without it, the checkpoint's own labels are kept.
            word_vectors: Word vectors for the new label embeddings (the shipped vocabulary by default).
            **kwargs: As for `PreTrainedModel.from_pretrained`.

        Raises:
            ValueError: When ``config``, ``num_labels``, ``id2label`` or ``label2id`` would give the
                checkpoint another label set without ``label_space``.
        """
        for key in ("num_labels", "id2label", "label2id"):
            if key in kwargs:
                raise ValueError(
                    f"RALD checkpoints take their labels from a label space; instead of {key}=..., pass "
                    "label_space=LabelSpace(...) to start a model for new labels from this checkpoint"
                )
        requested = kwargs.get("config")
        if label_space is None and isinstance(requested, RALDConfig) and requested.has_labels:
            hub_keys = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
            stored = RALDConfig.from_pretrained(
                pretrained_model_name_or_path, **{key: kwargs[key] for key in hub_keys if key in kwargs}
            )
            _check_same_labels(stored, requested, pretrained_model_name_or_path)
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if label_space is not None:
            model = model.for_label_space(label_space, word_vectors=word_vectors)
        return model

    def for_label_space(
        self, label_space: Any, word_vectors: Any = None, **config_overrides: Any
    ) -> "RALDPreTrainedModel":
        """Return a model of the same architecture for another label set, starting from these weights.

        The backbone, the projections and the ITRR, HLRR and LGIFO blocks keep their trained (and trainable)
        weights. What depends on the labels is new: label embeddings and tree distances from ``label_space``,
        a freshly initialised hierarchy-bias table and classifier, and no reference bank. A label space
        without a tree gives RALD-L. Train the result, then build its reference bank.

        Args:
            label_space: A `rald_hf.LabelSpace` (only its methods are called).
            word_vectors: Word vectors for the new label embeddings.
            **config_overrides: Other `RALDConfig` fields for the new model, such as ``num_neighbors``.
                Fields that define the architecture (backbone, widths, block layout) must keep their values.
        """
        kept = {name: getattr(self.config, name) for name in _TRANSFERRED_FIELDS}
        changed = [
            name for name in _ARCHITECTURE_FIELDS if name in config_overrides and config_overrides[name] != kept[name]
        ]
        if changed:
            raise ValueError(
                f"{changed} define the architecture and come from the checkpoint "
                f"({ {name: kept[name] for name in changed} }); train a new model to change them"
            )
        config = RALDConfig.from_label_space(label_space, vectors=word_vectors, **{**kept, **config_overrides})
        new_model = type(self)(config)
        target = new_model.state_dict()
        transferred = {
            key: value
            for key, value in self.state_dict().items()
            if key in target and target[key].shape == value.shape and not _is_label_dependent(key)
        }
        new_model.load_state_dict(transferred, strict=False)
        logger.info(
            "Started a model for %d labels from %d of %d tensors of the checkpoint",
            config.num_labels,
            len(transferred),
            len(target),
        )
        return new_model

    def _init_weights(self, module: nn.Module) -> None:
        if getattr(module, "_rald_timm_initialized", False):
            # timm initialised the backbone when creating it, with the scheme of each architecture.
            return
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "_rald_zero_init", False):
                init.zeros_(module.weight)
            else:
                init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm1d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, LabelEncoder):
            init.copy_(module.label_embeddings, torch.tensor(self.config.label_embeddings))
            buckets, _ = hierarchy_buckets(self.config.hierarchy_distances, self.config.sigma)
            init.copy_(module.distance_buckets, torch.tensor(buckets))
            if module.hierarchy_bias is not None:
                # Start with a bias that falls with distance (bucket b gets -b), so near nodes are favoured from
                # the first step; training adjusts it.
                num_buckets = module.hierarchy_bias.num_embeddings
                init.copy_(module.hierarchy_bias.weight, -torch.arange(num_buckets, dtype=torch.float32)[:, None])
        elif isinstance(module, RALDModel):
            init.zeros_(module.reference_features)
            init.zeros_(module.reference_labels)


class RALDModel(RALDPreTrainedModel):
    """RALD without the classifier: image encoder, ITRR, HLRR and LGIFO.

    ``forward`` maps images (N, 3, H, W) to label-aware image features (N, D) and returns the image relation
    scores that NNLDL needs.
    """

    def __init__(self, config: RALDConfig) -> None:
        super().__init__(config)
        if not config.has_labels:
            raise ValueError("The config has no label space; build it with RALDConfig.from_label_space(LabelSpace...)")

        # Image encoder
        self.backbone = _create_backbone(config)
        backbone_width = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        dim = config.hidden_size or backbone_width
        if dim % config.num_attention_heads:
            raise ValueError(
                f"The block width {dim} (the backbone's width, since hidden_size is None) is not divisible by "
                f"num_attention_heads={config.num_attention_heads}"
            )
        scale = config.attention_scale or (dim // config.num_attention_heads) ** -0.5
        self.feature_norm = nn.BatchNorm1d(backbone_width) if config.feature_norm == "batch_norm" else None
        self.image_proj = nn.Linear(backbone_width, dim) if config.hidden_size else nn.Identity()
        self.backbone_width = backbone_width
        self.width = dim

        # ITRR: relations between images
        self.itrr = None
        if config.use_itrr:
            attention = ImageRelationAttention(
                dim, config.num_attention_heads, scale, config.attention_dropout_prob, config.hidden_dropout_prob
            )
            self.itrr = RALDLayer(attention, config, dim, normalize_context=True)

        # HLRR: relations between labels
        self.label_encoder = LabelEncoder(config, dim, scale)

        # LGIFO: label-guided image features
        self.lgifo = None
        if config.use_lgifo:
            attention = LabelGuidedAttention(
                dim, config.num_attention_heads, scale, config.attention_dropout_prob, config.hidden_dropout_prob
            )
            self.lgifo = RALDLayer(attention, config, dim, normalize_context=False)
        self.final_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps) if config.norm_first else nn.Identity()

        # Reference bank: backbone features of training images, for batch-independent inference
        bank_size = config.reference_bank_size
        self.register_buffer("reference_features", torch.zeros(bank_size, backbone_width), persistent=True)
        self.register_buffer("reference_labels", torch.zeros(bank_size, dtype=torch.long), persistent=True)

        # Inference constants, reused while the key of `_weights_key` is unchanged.
        self._constants: tuple[tuple, InferenceConstants] | None = None
        self._tracked_slots: tuple[tuple[dict, ...], tuple[str, ...]] | None = None
        # Whether the bank was checked against the backbone since the last event that may change it, and the
        # backbone's tensor key at that check (see _check_bank_fingerprint).
        self._bank_checked = False
        self._backbone_key: tuple | None = None
        self.register_load_state_dict_post_hook(lambda module, incompatible_keys: module._forget_tensors())
        self.post_init()

    @property
    def has_reference_bank(self) -> bool:
        return self.reference_features.shape[0] > 0

    def load_backbone_weights(self, checkpoint_path: str | None = None) -> None:
        """Load pretrained weights into the backbone through timm.

        Args:
            checkpoint_path: A local timm checkpoint (``.safetensors``, ``.pth`` or ``.bin``), loaded through
                timm's ``pretrained_cfg_overlay={"file": ...}`` so that timm adapts it as for any pretrained
                model (classifier removed, input channels adapted). ``None`` lets timm fetch the default
                pretrained weights of the architecture, which needs network access.
        """
        overlay = None
        if checkpoint_path is not None:
            if not os.path.isfile(checkpoint_path):
                raise FileNotFoundError(f"Backbone weights file {checkpoint_path} not found")
            overlay = {"file": str(checkpoint_path)}
        try:
            pretrained = _create_backbone(self.config, pretrained=True, pretrained_cfg_overlay=overlay)
        except RuntimeError as error:
            mismatched = str(error).count("size mismatch")
            if not mismatched and "Missing key" not in str(error):
                raise
            raise ValueError(
                f"The weights in {checkpoint_path or 'timm'} do not fit the {self.config.backbone} backbone "
                f"({mismatched} tensors differ in shape; first problem: {_first_line(error)}). Pass weights saved "
                f"from a {self.config.backbone} model, or choose the backbone those weights belong to."
            ) from error
        self.backbone.load_state_dict(pretrained.state_dict())
        logger.info("Loaded backbone weights for %s from %s", self.config.backbone, checkpoint_path or "timm")

    # Reference bank

    def set_reference_bank(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Store backbone features (M, Dv) and their fine labels (M,) as the reference bank.

        The bank contains features derived from training images, which a saved checkpoint carries along. It
        records a fingerprint of the backbone weights, and reference mode raises an error when the backbone
        no longer matches it. Pass empty tensors to remove the bank.
        """
        if features.ndim != 2 or features.shape[1] != self.backbone_width:
            raise ValueError(
                f"Reference features must have shape (M, {self.backbone_width}), got {tuple(features.shape)}"
            )
        if labels.shape != (features.shape[0],):
            raise ValueError(f"Reference labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}")
        device = self.reference_features.device
        self.reference_features = features.detach().to(device=device, dtype=self.reference_features.dtype)
        self.reference_labels = labels.detach().to(device=device, dtype=torch.long)
        self.config.reference_bank_size = int(features.shape[0])
        self.config.reference_bank_fingerprint = bank_fingerprints(self.backbone) if len(features) else None
        self._forget_tensors()

    def clear_reference_bank(self) -> None:
        """Remove the reference bank, for example before the backbone is trained further."""
        self.set_reference_bank(self.reference_features[:0], self.reference_labels[:0])

    @torch.no_grad()
    def build_reference_bank(
        self,
        dataset: Any,
        size: int = 128,
        per_class: bool = True,
        seed: int = 0,
        batch_size: int = 64,
        labels: Sequence[int] | None = None,
    ) -> None:
        """Fill the reference bank with backbone features of images drawn from ``dataset``.

        Args:
            dataset: Indexable items with ``pixel_values`` (a (3, H, W) tensor, preprocessed as for
                evaluation, without augmentation) and ``labels`` (the model's fine-label id), such as a split
                prepared by `rald_hf.training.prepare_splits` and passed through ``for_evaluation``.
            size: M, the number of images in the bank.
            per_class: Draw the same number of images from every class present (classes with too few images
                give all they have, and the rest is shared among the others); otherwise draw uniformly.
            seed: Seed of the draw.
            batch_size: Images per backbone pass.
            labels: The label of every item. Without them every item is read once to find its label.
        """
        if size < 1:
            raise ValueError(f"size must be a positive number of images, got {size}")
        if labels is None:
            labels = [int(dataset[i]["labels"]) for i in range(len(dataset))]
        labels = torch.as_tensor(list(labels), dtype=torch.long)
        if len(labels) != len(dataset):
            raise ValueError(f"labels has {len(labels)} entries for a dataset of {len(dataset)} images")
        indices = select_reference_indices(labels, size, per_class, seed)

        was_training = self.training
        self.eval()
        device = self.reference_features.device
        features = []
        for start in range(0, len(indices), batch_size):
            batch = [dataset[int(i)]["pixel_values"] for i in indices[start : start + batch_size]]
            pixel_values = torch.stack(batch).to(device=device, dtype=self.reference_features.dtype)
            features.append(self.extract_backbone_features(pixel_values))
        self.train(was_training)
        self.set_reference_bank(torch.cat(features), labels[indices])
        logger.info("Built a reference bank of %d images", len(indices))

    # Weight-only parts of the forward pass

    def clear_inference_cache(self) -> None:
        """Drop the cached inference constants and bank check, so that the next call recomputes them.

        The cache notices optimizer steps, ``load_state_dict``, device moves and in-place edits of the head
        by itself. `_weights_key` and `_check_bank_fingerprint` describe what each check covers. Call this
        after edits that bypass version counters (through ``tensor.data``, or in place on weights created
        under ``torch.inference_mode``), and after in-place edits of inner backbone weights between two
        evaluation calls (weight averaging, ``copy_`` under ``torch.no_grad``).
        """
        self._forget_tensors()

    def _forget_tensors(self) -> None:
        """Drop the tracked tensor lists and every cached result, after tensors were replaced or reloaded."""
        self._tracked_slots = None
        self._constants = None
        self._bank_checked = False
        self._backbone_key = None

    def _apply(self, fn, *args, **kwargs):
        # Device and dtype moves replace buffers, so the tracked tensor list must be rebuilt.
        self._forget_tensors()
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True) -> "RALDModel":
        # Weights change hands between training and inference at a mode switch, so the bank is checked again.
        # The tracked tensors are listed again too, in case modules were replaced (by adapters such as LoRA).
        self._bank_checked = False
        self._tracked_slots = None
        return super().train(mode)

    def _weights_key(self) -> tuple:
        """Return a key that changes whenever a weight the inference constants depend on changes.

        It contains the storage address and the in-place version counter of every parameter and buffer outside
        the backbone, which the constants and the evaluation plan are computed from (`_constant_slots`), and of
        the backbone's first and last parameters, which represent the backbone in the reference bank's check. So
        an optimizer step, ``load_state_dict``, an in-place edit of such a tensor or a device move changes it.
        The tensors are read from their modules' parameter and buffer tables on every call, so a tensor put in
        a parameter's place (``layer.weight = nn.Parameter(...)``, ``torch.func.functional_call``) changes it
        too. Reading the counters of all 353 tensors of RALD on MobileNetV2 on every call cost several percent
        of the forward pass at batch 1. The table entries are kept between calls, because walking the module
        tree costs more than reading the counters, and listed again after a mode switch, a load or a device
        move.
        """
        if self._tracked_slots is None:
            backbone = [name for name, _ in self.backbone.named_parameters()]
            slots = self._constant_slots()
            for name in (backbone[0], backbone[-1]):
                owner, _, leaf = name.rpartition(".")
                slots.append((self.backbone.get_submodule(owner)._parameters, leaf))
            owners, names = zip(*slots, strict=True)
            self._tracked_slots = (owners, names)
        return _tensors_key(tuple(map(dict.get, *self._tracked_slots)))

    def inference_constants(self, with_bank: bool) -> InferenceConstants:
        """Return the label tokens, LGIFO label keys and (``with_bank``) bank keys and values.

        None of them depends on the images, so in evaluation-mode calls without gradients they are computed
        once, together with the `EvaluationPlan` of the head, and reused until a weight changes (see
        `_weights_key`).

        Raises:
            ValueError: When ``with_bank`` and the bank was built with other backbone weights.
        """
        if self.training or torch.is_grad_enabled():
            # Weights may have changed before such a call and may change after it (an optimizer step, batch-norm
            # statistics), so the bank is checked in it and again in the next call.
            self._bank_checked = False
            constants = self._compute_constants(with_bank, for_evaluation=False)
            self._bank_checked = False
            return constants
        # Constants computed under autocast have its dtype, so each autocast state keeps its own.
        device_type = self.label_encoder.label_embeddings.device.type
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        key = (torch.is_inference_mode_enabled(), autocast, with_bank, self._weights_key())
        if self._constants is None or self._constants[0] != key:
            self._bank_checked = False
            self._constants = (key, self._compute_constants(with_bank, for_evaluation=True))
        elif with_bank:
            self._check_bank_fingerprint()
        return self._constants[1]

    def _constant_slots(self) -> list[tuple[dict, str]]:
        """Return where the tensors that `_compute_constants` reads are kept, as (a module's parameter or buffer
        table, name) pairs: every parameter and buffer outside the backbone."""
        slots = []
        for name, module in self.named_modules():
            if name == "backbone" or name.startswith("backbone."):
                continue
            for table in (module._parameters, module._buffers):
                slots += [(table, key) for key, tensor in table.items() if tensor is not None]
        return slots

    def _compute_constants(self, with_bank: bool, for_evaluation: bool) -> InferenceConstants:
        """Compute the inference constants; ``for_evaluation`` adds the `EvaluationPlan`, which only evaluation
        calls without gradients use."""
        label_tokens = self.label_encoder()  # (C, D)
        label_keys = None
        if self.lgifo is not None:
            label_keys = self.lgifo.attention.project_keys(label_tokens)
        bank = None
        if with_bank:
            self._check_bank_fingerprint()
            bank_tokens = self.embed_features(self.reference_features, use_running_stats=True)  # (M, D)
            keys, values = self.itrr.project_context(bank_tokens)  # 2 x (H, M, Dh), views of one projection
            bank = (keys.contiguous(), values.contiguous())
        plan = EvaluationPlan.build(self, label_tokens, label_keys) if for_evaluation else None
        return InferenceConstants(label_tokens=label_tokens, label_keys=label_keys, bank=bank, plan=plan)

    def _check_bank_fingerprint(self) -> None:
        """Raise when the backbone no longer has the weights the reference bank was built with.

        The check walks every backbone tensor, and recomputes the fingerprint only when one has changed. It
        runs on the first evaluation call after a mode switch (``train()``, ``eval()``), a load, a device
        move or a change of the tensors in `_weights_key`, and on every call with gradients or in training
        mode. Other evaluation calls skip it.
        """
        # The flag is tested before the config field because every evaluation call with a bank passes here.
        if self._bank_checked:
            return
        expected = self.config.reference_bank_fingerprint
        if expected is None:
            return
        key = _tensors_key([*self.backbone.parameters(), *self.backbone.buffers()])
        if key != self._backbone_key:
            if backbone_fingerprint(self.backbone) not in expected.split(","):
                raise ValueError(
                    "The reference bank was built with other backbone weights than the model now has, so its "
                    "features no longer match. Rebuild it with build_reference_bank, or pass "
                    "relation_mode='transductive'."
                )
            self._backbone_key = key
        self._bank_checked = True

    def label_tokens(self) -> torch.Tensor:
        """Return the HLRR label tokens S̃ (C, D), cached in no-grad evaluation like all inference constants."""
        return self.inference_constants(with_bank=False).label_tokens

    def uses_global_relations(self) -> bool:
        """Return whether training relates images across all processes.

        That is the case with ``relation_scope`` "global" or "auto" when more than one process runs.
        """
        if self.config.relation_scope == "local":
            return False
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def resolve_relation_mode(self, relation_mode: RelationMode | None = None) -> RelationMode | None:
        """Return the ITRR mode a forward call uses, or ``None`` when ITRR is disabled.

        Raises:
            ValueError: For an unknown mode, or reference mode on a model without a reference bank.
        """
        if self.itrr is None:
            return None
        if relation_mode is None:
            relation_mode = self.config.train_relation_mode if self.training else self.config.inference_relation_mode
            if relation_mode == "auto":
                relation_mode = "reference" if self.has_reference_bank else "transductive"
        if relation_mode not in ("transductive", "reference", "self"):
            raise ValueError(
                f"relation_mode={relation_mode!r} is not supported; choose 'transductive', 'reference' or 'self'"
            )
        if relation_mode == "reference" and not self.has_reference_bank:
            raise ValueError(
                "relation_mode='reference' needs a reference bank, and this model has none. Build one with "
                "model.build_reference_bank(dataset), or pass relation_mode='transductive' "
                "(rald-hf: --relation-mode transductive)."
            )
        return relation_mode

    def forward(
        self,
        pixel_values: torch.Tensor,
        relation_mode: RelationMode | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> RALDModelOutput | tuple:
        """Encode images and relate them to each other and to the labels.

        Args:
            pixel_values: Images, shape (N, num_channels, H, W).
            relation_mode: What ITRR attends to; see `RALDConfig.inference_relation_mode`. Defaults to the
                config's training or inference mode, by ``self.training``.
            output_hidden_states: Also return the intermediate image features.
            return_dict: Return a `RALDModelOutput` instead of a tuple.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output = RALDModelOutput(**self._encode(pixel_values, relation_mode, output_hidden_states)._asdict())
        return output if return_dict else output.to_tuple()

    def _encode(
        self,
        pixel_values: torch.Tensor,
        relation_mode: RelationMode | None = None,
        output_hidden_states: bool | None = None,
    ) -> _Encoding:
        """Compute `forward`'s fields (same arguments) and return them as a named tuple, not an output object.

        In evaluation without gradients, `RALDForImageClassification` calls this rather than the module when
        ``rald`` has no hooks: at batch 1 after a small backbone, building the inner output object costs as
        much as a linear layer of the head.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must have shape (N, {self.config.num_channels}, H, W), got {tuple(pixel_values.shape)}"
            )
        mode = self.resolve_relation_mode(relation_mode)

        backbone_features = self.extract_backbone_features(pixel_values)  # (N, Dv)
        constants = self.inference_constants(with_bank=mode == "reference")
        label_tokens = constants.label_tokens  # (C, D)
        # Only evaluation calls without gradients get a plan; it runs the head without module calls.
        plan = constants.plan
        if plan is not None and plan.applies():
            (image_tokens, related_tokens, guided_tokens, last_hidden_state), relations = plan.run(
                backbone_features, mode, constants.bank
            )
            hidden_states = (image_tokens, related_tokens, guided_tokens) if output_hidden_states else None
            return _Encoding(last_hidden_state, relations, None, backbone_features, label_tokens, hidden_states)

        image_tokens = self.embed_features(backbone_features)  # (N, D)
        relations = None
        related_tokens = image_tokens
        offset = None
        if self.itrr is not None:
            context = None
            if mode == "transductive" and self.training and self.uses_global_relations():
                context, offset = gather_across_processes(image_tokens)  # (N_global, D)
            related_tokens, relations = self.itrr(
                image_tokens, context=context, mode=mode, bank=constants.bank, need_scores=self.training
            )

        guided_tokens = related_tokens
        if self.lgifo is not None:
            guided_tokens, _ = self.lgifo(related_tokens, label_tokens, label_keys=constants.label_keys)
        last_hidden_state = self.final_norm(guided_tokens)

        hidden_states = (image_tokens, related_tokens, guided_tokens) if output_hidden_states else None
        return _Encoding(last_hidden_state, relations, offset, backbone_features, label_tokens, hidden_states)

    def embed_features(self, features: torch.Tensor, use_running_stats: bool = False) -> torch.Tensor:
        """Normalise backbone features (N, Dv) as ``config.feature_norm`` selects and project them to tokens (N, D).

        ``use_running_stats`` (or a training batch of one image, whose batch statistics are undefined) applies
        the batch norm with its running statistics and leaves them unchanged.
        """
        norm = self.feature_norm
        if norm is not None:
            if norm.training and not use_running_stats and len(features) > 1:
                features = norm(features)
            else:
                features = F.batch_norm(
                    features, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps
                )
        return self.image_proj(features)

    def extract_backbone_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Run the timm backbone and its pooling: images (N, 3, H, W) -> features (N, Dv)."""
        features = self.backbone.forward_features(pixel_values)
        return self.backbone.forward_head(features, pre_logits=True)


class RALDForImageClassification(RALDPreTrainedModel):
    """RALD with the fine-label classifier: ``P = softmax(Linear(F̂))`` over the Cf fine labels."""

    def __init__(self, config: RALDConfig) -> None:
        super().__init__(config)
        self.rald = RALDModel(config)
        self.num_labels = len(config.level_labels[0])
        self.classifier = nn.Linear(self.rald.width, self.num_labels)
        self.post_init()

    def load_backbone_weights(self, checkpoint_path: str | None = None) -> None:
        """Load pretrained backbone weights; see `RALDModel.load_backbone_weights`."""
        self.rald.load_backbone_weights(checkpoint_path)

    def build_reference_bank(self, dataset: Any, **kwargs: Any) -> None:
        """Fill the reference bank from a dataset; see `RALDModel.build_reference_bank`."""
        self.rald.build_reference_bank(dataset, **kwargs)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        relation_mode: RelationMode | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> RALDImageClassifierOutput | tuple:
        """Classify images into the fine labels.

        Args:
            pixel_values: Images, shape (N, num_channels, H, W).
            labels: Fine-label indices, shape (N,). When given, ``loss`` is their cross-entropy.
            relation_mode: What ITRR attends to; see `RALDModel.forward`.
            output_hidden_states: Also return the intermediate image features.
            return_dict: Return a `RALDImageClassifierOutput` instead of a tuple.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (
            not self.training
            and not torch.is_grad_enabled()
            and _is_plain(self.rald, RALDModel)
            and not _global_forward_hooks()
        ):
            outputs = self.rald._encode(pixel_values, relation_mode, output_hidden_states)
        else:  # training, and any hook on the inner model, needs its module call
            outputs = self.rald(
                pixel_values, relation_mode=relation_mode, output_hidden_states=output_hidden_states, return_dict=True
            )
        logits = self.classifier(outputs.last_hidden_state)  # (N, Cf)

        loss = None
        if labels is not None:
            _check_labels(labels, logits.shape[0], self.num_labels)
            loss = F.cross_entropy(logits, labels.to(logits.device))

        output = RALDImageClassifierOutput(
            loss=loss,
            logits=logits,
            image_relations=outputs.image_relations,
            relation_offset=outputs.relation_offset,
            last_hidden_state=outputs.last_hidden_state,
            backbone_features=outputs.backbone_features,
            hidden_states=outputs.hidden_states,
        )
        return output if return_dict else output.to_tuple()


# Config fields that a model for another label set inherits from its checkpoint.
_ARCHITECTURE_FIELDS = (
    "backbone",
    "backbone_kwargs",
    "num_channels",
    "hidden_size",
    "num_attention_heads",
    "mlp_ratio",
    "attention_residual",
    "feature_norm",
    "norm_first",
    "zero_init_last",
    "use_itrr",
    "use_lgifo",
)
_TRANSFERRED_FIELDS = _ARCHITECTURE_FIELDS + (
    "image_size",
    "hidden_dropout_prob",
    "attention_dropout_prob",
    "attention_scale",
    "layer_norm_eps",
    "hierarchy_distance_mode",
    "sigma",
    "num_neighbors",
    "nnldl_weight",
    "nnldl_include_self",
    "nnldl_weighting",
    "nnldl_head_reduction",
    "nnldl_detach_target",
    "nnldl_loss",
    "nnldl_reduction",
    "train_relation_mode",
    "inference_relation_mode",
    "relation_scope",
    "initializer_range",
)
# State-dict entries that belong to one label set: they are not carried over to another.
_LABEL_DEPENDENT = (
    "label_encoder.label_embeddings",
    "label_encoder.distance_buckets",
    "label_encoder.hierarchy_bias",
    "classifier.",
    "reference_features",
    "reference_labels",
)


def _is_label_dependent(key: str) -> bool:
    return any(part in key for part in _LABEL_DEPENDENT)


def _check_same_labels(stored: RALDConfig, requested: RALDConfig, source: str) -> None:
    """Raise when a requested config would reinterpret a checkpoint's labels; names and order must match."""
    if stored.level_labels == requested.level_labels and stored.parent_ids == requested.parent_ids:
        return
    raise ValueError(
        f"The checkpoint {source} predicts the labels {stored.level_labels[0]}"
        + (f" (tree levels {stored.level_names})" if stored.has_tree else "")
        + f", but the config asks for {requested.level_labels[0]}"
        + (f" (tree levels {requested.level_names})" if requested.has_tree else "")
        + ". Labels are compared by name and order. To start a model for the new labels from this checkpoint, "
        "pass label_space=LabelSpace(...) to from_pretrained, or use rald-hf train --init-from CHECKPOINT."
    )


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = [line for line in lines if "size mismatch" in line or "Missing key" in line]
    return (detail or lines or [type(error).__name__])[0]


def _check_labels(labels: torch.Tensor, batch_size: int, num_labels: int) -> None:
    if labels.shape != (batch_size,):
        raise ValueError(f"labels must have shape ({batch_size},), got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"labels must hold integer class indices, got dtype {labels.dtype}")
    if batch_size and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
        raise ValueError(
            f"labels must lie in [0, {num_labels}), got values from {int(labels.min())} to {int(labels.max())}"
        )


def _create_backbone(config: RALDConfig, pretrained: bool = False, **kwargs) -> nn.Module:
    """Create the timm backbone without a classifier, marked so that `_init_weights` leaves it alone."""
    try:
        backbone = timm.create_model(
            config.backbone,
            pretrained=pretrained,
            num_classes=0,
            in_chans=config.num_channels,
            **(config.backbone_kwargs or {}),
            **kwargs,
        )
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise ValueError(
                f"backbone={config.backbone!r} is not a model of timm {timm.__version__}; list the available "
                f"ones with timm.list_models('*{config.backbone.split('_')[0]}*'), or upgrade timm"
            ) from error
        raise
    for module in backbone.modules():
        module._rald_timm_initialized = True
    return backbone
