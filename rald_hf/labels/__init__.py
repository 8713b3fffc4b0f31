"""What a RALD model predicts: label spaces, their trees and their word-vector embeddings."""

from .label_space import LABEL_SYNONYMS, LabelNode, LabelSpace, UnknownLabelsError, normalize_label_name
from .vectors import (
    DEFAULT_VECTORS_PATH,
    WORD_ALIASES,
    MissingWordsError,
    embed_label_space,
    load_word_vectors,
    split_words,
)

__all__ = [
    "DEFAULT_VECTORS_PATH",
    "LABEL_SYNONYMS",
    "WORD_ALIASES",
    "LabelNode",
    "LabelSpace",
    "MissingWordsError",
    "UnknownLabelsError",
    "embed_label_space",
    "load_word_vectors",
    "normalize_label_name",
    "split_words",
]
