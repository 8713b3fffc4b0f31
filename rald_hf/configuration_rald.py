"""RALD model configuration.

RALD (relationship-awareness and label disambiguation) is the fine-grained facial expression recognition
method published in Acta Electronica Sinica (2024, no. 10). This file is copied into every saved
checkpoint for ``trust_remote_code`` loading, so it imports only transformers and the standard library.
"""

from typing import Any, Literal

from transformers import PreTrainedConfig

__all__ = ["RALDConfig"]

RelationMode = Literal["transductive", "reference", "self"]

_CHOICES: dict[str, tuple[Any, ...]] = {
    "feature_norm": ("none", "batch_norm"),
    "hierarchy_distance_mode": ("path", "edge"),
    "nnldl_weighting": ("softmax", "raw", "uniform"),
    "nnldl_relation": ("attention", "features"),
    "nnldl_head_reduction": ("mean", "max"),
    "nnldl_loss": ("kl", "cross_entropy"),
    "nnldl_reduction": ("batch_mean", "paper"),
    "train_relation_mode": ("transductive", "self"),
    "inference_relation_mode": ("auto", "reference", "transductive", "self"),
    "relation_scope": ("auto", "local", "global"),
}


class RALDConfig(PreTrainedConfig):
    r"""Configuration of a RALD model: backbone, label space, attention blocks and NNLDL options.

    The label space travels inside the config: the label names of every level, the tree, the frozen label
    embeddings and the tree distances. Build one from a `rald_hf.LabelSpace` with `from_label_space`, which
    computes the embeddings and distances. Symbols: C label nodes (all levels), Cf fine labels, Ds label
    embedding width.

    Args:
        backbone (`str`, defaults to `"resnet18"`):
            timm model name of the image encoder. It is created with ``pretrained=False`` and
            ``num_classes=0``; weights come from the checkpoint, or from
            `RALDModel.load_backbone_weights` for a fresh model.
        backbone_kwargs (`dict`, *optional*):
            Extra keyword arguments for `timm.create_model`, such as ``drop_path_rate``.
        image_size (`int`, defaults to 112):
            Side of the square input images in pixels, used by the image processor and the CLI.
        num_channels (`int`, defaults to 3):
            Channels of the input images.
        hidden_size (`int`, *optional*, defaults to 128):
            Width D of the attention blocks. Backbone features (Dv) and label embeddings (Ds) are each brought
            to it by a linear layer. ``None`` uses the backbone's width and projects only the label embeddings.
            The paper does not state the width. 128 with ``mlp_ratio=2`` matched 256 with ``mlp_ratio=4`` on
            FER2013 validation accuracy with a fifth of the head's weights, and runs faster at batch 1 (see
            docs/benchmarks.md).
        num_attention_heads (`int`, defaults to 4):
            Heads of every attention block; must divide the width.
        mlp_ratio (`float`, defaults to 2.0):
            Hidden width of each feed-forward network as a multiple of the width.
        hidden_dropout_prob (`float`, defaults to 0.1):
            Dropout after attention projections and in the feed-forward networks.
        attention_dropout_prob (`float`, defaults to 0.0):
            Dropout on attention probabilities.
        attention_scale (`float`, *optional*, defaults to 0.125):
            The scale λ applied to query-key products (the published value). ``None`` uses 1/sqrt(head width).
        layer_norm_eps (`float`, defaults to 1e-5):
            Epsilon of the layer norms.
        attention_residual (`bool`, defaults to `True`):
            Add the block input to the attention output. The published equations have no such path
            (``False``); without it an image's ITRR output starts close to the batch mean.
        zero_init_last (`bool`, defaults to `True`):
            Start the last linear layer of every attention and feed-forward branch at zero, so that each block
            starts as the identity (or the layer norm of its input) and the classifier first sees the backbone
            features unchanged. Needs ``attention_residual``. docs/benchmarks.md gives the measurements behind
            this default and the residual one.
        feature_norm (`str`, defaults to `"none"`):
            Normalisation of the backbone features before the projection to the block width. ``"batch_norm"``
            standardises each channel (BatchNorm1d: batch statistics in training, running statistics in eval
            mode, so inference stays batch-independent). With a ResNet18 trained from scratch it removed the
            outlier channels of the image tokens, but RALD still trailed the plain backbone by 13 points there
            (docs/benchmarks.md).
        norm_first (`bool`, defaults to `False`):
            Pre-norm blocks (normalise before attention and the feed-forward network) instead of the published
            post-norm ``Norm(x + FFN(x))``.
        use_itrr (`bool`, defaults to `True`):
            Use ITRR, the self-attention across the images of a batch. ``False`` is an ablation.
        use_lgifo (`bool`, defaults to `True`):
            Use LGIFO, the cross-attention from images to label tokens. ``False`` is an ablation.
        use_hierarchy_bias (`bool`, defaults to `True`):
            Add the learnable tree-distance bias to HLRR attention. ``False`` gives RALD-L.
        level_names (`list[str]`, *optional*):
            Name of each level of the label space, fine level first.
        level_labels (`list[list[str]]`, *optional*):
            Label names of each level, fine labels first in classifier order.
        parent_ids (`list[list[int]]`, *optional*):
            For each level below the top, the index of each label's parent within the next level.
        label_embeddings (`list[list[float]]`, *optional*):
            Frozen embedding of every label node, shape (C, Ds), nodes ordered level by level.
        hierarchy_distances (`list[list[int]]`, *optional*):
            Tree distance between every pair of label nodes, shape (C, C), with ``sigma`` for unrelated pairs.
        hierarchy_distance_mode (`str`, defaults to `"path"`):
            How the distances were computed: ``"path"`` (shortest-path length for connected pairs) or
            ``"edge"`` (1 only for pairs joined by an edge). Recorded for reference.
        sigma (`int`, defaults to 500):
            The distance that marks unrelated label pairs; it maps to the last bucket of the bias table.
        label_space_name (`str`, *optional*):
            Name of the label space, such as a preset name.
        num_neighbors (`int`, defaults to 5):
            k, the number of related images whose predictions form an image's NNLDL target.
        nnldl_weight (`float`, defaults to 1.0):
            Weight of the NNLDL term added to the cross-entropy by `RALDTrainer`.
        nnldl_include_self (`bool`, defaults to `False`):
            Let an image count among its own neighbours.
        nnldl_relation (`str`, defaults to `"attention"`):
            Where neighbours and their weights come from: ``"attention"``, the ITRR scores Rv as published, or
            ``"features"``, the cosine similarity of the images' backbone features (without gradients).
        nnldl_weighting (`str`, defaults to `"softmax"`):
            Neighbour weights r: ``"softmax"`` (attention probabilities softmax(Rv), renormalised over the
            k neighbours), ``"raw"`` (the scores Rv, clipped at zero) or ``"uniform"``.
        nnldl_head_reduction (`str`, defaults to `"mean"`):
            How per-head relation scores become one relation per image pair: ``"mean"`` or ``"max"``.
        nnldl_detach_target (`bool`, defaults to `True`):
            Stop gradients through the target distribution D.
        nnldl_loss (`str`, defaults to `"kl"`):
            ``"kl"`` for KL(D || P) or ``"cross_entropy"`` for H(D, P), the form written in the paper.
        nnldl_reduction (`str`, defaults to `"paper"`):
            ``"paper"`` divides the sum over images and classes by N * Cf, as the published formula does;
            ``"batch_mean"`` sums over classes and averages over images, which weighs NNLDL Cf times more.
        train_relation_mode (`str`, defaults to `"transductive"`):
            What ITRR attends to in training: ``"transductive"`` (the other images of the batch) or
            ``"self"`` (only the image itself, no cross-image attention).
        inference_relation_mode (`str`, defaults to `"auto"`):
            What ITRR attends to in evaluation: ``"reference"`` (the image and a stored bank of training
            features, independent of the batch), ``"transductive"``, ``"self"``, or ``"auto"`` (reference
            when the checkpoint has a bank, transductive otherwise).
        reference_bank_size (`int`, defaults to 0):
            Number of training-image features stored in the reference bank; 0 means no bank.
        reference_bank_fingerprint (`str`, *optional*):
            Fingerprints of the backbone weights the bank was built with, comma-separated: as they were, and
            as casts to bfloat16 and float16 round them. Reference mode checks the current weights against them.
        relation_scope (`str`, defaults to `"auto"`):
            In multi-process training, ``"global"`` gathers features from every process so that ITRR and NNLDL
            see the whole global batch, ``"local"`` keeps them per process. ``"auto"`` is global when more
            than one process runs.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the truncated normal initialisation of RALD's own linear layers.

    Example:

    ```python
    >>> from rald_hf import LabelSpace, RALDConfig, RALDForImageClassification
    >>> config = RALDConfig.from_label_space(LabelSpace.from_preset("fg-emotions"))
    >>> model = RALDForImageClassification(config)
    ```
    """

    model_type = "rald"
    # Outputs that Trainer.predict and evaluate leave out: only the logits are gathered.
    keys_to_ignore_at_inference = ["image_relations", "last_hidden_state", "backbone_features", "hidden_states"]

    backbone: str = "resnet18"
    backbone_kwargs: dict | None = None
    image_size: int = 112
    num_channels: int = 3

    hidden_size: int | None = 128
    num_attention_heads: int = 4
    mlp_ratio: float = 2.0
    hidden_dropout_prob: float = 0.1
    attention_dropout_prob: float = 0.0
    attention_scale: float | None = 0.125
    layer_norm_eps: float = 1e-5
    attention_residual: bool = True
    zero_init_last: bool = True
    feature_norm: str = "none"
    norm_first: bool = False
    use_itrr: bool = True
    use_lgifo: bool = True
    use_hierarchy_bias: bool = True

    level_names: list | None = None
    level_labels: list | None = None
    parent_ids: list | None = None
    label_embeddings: list | None = None
    hierarchy_distances: list | None = None
    hierarchy_distance_mode: str = "path"
    sigma: int = 500
    label_space_name: str | None = None

    num_neighbors: int = 5
    nnldl_weight: float = 1.0
    nnldl_include_self: bool = False
    nnldl_relation: str = "attention"
    nnldl_weighting: str = "softmax"
    nnldl_head_reduction: str = "mean"
    nnldl_detach_target: bool = True
    nnldl_loss: str = "kl"
    nnldl_reduction: str = "paper"

    train_relation_mode: str = "transductive"
    inference_relation_mode: str = "auto"
    reference_bank_size: int = 0
    reference_bank_fingerprint: str | None = None
    relation_scope: str = "auto"

    initializer_range: float = 0.02

    def __post_init__(self, **kwargs: Any) -> None:
        if self.level_labels is not None:
            fine_labels = list(self.level_labels[0]) if self.level_labels else []
            id2label = {i: name for i, name in enumerate(fine_labels)}
            given = self.id2label
            if given is not None and {int(i): name for i, name in given.items()} != id2label:
                raise ValueError(
                    f"id2label {given} does not match the fine labels {fine_labels}; leave id2label unset, it "
                    "follows level_labels[0]"
                )
            self.id2label = id2label
            self.label2id = {name: i for i, name in id2label.items()}
            kwargs.pop("num_labels", None)
        super().__post_init__(**kwargs)
        self._validate_rald_fields()

    @classmethod
    def from_label_space(cls, space: Any, vectors: Any = None, **kwargs: Any) -> "RALDConfig":
        """Build a config whose labels, embeddings and tree distances come from a label space.

        Args:
            space: A `rald_hf.LabelSpace`. Only its methods are called, so this file needs no import of the
                label-space module.
            vectors: Word vectors for the label embeddings: anything `rald_hf.labels.load_word_vectors`
                accepts; ``None`` uses the vocabulary shipped with rald_hf.
            **kwargs: Other config fields. ``use_hierarchy_bias`` defaults to whether the space has a tree,
                and ``word_aliases`` (a dict) is passed on to the embedding lookup.

        Returns:
            The validated config.
        """
        mode = kwargs.get("hierarchy_distance_mode", "path")
        sigma = kwargs.get("sigma", 500)
        aliases = kwargs.pop("word_aliases", None)
        embeddings = space.label_embeddings(vectors, aliases=aliases)
        distances = space.hierarchy_distances(mode=mode, sigma=sigma)
        kwargs.setdefault("use_hierarchy_bias", space.has_tree)
        kwargs.setdefault("label_space_name", space.name)
        return cls(
            level_names=list(space.level_names),
            level_labels=[list(names) for names in space.levels],
            parent_ids=[list(indices) for indices in space.parent_indices],
            label_embeddings=embeddings.tolist(),
            hierarchy_distances=distances.tolist(),
            **kwargs,
        )

    # Derived sizes

    @property
    def has_labels(self) -> bool:
        """Whether the config carries a label space (a bare ``RALDConfig()`` does not)."""
        return self.level_labels is not None

    @property
    def num_label_nodes(self) -> int:
        """C, the number of label nodes over all levels."""
        return sum(len(names) for names in self.level_labels or [])

    @property
    def label_embedding_size(self) -> int:
        """Ds, the width of the label embeddings."""
        return len(self.label_embeddings[0]) if self.label_embeddings else 0

    @property
    def has_tree(self) -> bool:
        return bool(self.level_labels) and len(self.level_labels) > 1

    def validate(self) -> None:
        """Check every field; called when the config is built and again before it is saved."""
        super().validate()
        self._validate_rald_fields()

    def _validate_rald_fields(self) -> None:
        _check_type("backbone", self.backbone, str)
        if not self.backbone:
            raise ValueError("backbone must name a timm model, got an empty string")
        if self.backbone_kwargs is not None and not isinstance(self.backbone_kwargs, dict):
            raise ValueError(f"backbone_kwargs must be a dict or None, got {self.backbone_kwargs!r}")
        for name in ("image_size", "num_channels", "num_attention_heads", "num_neighbors"):
            _check_positive_int(name, getattr(self, name))
        _check_non_negative_int("reference_bank_size", self.reference_bank_size)
        if self.hidden_size is not None:
            _check_positive_int("hidden_size", self.hidden_size)
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} must be divisible by num_attention_heads="
                    f"{self.num_attention_heads}; choose a head count that divides it"
                )
        for name in ("mlp_ratio", "layer_norm_eps", "initializer_range"):
            _check_number(name, getattr(self, name), minimum=0.0, inclusive=False)
        for name in ("hidden_dropout_prob", "attention_dropout_prob"):
            value = getattr(self, name)
            _check_number(name, value, minimum=0.0, inclusive=True)
            if value >= 1:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.attention_scale is not None:
            _check_number("attention_scale", self.attention_scale, minimum=0.0, inclusive=False)
        _check_number("nnldl_weight", self.nnldl_weight, minimum=0.0, inclusive=True)
        for name in (
            "attention_residual",
            "zero_init_last",
            "norm_first",
            "use_itrr",
            "use_lgifo",
            "use_hierarchy_bias",
            "nnldl_include_self",
            "nnldl_detach_target",
        ):
            _check_type(name, getattr(self, name), bool)
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}")
        _check_positive_int("sigma", self.sigma)
        if self.zero_init_last and not self.attention_residual:
            raise ValueError(
                "zero_init_last=True needs attention_residual=True: without the residual path a zero attention "
                "branch would discard the image features"
            )
        self._validate_label_space()

    def _validate_label_space(self) -> None:
        label_fields = ("level_names", "level_labels", "parent_ids", "label_embeddings", "hierarchy_distances")
        given = [name for name in label_fields if getattr(self, name) is not None]
        if not given:
            return
        if len(given) != len(label_fields):
            missing = [name for name in label_fields if name not in given]
            raise ValueError(
                f"The label space is incomplete: {given} are set but {missing} are not. Build the config "
                "with RALDConfig.from_label_space(space)"
            )

        levels = self.level_labels
        if not isinstance(levels, list) or not levels or not all(isinstance(names, list) for names in levels):
            raise ValueError(f"level_labels must be a non-empty list of label-name lists, got {levels!r}")
        for depth, names in enumerate(levels):
            if not names:
                raise ValueError(f"level_labels[{depth}] is empty; every level needs at least one label")
            for name in names:
                if not isinstance(name, str) or not name.strip():
                    raise ValueError(f"level_labels[{depth}] contains an empty or non-string name {name!r}")
            duplicates = sorted({name for name in names if names.count(name) > 1})
            if duplicates:
                raise ValueError(f"level_labels[{depth}] has duplicate names {duplicates}")
        if len(levels[0]) < 2:
            raise ValueError(f"A classifier needs at least 2 fine labels, got {levels[0]}")
        if len(self.level_names) != len(levels):
            raise ValueError(
                f"level_names {self.level_names} has {len(self.level_names)} entries for {len(levels)} levels"
            )
        if len(self.parent_ids) != len(levels) - 1:
            raise ValueError(
                f"parent_ids must have one list per level below the top ({len(levels) - 1}), got {len(self.parent_ids)}"
            )
        for depth, indices in enumerate(self.parent_ids):
            num_parents = len(levels[depth + 1])
            if len(indices) != len(levels[depth]):
                raise ValueError(
                    f"parent_ids[{depth}] has {len(indices)} entries for the {len(levels[depth])} labels of "
                    f"level '{self.level_names[depth]}'"
                )
            bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < num_parents]
            if bad:
                raise ValueError(f"parent_ids[{depth}] has indices {bad} outside [0, {num_parents})")
            orphaned = sorted(set(range(num_parents)) - set(indices))
            if orphaned:
                names = [levels[depth + 1][i] for i in orphaned]
                raise ValueError(f"Labels {names} of level '{self.level_names[depth + 1]}' have no children")

        num_nodes = self.num_label_nodes
        embeddings = self.label_embeddings
        if len(embeddings) != num_nodes or any(not isinstance(row, list) for row in embeddings):
            raise ValueError(
                f"label_embeddings must have one row per label node ({num_nodes}), got {len(embeddings)} rows"
            )
        width = len(embeddings[0])
        if width == 0 or any(len(row) != width for row in embeddings):
            raise ValueError("label_embeddings rows must all have the same, non-zero width")
        distances = self.hierarchy_distances
        if len(distances) != num_nodes or any(len(row) != num_nodes for row in distances):
            raise ValueError(f"hierarchy_distances must be a {num_nodes} x {num_nodes} matrix")
        for i, row in enumerate(distances):
            for j, value in enumerate(row):
                if not isinstance(value, int) or value < 0 or (value > self.sigma):
                    raise ValueError(
                        f"hierarchy_distances[{i}][{j}]={value!r} must be an integer in [0, sigma={self.sigma}]"
                    )
                if value != distances[j][i]:
                    raise ValueError(f"hierarchy_distances is not symmetric at [{i}][{j}]")
            if row[i] != 0:
                raise ValueError(f"hierarchy_distances[{i}][{i}] must be 0, got {row[i]}")


def _check_type(name: str, value: Any, expected: type) -> None:
    if not isinstance(value, expected):
        raise ValueError(f"{name} must be a {expected.__name__}, got {value!r}")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _check_number(name: str, value: Any, minimum: float, inclusive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < minimum or (value == minimum and not inclusive):
        bound = f">= {minimum}" if inclusive else f"> {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value}")
