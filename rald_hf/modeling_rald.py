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

from dataclasses import dataclass
from typing import Literal

import timm
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn
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


@dataclass
class RALDModelOutput(ModelOutput):
    """Output of `RALDModel`.

    Args:
        last_hidden_state: Image features after ITRR and LGIFO (F̂), shape (N, D).
        image_relations: Raw relation scores λ·QKᵀ of ITRR, shape (N, H, K). K is N in transductive and self
            mode (the batch) and 1 + M in reference mode (the image itself, then the bank). ``None`` when ITRR
            is disabled, or in self mode outside training.
        backbone_features: Pooled backbone features (F), shape (N, Dv).
        label_hidden_states: Label tokens after HLRR (S̃), shape (C, D).
        hidden_states: With ``output_hidden_states``: the projected backbone features, the ITRR output and
            the LGIFO output, each of shape (N, D).
    """

    last_hidden_state: torch.FloatTensor | None = None
    image_relations: torch.FloatTensor | None = None
    backbone_features: torch.FloatTensor | None = None
    label_hidden_states: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class RALDImageClassifierOutput(ModelOutput):
    """Output of `RALDForImageClassification`.

    Args:
        loss: Cross-entropy of the fine labels, when ``labels`` are given. The NNLDL term is added by
            `rald_hf.RALDTrainer`, not here.
        logits: Fine-label scores before softmax, shape (N, Cf).
        image_relations: See `RALDModelOutput`; NNLDL picks neighbours from them.
        last_hidden_state: Image features fed to the classifier (F̂), shape (N, D).
        backbone_features: Pooled backbone features (F), shape (N, Dv).
        hidden_states: See `RALDModelOutput`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    image_relations: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    backbone_features: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    length, width = x.shape
    return x.view(length, num_heads, width // num_heads).transpose(0, 1)  # (L, D) -> (H, L, Dh)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    num_heads, length, head_width = x.shape
    return x.transpose(0, 1).reshape(length, num_heads * head_width)  # (H, L, Dh) -> (L, D)


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
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mode: RelationMode = "transductive",
        need_scores: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from each of the N images in ``x`` to the images that ``mode`` selects.

        Args:
            x: Image tokens, shape (N, D).
            context: The other image tokens, shape (K, D). In reference mode the bank (required); in
                transductive mode the images to attend to when they are more than ``x`` (the global batch
                of multi-process training), ``x`` itself by default.
            mode: ``"transductive"`` attends to the batch (or ``context``), ``"self"`` only to the image
                itself, ``"reference"`` to the image itself and the bank.
            need_scores: Compute the relation scores in self mode, where the attention does not need them.

        Returns:
            The attention output (N, D) and the scores (N, H, K), or ``None`` in self mode without
            ``need_scores``.
        """
        q, k, v = (_split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))  # 3 x (H, N, Dh)

        if mode == "reference":
            bank_k, bank_v = self._project_keys_values(context)  # 2 x (H, M, Dh)
            self_scores = (q * k).sum(-1, keepdim=True) * self.scale  # (H, N, 1)
            scores = torch.cat([self_scores, q @ bank_k.transpose(-2, -1) * self.scale], dim=-1)  # (H, N, 1 + M)
            probs = self.attention_dropout(scores.softmax(dim=-1))
            out = probs[..., :1] * v + probs[..., 1:] @ bank_v
        elif mode == "self":
            # Softmax over a single key is 1, so each image's output is its own value.
            scores = q @ k.transpose(-2, -1) * self.scale if need_scores else None  # (H, N, N)
            out = v
        else:
            if context is not None:
                k, v = self._project_keys_values(context)  # 2 x (H, K, Dh)
            scores = q @ k.transpose(-2, -1) * self.scale  # (H, N, K)
            out = self.attention_dropout(scores.softmax(dim=-1)) @ v

        out = self.proj_dropout(self.proj(_merge_heads(out)))
        return out, None if scores is None else scores.transpose(0, 1)  # (N, H, K)

    def _project_keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project tokens that need no query with the key and value rows of the fused projection."""
        dim = self.proj.in_features
        keys_values = F.linear(tokens, self.qkv.weight[dim:], self.qkv.bias[dim:])  # (K, 2D)
        return tuple(_split_heads(t, self.num_heads) for t in keys_values.chunk(2, dim=-1))


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
        q, k, v = (_split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))  # 3 x (H, C, Dh)
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

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, None]:
        q = _split_heads(self.q(x), self.num_heads)  # (H, N, Dh)
        k = _split_heads(self.k(labels), self.num_heads)  # (H, C, Dh)
        v = _split_heads(labels, self.num_heads)  # (H, C, Dh), no value projection
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attention_dropout if self.training else 0.0, scale=self.scale
        )
        return self.proj_dropout(self.proj(_merge_heads(out))), None


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

    def _init_weights(self, module: nn.Module) -> None:
        if getattr(module, "_rald_timm_initialized", False):
            # timm initialised the backbone when creating it, with the scheme of each architecture.
            return
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
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

        self._label_cache: tuple[tuple, torch.Tensor] | None = None
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
        overlay = {"file": str(checkpoint_path)} if checkpoint_path is not None else None
        pretrained = _create_backbone(self.config, pretrained=True, pretrained_cfg_overlay=overlay)
        self.backbone.load_state_dict(pretrained.state_dict())
        logger.info("Loaded backbone weights for %s from %s", self.config.backbone, checkpoint_path or "timm")

    def set_reference_bank(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Store backbone features (M, Dv) and their fine labels (M,) as the reference bank.

        The bank contains features derived from training images, which a saved checkpoint carries along.
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

    def extract_backbone_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Run the timm backbone and its pooling: images (N, 3, H, W) -> features (N, Dv)."""
        features = self.backbone.forward_features(pixel_values)
        return self.backbone.forward_head(features, pre_logits=True)

    def label_tokens(self) -> torch.Tensor:
        """Return the HLRR label tokens (C, D), cached between no-grad calls while the weights are unchanged.

        The labels do not depend on the images, so inference computes them once. The cache key contains the
        storage address and in-place version counter of every label-branch tensor; an optimizer step,
        ``load_state_dict`` or a device move changes it.
        """
        if torch.is_grad_enabled():
            return self.label_encoder()
        tensors = [*self.label_encoder.parameters(), *self.label_encoder.buffers()]
        key = (
            self.training,
            torch.is_inference_mode_enabled(),
            tuple((t.data_ptr(), t._version, t.dtype) for t in tensors),
        )
        if self._label_cache is None or self._label_cache[0] != key:
            self._label_cache = (key, self.label_encoder())
        return self._label_cache[1]

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
                "rald_hf.build_reference_bank(model, dataset) or model.rald.set_reference_bank(features, "
                "labels), or pass relation_mode='transductive'."
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
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must have shape (N, {self.config.num_channels}, H, W), got {tuple(pixel_values.shape)}"
            )
        mode = self.resolve_relation_mode(relation_mode)

        backbone_features = self.extract_backbone_features(pixel_values)  # (N, Dv)
        image_tokens = self.image_proj(backbone_features)  # (N, D)

        relations = None
        related_tokens = image_tokens
        if self.itrr is not None:
            bank = self.image_proj(self.reference_features) if mode == "reference" else None  # (M, D)
            related_tokens, relations = self.itrr(image_tokens, bank, mode=mode, need_scores=self.training)

        label_tokens = self.label_tokens()  # (C, D)
        guided_tokens = related_tokens
        if self.lgifo is not None:
            guided_tokens, _ = self.lgifo(related_tokens, label_tokens)
        last_hidden_state = self.final_norm(guided_tokens)

        hidden_states = (image_tokens, related_tokens, guided_tokens) if output_hidden_states else None
        output = RALDModelOutput(
            last_hidden_state=last_hidden_state,
            image_relations=relations,
            backbone_features=backbone_features,
            label_hidden_states=label_tokens,
            hidden_states=hidden_states,
        )
        return output if return_dict else output.to_tuple()


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
        outputs = self.rald(
            pixel_values,
            relation_mode=relation_mode,
            output_hidden_states=output_hidden_states,
            return_dict=True,
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
            last_hidden_state=outputs.last_hidden_state,
            backbone_features=outputs.backbone_features,
            hidden_states=outputs.hidden_states,
        )
        return output if return_dict else output.to_tuple()


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
