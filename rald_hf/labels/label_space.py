"""Label spaces: the fine labels a RALD model predicts and the optional tree above them.

A label space has one or more levels. Level 0 contains the fine labels, in the index order of the classifier.
Each higher level contains the parents of the level below it (FG-Emotions: fine -> coarse -> valence). A name
may appear at two levels ("anger" is a coarse and a fine label of FG-Emotions), so a node is identified by
its level and its name, never by the name alone.

Nodes are numbered level by level: the fine labels first (so node ``i < num_labels`` is fine label ``i``),
then the labels of level 1, and so on. The label embeddings and the hierarchy distance matrix of a
``RALDConfig`` use this order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import networkx as nx
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import shortest_path

if TYPE_CHECKING:
    from datasets import ClassLabel
    from gensim.models import KeyedVectors

__all__ = ["LABEL_SYNONYMS", "LabelNode", "LabelSpace", "UnknownLabelsError", "normalize_label_name"]

DistanceMode = Literal["path", "edge"]

# Usual spellings of the same expression across FER datasets. A dataset label matches a label-space label
# when both normalise to the same name or sit in the same group here (FER2013 uses "happy", RAF-DB
# "happiness").
LABEL_SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("anger", "angry"),
    ("contempt", "contemptuous"),
    ("disgust", "disgusted"),
    ("fear", "fearful", "scared"),
    ("happiness", "happy"),
    ("neutral", "neutrality"),
    ("sadness", "sad"),
    ("surprise", "surprised"),
)

_FG_EMOTIONS_TREE: dict[str, dict[str, tuple[str, ...]]] = {
    "unpleasant": {
        "fear": ("anxiety", "worry", "panic", "terror", "nervousness"),
        "sadness": ("depression", "embarrassment", "gloom", "guilt", "remorse", "sorrow", "suffering"),
        "anger": (
            "anger",
            "contempt",
            "disgust",
            "frustration",
            "hate",
            "irritation",
            "loathing",
            "torment",
            "wrath",
        ),
    },
    "pleasant": {
        "surprise": ("amazement", "astonishment", "surprise"),
        "happiness": ("cheerfulness", "enthrallment", "optimism", "pleasure", "pride", "relief", "thrill"),
        "love": ("affection", "lust"),
    },
}

_FER2013_LABELS = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
_FER2013_VALENCE = {
    "angry": "unpleasant",
    "disgust": "unpleasant",
    "fear": "unpleasant",
    "happy": "pleasant",
    "neutral": "neutral",
    "sad": "unpleasant",
    "surprise": "pleasant",
}
_RAFDB_LABELS = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")


def normalize_label_name(name: str) -> str:
    """Return the form of a label name used for matching: lower case, words joined by single spaces."""
    return " ".join(name.replace("_", " ").replace("-", " ").casefold().split())


def _synonym_key(name: str) -> str:
    normalized = normalize_label_name(name)
    for group in LABEL_SYNONYMS:
        if normalized in group:
            return group[0]
    return normalized


class UnknownLabelsError(ValueError):
    """Raised when class names match no fine label of a label space; ``missing`` lists them."""

    def __init__(self, missing: list[str], message: str) -> None:
        self.missing = missing
        super().__init__(message)


@dataclass(frozen=True)
class LabelNode:
    """One node of a label space: its level (0 = fine) and its name."""

    level: int
    name: str


class LabelSpace:
    """The fine labels a model predicts, in classifier order, and the optional tree of coarser labels above.

    Args:
        labels: Fine label names in the index order of the classifier.
        parents: One mapping per level above the fine one. ``parents[0]`` maps every fine label to its
            coarse label, ``parents[1]`` maps every coarse label to its parent, and so on. The labels of a
            level are the parents named by the level below, in order of first appearance.
        level_names: One name per level, fine level first. Defaults to ``fine``, ``coarse``, ``level_2``...
        name: An optional name for the label space, such as the preset it came from.

    Raises:
        ValueError: On empty or duplicate names within a level, a label without a parent, or a tree entry
            that is not a label of its level.
    """

    def __init__(
        self,
        labels: Sequence[str],
        parents: Sequence[Mapping[str, str]] = (),
        level_names: Sequence[str] | None = None,
        name: str | None = None,
    ) -> None:
        if isinstance(labels, str) or not isinstance(labels, Sequence):
            raise ValueError(f"labels must be a sequence of label names, got {labels!r}")
        if isinstance(parents, Mapping):
            raise ValueError(
                "parents must be a list with one mapping per level above the fine labels, got a single "
                "mapping; wrap it in a list, or use LabelSpace.from_parent_map for a flat child -> parent map"
            )
        num_levels = len(parents) + 1
        if level_names is None:
            level_names = ["fine", "coarse", *(f"level_{i}" for i in range(2, num_levels))][:num_levels]
        level_names = tuple(level_names)
        if len(level_names) != num_levels:
            raise ValueError(
                f"level_names has {len(level_names)} entries {list(level_names)}, but the label space has "
                f"{num_levels} levels (the fine labels and {len(parents)} parent mappings)"
            )
        _check_names(level_names, what="level names")

        levels = [tuple(labels)]
        _check_names(levels[0], what=f"labels of level '{level_names[0]}'")
        parent_indices = []
        for depth, mapping in enumerate(parents):
            children = levels[depth]
            level = level_names[depth]
            if not isinstance(mapping, Mapping):
                raise ValueError(
                    f"parents[{depth}] must be a mapping from '{level}' labels to parents, got {mapping!r}"
                )
            unknown = [child for child in mapping if child not in children]
            if unknown:
                raise ValueError(
                    f"parents[{depth}] has entries {unknown} that are not labels of level '{level}' "
                    f"(labels: {list(children)})"
                )
            orphans = [child for child in children if child not in mapping]
            if orphans:
                raise ValueError(
                    f"labels {orphans} of level '{level}' have no parent in parents[{depth}]; every label of "
                    "a level must have a parent at the level above"
                )
            parent_names = tuple(dict.fromkeys(mapping[child] for child in children))
            _check_names(parent_names, what=f"labels of level '{level_names[depth + 1]}'")
            parent_indices.append(tuple(parent_names.index(mapping[child]) for child in children))
            levels.append(parent_names)

        self._levels: tuple[tuple[str, ...], ...] = tuple(levels)
        self._parent_indices: tuple[tuple[int, ...], ...] = tuple(parent_indices)
        self._level_names = level_names
        self.name = name

    # Construction

    @classmethod
    def available_presets(cls) -> list[str]:
        """Return the names accepted by `from_preset`."""
        return sorted(_PRESETS)

    @classmethod
    def from_preset(cls, name: str) -> LabelSpace:
        """Build a preset label space: ``fg-emotions``, ``fer2013``, ``fer2013-valence`` or ``rafdb``."""
        if name not in _PRESETS:
            raise ValueError(f"Unknown label-space preset {name!r}; available presets: {cls.available_presets()}")
        return _PRESETS[name]()

    @classmethod
    def from_parent_map(
        cls,
        labels: Sequence[str],
        parent_of: Mapping[str, str],
        level_names: Sequence[str] | None = None,
        name: str | None = None,
    ) -> LabelSpace:
        """Build a label space from a flat ``child -> parent`` map over names that are unique across levels.

        The depth of each node follows from the chains of parents, so every fine label must sit at the same
        depth. Names that repeat across levels (a coarse "anger" above a fine "anger") would form a loop
        here: use the per-level ``parents`` argument of the constructor for such trees.

        Raises:
            ValueError: On a cycle (including a label that is its own parent), an entry that is neither a
                fine label nor the parent of one, or fine labels at different depths.
        """
        _check_names(tuple(labels), what="labels")
        graph = nx.DiGraph()
        graph.add_nodes_from(labels)
        graph.add_edges_from(parent_of.items())
        try:
            cycle = nx.find_cycle(graph)
        except nx.NetworkXNoCycle:
            cycle = None
        if cycle:
            loop = " -> ".join([edge[0] for edge in cycle] + [cycle[0][0]])
            if len(cycle) == 1:
                advice = (
                    "A name that stands at two levels (a coarse and a fine 'anger') needs the per-level form: "
                    "LabelSpace(labels, parents=[fine_to_coarse, coarse_to_top])"
                )
            else:
                advice = "Give each label one parent on the level above it, so that the chain ends at a top label"
            raise ValueError(f"The label tree has a cycle: {loop}. {advice}.")
        reachable = set(labels)
        for label in labels:
            reachable |= nx.descendants(graph, label)
        stray = [child for child in parent_of if child not in reachable]
        if stray:
            raise ValueError(
                f"Tree entries {stray} are not labels: they are neither fine labels nor parents of one. "
                f"Fine labels: {list(labels)}"
            )

        depths = {label: len(_chain(graph, label)) for label in labels}
        if len(set(depths.values())) > 1:
            raise ValueError(
                f"Fine labels sit at different depths of the tree ({depths}); give every fine label the same "
                "number of ancestors, repeating a name at the level it skips if needed (per-level form)"
            )
        num_parent_levels = next(iter(depths.values())) if depths else 0
        parents: list[dict[str, str]] = []
        current = list(labels)
        for _ in range(num_parent_levels):
            mapping = {child: parent_of[child] for child in current}
            parents.append(mapping)
            current = list(dict.fromkeys(mapping.values()))
        return cls(labels, parents, level_names=level_names, name=name)

    @classmethod
    def from_class_label(cls, class_label: ClassLabel, tree: LabelSpace | str | None = None) -> LabelSpace:
        """Build a label space whose fine labels are the names of a `datasets.ClassLabel`, in its index order.

        Args:
            class_label: The dataset's label feature, for example ``dataset.features["label"]``.
            tree: A label space or preset name whose tree to place above the dataset's labels. The
                dataset's names are matched to the tree's fine labels by name (see `LABEL_SYNONYMS`). Without
                it the label space has no tree.
        """
        names = list(class_label.names)
        if tree is None:
            return cls(names)
        if isinstance(tree, str):
            tree = cls.from_preset(tree)
        fine_indices = tree.index_of_names(names)
        parents = []
        for depth in range(tree.num_levels - 1):
            child_level = names if depth == 0 else tree.levels[depth]
            child_parents = tree.parent_indices[depth]
            if depth == 0:
                mapping = {
                    child: tree.levels[1][child_parents[i]] for child, i in zip(names, fine_indices, strict=True)
                }
            else:
                mapping = {child: tree.levels[depth + 1][child_parents[i]] for i, child in enumerate(child_level)}
            parents.append(mapping)
        return cls(names, parents, level_names=tree.level_names, name=tree.name)

    @classmethod
    def from_config(cls, config: Any) -> LabelSpace:
        """Rebuild the label space stored in a `RALDConfig` (its ``level_labels`` and ``parent_ids``)."""
        if getattr(config, "level_labels", None) is None:
            raise ValueError("The config has no label space")
        levels = config.level_labels
        parents = [
            {child: levels[depth + 1][i] for child, i in zip(levels[depth], indices, strict=True)}
            for depth, indices in enumerate(config.parent_ids)
        ]
        return cls(levels[0], parents, level_names=config.level_names, name=config.label_space_name)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelSpace:
        """Build a label space from its `to_dict` form or from ``{"labels": [...], "parent_of": {...}}``."""
        if "labels" not in data:
            raise ValueError(f"A label-space description needs a 'labels' list, got keys {sorted(data)}")
        unknown = set(data) - {"labels", "parents", "parent_of", "level_names", "name"}
        if unknown:
            raise ValueError(
                f"Unknown keys {sorted(unknown)} in the label-space description; expected labels, parents or "
                "parent_of, level_names, name"
            )
        if "parents" in data and "parent_of" in data:
            raise ValueError("Give either 'parents' (one mapping per level) or 'parent_of' (a flat map), not both")
        if "parent_of" in data:
            return cls.from_parent_map(
                data["labels"], data["parent_of"], level_names=data.get("level_names"), name=data.get("name")
            )
        return cls(data["labels"], data.get("parents", ()), level_names=data.get("level_names"), name=data.get("name"))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> LabelSpace:
        """Read a label space written by `to_json_file` or by hand in the `from_dict` form."""
        with open(path, encoding="utf-8") as handle:
            try:
                data = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"Label tree file {path} is not valid JSON: {error}") from error
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable description that `from_dict` turns back into an equal label space."""
        parents = []
        for depth, indices in enumerate(self._parent_indices):
            parent_level = self._levels[depth + 1]
            parents.append({child: parent_level[i] for child, i in zip(self._levels[depth], indices, strict=True)})
        return {
            "labels": list(self.labels),
            "parents": parents,
            "level_names": list(self._level_names),
            "name": self.name,
        }

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write the label space as JSON."""
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2)
            handle.write("\n")

    def without_tree(self) -> LabelSpace:
        """Return the same fine labels with no tree above them (the label space of RALD-L)."""
        return LabelSpace(self.labels, level_names=self._level_names[:1], name=self.name)

    # Structure

    @property
    def labels(self) -> tuple[str, ...]:
        """Fine label names in classifier order."""
        return self._levels[0]

    @property
    def num_labels(self) -> int:
        return len(self._levels[0])

    @property
    def levels(self) -> tuple[tuple[str, ...], ...]:
        """Label names of every level, fine level first."""
        return self._levels

    @property
    def level_names(self) -> tuple[str, ...]:
        return self._level_names

    @property
    def num_levels(self) -> int:
        return len(self._levels)

    @property
    def has_tree(self) -> bool:
        return self.num_levels > 1

    @property
    def parent_indices(self) -> tuple[tuple[int, ...], ...]:
        """For each level below the top, the index of each label's parent within the next level."""
        return self._parent_indices

    @property
    def nodes(self) -> tuple[LabelNode, ...]:
        """All label nodes in embedding order: fine labels, then each higher level."""
        return tuple(LabelNode(level, name) for level, names in enumerate(self._levels) for name in names)

    @property
    def num_nodes(self) -> int:
        return sum(len(names) for names in self._levels)

    def node_index(self, level: int | str, name: str) -> int:
        """Return the embedding-order index of the node ``(level, name)``."""
        depth = self._level_index(level)
        if name not in self._levels[depth]:
            raise ValueError(
                f"{name!r} is not a label of level '{self._level_names[depth]}' (labels: {list(self._levels[depth])})"
            )
        offset = sum(len(names) for names in self._levels[:depth])
        return offset + self._levels[depth].index(name)

    def fine_to_level(self, level: int | str) -> np.ndarray:
        """Return, for each fine label, the index of its ancestor at ``level`` (an identity map for level 0)."""
        depth = self._level_index(level)
        mapping = np.arange(self.num_labels)
        for step in range(depth):
            mapping = np.asarray(self._parent_indices[step])[mapping]
        return mapping

    def tree_edges(self) -> list[tuple[int, int]]:
        """Return the ``(child, parent)`` edges of the tree as node indices in embedding order."""
        edges = []
        offset = 0
        for depth, indices in enumerate(self._parent_indices):
            parent_offset = offset + len(self._levels[depth])
            edges.extend((offset + child, parent_offset + parent) for child, parent in enumerate(indices))
            offset = parent_offset
        return edges

    def _level_index(self, level: int | str) -> int:
        if isinstance(level, str):
            if level not in self._level_names:
                raise ValueError(f"Unknown level {level!r}; levels: {list(self._level_names)}")
            return self._level_names.index(level)
        if not 0 <= level < self.num_levels:
            raise ValueError(f"Level {level} out of range; the label space has {self.num_levels} levels")
        return level

    # What the model needs

    def hierarchy_distances(self, mode: DistanceMode = "path", sigma: int = 500) -> np.ndarray:
        """Compute the tree distance between every pair of label nodes, shape ``(num_nodes, num_nodes)``.

        Args:
            mode: ``"path"`` gives every pair connected in the tree its shortest-path length and ``sigma``
                to pairs with no path (across separate trees, or everywhere when there is no tree), as
                Graphormer's spatial encoding does. ``"edge"`` is the literal reading of the RALD equations:
                0 on the diagonal, 1 for pairs joined by an edge and ``sigma`` for every other pair.
            sigma: The distance that marks unrelated pairs. It must exceed every path length in the tree.

        Returns:
            An int64 matrix, symmetric, with zeros on the diagonal.
        """
        if mode not in ("path", "edge"):
            raise ValueError(f"mode must be 'path' or 'edge', got {mode!r}")
        num_nodes = self.num_nodes
        edges = np.asarray(self.tree_edges(), dtype=np.int64).reshape(-1, 2)
        adjacency = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(num_nodes, num_nodes)).tocsr()
        if mode == "path":
            lengths = shortest_path(adjacency, directed=False, unweighted=True)
        else:
            lengths = np.full((num_nodes, num_nodes), np.inf)
            lengths[edges[:, 0], edges[:, 1]] = 1
            lengths[edges[:, 1], edges[:, 0]] = 1
            np.fill_diagonal(lengths, 0)
        finite = lengths[np.isfinite(lengths)]
        if finite.size and finite.max() >= sigma:
            raise ValueError(f"sigma={sigma} must exceed the longest path in the tree ({int(finite.max())})")
        return np.where(np.isfinite(lengths), lengths, sigma).astype(np.int64)

    def label_embeddings(
        self,
        vectors: KeyedVectors | str | os.PathLike | None = None,
        aliases: Mapping[str, str] | None = None,
        normalize: bool = True,
    ) -> np.ndarray:
        """Embed every label node with word vectors, shape ``(num_nodes, vector_size)``.

        Fine labels average the vectors of their words, and each higher node is the mean of its children.
        ``vectors`` is anything `rald_hf.labels.load_word_vectors` accepts (the shipped default vocabulary
        when ``None``). See `rald_hf.labels.embed_label_space` for ``aliases`` and ``normalize``.
        """
        from .vectors import embed_label_space

        return embed_label_space(self, vectors=vectors, aliases=aliases, normalize=normalize)

    def index_of_names(self, names: Sequence[str]) -> list[int]:
        """Map label names (for example a dataset's class names) to fine-label indices by name.

        Names match when they are equal after `normalize_label_name` or are usual spellings of the same
        expression (`LABEL_SYNONYMS`), so a dataset's "happy" finds the label space's "happiness".

        Raises:
            UnknownLabelsError: Listing every name that matches no fine label.
            ValueError: For two names that match the same fine label.
        """
        exact = {normalize_label_name(label): i for i, label in enumerate(self.labels)}
        by_synonym: dict[str, int] = {}
        for i, label in enumerate(self.labels):
            by_synonym.setdefault(_synonym_key(label), i)
        indices, missing = [], []
        for name in names:
            index = exact.get(normalize_label_name(name), by_synonym.get(_synonym_key(name)))
            if index is None:
                missing.append(name)
            indices.append(index)
        if missing:
            raise UnknownLabelsError(
                missing,
                f"Label names {missing} are not in the label space {self.name or ''} (fine labels: "
                f"{list(self.labels)}). Choose a label space that contains them (another preset, a label tree "
                "file, or LabelSpace.from_class_label on the dataset's label feature).",
            )
        seen: dict[int, str] = {}
        for name, index in zip(names, indices, strict=True):
            if index in seen:
                raise ValueError(
                    f"Label names {seen[index]!r} and {name!r} both match the fine label {self.labels[index]!r}"
                )
            seen[index] = name
        return indices

    # Comparison and display

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LabelSpace):
            return NotImplemented
        return (
            self._levels == other._levels
            and self._parent_indices == other._parent_indices
            and self._level_names == other._level_names
        )

    def __hash__(self) -> int:
        return hash((self._levels, self._parent_indices, self._level_names))

    def __repr__(self) -> str:
        sizes = " / ".join(
            f"{len(names)} {level}" for level, names in zip(self._level_names, self._levels, strict=True)
        )
        name = f"{self.name!r}, " if self.name else ""
        return f"LabelSpace({name}{sizes})"


def _check_names(names: Sequence[str], what: str) -> None:
    seen: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"Empty or non-string name {name!r} among the {what}")
        key = normalize_label_name(name)
        if key in seen:
            raise ValueError(f"Duplicate name {name!r} among the {what} (same as {seen[key]!r})")
        seen[key] = name


def _chain(graph: nx.DiGraph, label: str) -> list[str]:
    """Return the ancestors of ``label`` from its parent upwards, in an acyclic child -> parent graph."""
    chain = []
    node = label
    while True:
        successors = list(graph.successors(node))
        if not successors:
            return chain
        node = successors[0]
        chain.append(node)


def _fg_emotions() -> LabelSpace:
    fine_to_coarse = {}
    coarse_to_valence = {}
    for valence, coarse_labels in _FG_EMOTIONS_TREE.items():
        for coarse, fine_labels in coarse_labels.items():
            coarse_to_valence[coarse] = valence
            fine_to_coarse.update(dict.fromkeys(fine_labels, coarse))
    return LabelSpace(
        list(fine_to_coarse),
        [fine_to_coarse, coarse_to_valence],
        level_names=("fine", "coarse", "valence"),
        name="fg-emotions",
    )


_PRESETS = {
    "fg-emotions": _fg_emotions,
    "fer2013": lambda: LabelSpace(_FER2013_LABELS, level_names=("fine",), name="fer2013"),
    "fer2013-valence": lambda: LabelSpace(
        _FER2013_LABELS, [_FER2013_VALENCE], level_names=("fine", "valence"), name="fer2013-valence"
    ),
    "rafdb": lambda: LabelSpace(_RAFDB_LABELS, level_names=("fine",), name="rafdb"),
}
