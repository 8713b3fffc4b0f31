import numpy as np
import pytest
from gensim.models import KeyedVectors

from rald_hf import LabelSpace, MissingWordsError
from rald_hf.labels import DEFAULT_VECTORS_PATH, LABEL_SYNONYMS, embed_label_space, load_word_vectors, split_words


def _unit(vector):
    vector = np.asarray(vector, dtype=np.float64)
    return vector / np.linalg.norm(vector)


@pytest.mark.parametrize("preset", LabelSpace.available_presets())
def test_default_vocabulary_covers_preset(preset):
    space = LabelSpace.from_preset(preset)
    embeddings = space.label_embeddings()
    assert embeddings.shape == (space.num_nodes, 50)
    assert np.isfinite(embeddings).all()


def test_default_vocabulary_covers_synonyms():
    vectors = load_word_vectors()
    words = [word for group in LABEL_SYNONYMS for name in group for word in split_words(name)]
    missing = [word for word in words if word not in vectors.key_to_index]
    assert missing == []


def test_coarse_node_is_mean_of_children():
    space = LabelSpace.from_preset("fg-emotions")
    embeddings = space.label_embeddings()
    coarse_love = space.node_index("coarse", "love")
    children = [space.node_index("fine", "affection"), space.node_index("fine", "lust")]
    np.testing.assert_allclose(embeddings[coarse_love], embeddings[children].mean(axis=0), rtol=1e-6)
    # The fine "anger" has its own word vector; the coarse "anger" is the mean of its nine children.
    fine_anger, coarse_anger = space.node_index(0, "anger"), space.node_index(1, "anger")
    assert not np.allclose(embeddings[fine_anger], embeddings[coarse_anger])


def test_valence_node_is_mean_of_coarse_nodes():
    space = LabelSpace.from_preset("fg-emotions")
    embeddings = space.label_embeddings()
    pleasant = space.node_index("valence", "pleasant")
    coarse = [space.node_index("coarse", name) for name in ("surprise", "happiness", "love")]
    np.testing.assert_allclose(embeddings[pleasant], embeddings[coarse].mean(axis=0), rtol=1e-6)


def test_fine_label_is_unit_word_vector():
    vectors = load_word_vectors()
    space = LabelSpace.from_preset("fer2013")
    embeddings = space.label_embeddings()
    np.testing.assert_allclose(embeddings[0], _unit(vectors["angry"]), rtol=1e-6)


def test_alias_replaces_missing_word():
    vectors = load_word_vectors()
    assert "enthrallment" not in vectors.key_to_index
    space = LabelSpace.from_preset("fg-emotions")
    embeddings = space.label_embeddings()
    index = space.node_index("fine", "enthrallment")
    np.testing.assert_allclose(embeddings[index], _unit(vectors["enthralled"]), rtol=1e-6)


def test_multi_word_label_averages_words():
    vectors = load_word_vectors()
    space = LabelSpace(["happily_surprised", "sad"])
    embeddings = space.label_embeddings()
    expected = (_unit(vectors["happily"]) + _unit(vectors["surprised"])) / 2
    np.testing.assert_allclose(embeddings[0], expected, rtol=1e-6)


def test_missing_words_are_all_listed():
    space = LabelSpace(["schadenfreude", "happy", "hygge sadness"])
    with pytest.raises(MissingWordsError, match=r"\['hygge', 'schadenfreude'\].*aliases=") as error:
        space.label_embeddings()
    assert error.value.missing == ["hygge", "schadenfreude"]
    assert isinstance(error.value, ValueError)


def test_user_alias_fixes_missing_word():
    space = LabelSpace(["schadenfreude", "happy"])
    embeddings = embed_label_space(space, aliases={"schadenfreude": "gleeful"})
    vectors = load_word_vectors()
    np.testing.assert_allclose(embeddings[0], _unit(vectors["gleeful"]), rtol=1e-6)


def test_glove_text_file_without_header(tmp_path):
    path = tmp_path / "tiny.glove.txt"
    path.write_text("joy 1 0 0\nfear 0 2 0\n")
    vectors = load_word_vectors(path)
    assert vectors.vector_size == 3
    embeddings = LabelSpace(["joy", "fear"]).label_embeddings(path, normalize=False)
    np.testing.assert_allclose(embeddings, [[1, 0, 0], [0, 2, 0]])


def test_word2vec_binary_and_gensim_files(tmp_path):
    vectors = KeyedVectors(vector_size=4)
    vectors.add_vectors(["joy", "fear"], np.array([[1, 2, 3, 4], [4, 3, 2, 1]], dtype=np.float32))
    binary = tmp_path / "tiny.bin"
    vectors.save_word2vec_format(str(binary), binary=True)
    native = tmp_path / "tiny.kv"
    vectors.save(str(native))
    for path in (binary, native):
        loaded = load_word_vectors(path)
        np.testing.assert_allclose(loaded["fear"], [4, 3, 2, 1])


def test_missing_vector_file_raises():
    with pytest.raises(FileNotFoundError, match="nowhere/vectors.txt not found"):
        load_word_vectors("nowhere/vectors.txt")


def test_default_file_is_word2vec_text():
    header = DEFAULT_VECTORS_PATH.read_text().splitlines()[0].split()
    assert len(header) == 2
    assert int(header[1]) == 50
