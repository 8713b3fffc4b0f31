"""Word vectors for label names, through gensim ``KeyedVectors``.

RALD embeds every label node with a frozen word vector. The package ships a small vocabulary filtered from
GloVe 6B 50-d (``default_vectors.txt``, see ``default_vectors_NOTICE.txt`` and ``tools/make_default_vectors.py``)
so that the presets and the usual FER label names need no download. Any word2vec, GloVe or fastText file,
or a gensim-data model name for users who are online, can replace it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gensim.models import KeyedVectors

    from .label_space import LabelSpace

__all__ = [
    "DEFAULT_VECTORS_PATH",
    "WORD_ALIASES",
    "MissingWordsError",
    "embed_label_space",
    "load_word_vectors",
    "split_words",
]

logger = logging.getLogger(__name__)

DEFAULT_VECTORS_PATH = Path(__file__).with_name("default_vectors.txt")

# Substitutes for words that the default vocabulary (GloVe 6B) lacks. Each key is looked up as the value
# when the key itself is missing from the vectors.
WORD_ALIASES: dict[str, str] = {
    "enthrallment": "enthralled",
}


class MissingWordsError(ValueError):
    """Raised when label words are missing from the word vectors; ``missing`` lists them."""

    def __init__(self, missing: list[str], source: str) -> None:
        self.missing = missing
        super().__init__(
            f"Words {missing} are missing from the word vectors ({source}). Pass vectors that contain them "
            "(vectors=PATH to a word2vec, GloVe or fastText file, or a gensim-data model name, which needs "
            "network access; rald-hf train: --word-vectors PATH), or map each to a synonym that the vectors "
            "have with aliases={'word': 'synonym'} (rald-hf train: --word-alias word=synonym)."
        )


def split_words(label: str) -> list[str]:
    """Split a label name into lower-case words: "Happily surprised" -> ["happily", "surprised"]."""
    return [word for word in re.split(r"[\s_\-/]+", label.casefold()) if word]


def load_word_vectors(source: KeyedVectors | str | os.PathLike | None = None) -> KeyedVectors:
    """Load word vectors into gensim ``KeyedVectors``.

    Args:
        source: ``None`` for the shipped default vocabulary; a ``KeyedVectors`` object, returned as is; a
            file path: ``.kv``/``.model`` (gensim's own format), ``.bin`` (word2vec binary, or fastText
            when the name says fasttext or ``cc.``), any other text file (word2vec text with a count
            header, or GloVe text without one); or a gensim-data name such as
            ``"word2vec-google-news-300"``, which gensim downloads.

    Raises:
        FileNotFoundError: A path-like source that does not exist and is not a gensim-data name.
    """
    from gensim.models import KeyedVectors

    if isinstance(source, KeyedVectors):
        return source
    if source is None:
        source = DEFAULT_VECTORS_PATH
    path = Path(source)
    if not path.exists():
        name = str(source)
        if os.sep in name or name.endswith((".txt", ".vec", ".bin", ".kv", ".model", ".gz")):
            raise FileNotFoundError(f"Word vector file {name} not found")
        return _load_gensim_data(name)

    suffixes = "".join(path.suffixes).lower()
    logger.info("Loading word vectors from %s", path)
    if suffixes.endswith((".kv", ".model")):
        return KeyedVectors.load(str(path))
    if suffixes.endswith(".bin") or suffixes.endswith(".bin.gz"):
        if "fasttext" in path.name.lower() or path.name.startswith("cc."):
            from gensim.models.fasttext import load_facebook_vectors

            return load_facebook_vectors(str(path))
        return KeyedVectors.load_word2vec_format(str(path), binary=True)
    return KeyedVectors.load_word2vec_format(str(path), binary=False, no_header=not _has_count_header(path))


def _has_count_header(path: Path) -> bool:
    """Tell word2vec text (first line "count dim") from GloVe text (first line is a vector)."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        first = handle.readline().split()
    return len(first) == 2 and all(part.isdigit() for part in first)


def _load_gensim_data(name: str) -> KeyedVectors:
    import gensim.downloader

    try:
        return gensim.downloader.load(name)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load word vectors {name!r} through gensim-data: {error}. Pass a local vector file "
            "instead, or None for the shipped default vocabulary."
        ) from error


def embed_label_space(
    space: LabelSpace,
    vectors: KeyedVectors | str | os.PathLike | None = None,
    aliases: Mapping[str, str] | None = None,
    normalize: bool = True,
) -> np.ndarray:
    """Embed every node of a label space, shape ``(space.num_nodes, vector_size)``, in embedding order.

    A fine label is the mean of its words' vectors. A node of a higher level is the mean of its children's
    embeddings, because coarse names repeat fine names (a coarse "anger" above a fine "anger") and would
    otherwise share a vector with one child.

    Args:
        space: The label space to embed.
        vectors: Anything `load_word_vectors` accepts.
        aliases: Word substitutes used when a word is missing from the vectors, added to `WORD_ALIASES`.
        normalize: Scale each word vector to unit length before averaging, so that frequent words with long
            GloVe vectors do not dominate a multi-word label.

    Raises:
        MissingWordsError: Listing every word that is missing from the vectors, after aliases.
    """
    keyed_vectors = load_word_vectors(vectors)
    alias_table = {**WORD_ALIASES, **(aliases or {})}

    missing: list[str] = []
    fine_vectors = []
    for label in space.labels:
        words = split_words(label)
        found = []
        for word in words:
            key = word if word in keyed_vectors.key_to_index else alias_table.get(word)
            if key is None or key not in keyed_vectors.key_to_index:
                missing.append(word)
                continue
            vector = np.asarray(keyed_vectors[key], dtype=np.float64)
            if normalize:
                vector = vector / max(np.linalg.norm(vector), 1e-12)
            found.append(vector)
        fine_vectors.append(np.mean(found, axis=0) if found else None)
    if missing:
        source = "the default vocabulary" if vectors is None else str(vectors)
        raise MissingWordsError(sorted(set(missing)), source)

    levels = [np.stack(fine_vectors)]
    for depth, parent_indices in enumerate(space.parent_indices):
        children = levels[depth]
        parent_indices = np.asarray(parent_indices)
        num_parents = len(space.levels[depth + 1])
        levels.append(np.stack([children[parent_indices == parent].mean(axis=0) for parent in range(num_parents)]))
    return np.concatenate(levels).astype(np.float32)
