import json

import numpy as np
import pytest
from datasets import ClassLabel

from rald_hf import LabelSpace
from rald_hf.labels import LabelNode


def test_fg_emotions_preset_sizes():
    space = LabelSpace.from_preset("fg-emotions")
    assert space.level_names == ("fine", "coarse", "valence")
    assert [len(names) for names in space.levels] == [33, 6, 2]
    assert space.num_nodes == 41
    assert space.levels[1] == ("fear", "sadness", "anger", "surprise", "happiness", "love")
    assert space.levels[2] == ("unpleasant", "pleasant")


def test_name_at_two_levels_is_two_nodes():
    space = LabelSpace.from_preset("fg-emotions")
    fine_anger = space.node_index("fine", "anger")
    coarse_anger = space.node_index("coarse", "anger")
    assert fine_anger != coarse_anger
    assert space.nodes[fine_anger] == LabelNode(0, "anger")
    assert space.nodes[coarse_anger] == LabelNode(1, "anger")
    # The fine "anger" sits under the coarse "anger".
    assert space.fine_to_level("coarse")[fine_anger] == space.levels[1].index("anger")


def test_fer2013_presets():
    plain = LabelSpace.from_preset("fer2013")
    assert plain.labels == ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
    assert not plain.has_tree

    valence = LabelSpace.from_preset("fer2013-valence")
    assert valence.labels == plain.labels
    assert valence.level_names == ("fine", "valence")
    valence_of = dict(zip(valence.labels, (valence.levels[1][i] for i in valence.fine_to_level(1)), strict=True))
    assert valence_of == {
        "angry": "unpleasant",
        "disgust": "unpleasant",
        "fear": "unpleasant",
        "happy": "pleasant",
        "neutral": "neutral",
        "sad": "unpleasant",
        "surprise": "pleasant",
    }


def test_rafdb_preset_order():
    space = LabelSpace.from_preset("rafdb")
    assert space.labels == ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="Unknown label-space preset 'affectnet-9'.*fer2013"):
        LabelSpace.from_preset("affectnet-9")


@pytest.mark.parametrize(
    ("labels", "parents", "message"),
    [
        (["joy", "joy"], (), "Duplicate name 'joy'"),
        (["joy", "Joy"], (), "Duplicate name 'Joy'"),
        (["joy", ""], (), "Empty or non-string name ''"),
        (["joy", "  "], (), "Empty or non-string name"),
        (["joy", "fear"], [{"joy": "good"}], r"labels \['fear'\] of level 'fine' have no parent"),
        (["joy", "fear"], [{"joy": "good", "fear": "bad", "rage": "bad"}], r"entries \['rage'\] that are not labels"),
        (["joy", "fear"], [{"joy": "good", "fear": ""}], "Empty or non-string name ''"),
    ],
)
def test_invalid_tree_raises(labels, parents, message):
    with pytest.raises(ValueError, match=message):
        LabelSpace(labels, parents)


def test_single_mapping_for_parents_raises():
    with pytest.raises(ValueError, match="wrap it in a list"):
        LabelSpace(["joy", "fear"], {"joy": "good", "fear": "bad"})


def test_parent_map_builds_levels():
    space = LabelSpace.from_parent_map(
        ["joy", "relief", "fear", "rage"],
        {
            "joy": "happy",
            "relief": "happy",
            "fear": "afraid",
            "rage": "angry",
            "happy": "good",
            "afraid": "bad",
            "angry": "bad",
        },
    )
    assert space.levels == (("joy", "relief", "fear", "rage"), ("happy", "afraid", "angry"), ("good", "bad"))


def test_parent_map_cycle_raises():
    with pytest.raises(ValueError, match="cycle: .*(happy -> good -> happy|good -> happy -> good).*one parent"):
        LabelSpace.from_parent_map(["joy"], {"joy": "happy", "happy": "good", "good": "happy"})


def test_parent_map_self_parent_is_cycle():
    with pytest.raises(ValueError, match="cycle: anger -> anger.*per-level form"):
        LabelSpace.from_parent_map(["anger", "joy"], {"anger": "anger", "joy": "happy"})


def test_parent_map_stray_entry_raises():
    with pytest.raises(ValueError, match=r"\['rage'\] are not labels"):
        LabelSpace.from_parent_map(["joy", "fear"], {"joy": "good", "fear": "bad", "rage": "bad"})


def test_parent_map_uneven_depths_raise():
    with pytest.raises(ValueError, match="different depths"):
        LabelSpace.from_parent_map(["joy", "fear"], {"joy": "happy", "happy": "good", "fear": "bad"})


def test_from_class_label_keeps_dataset_order():
    feature = ClassLabel(names=["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"])
    space = LabelSpace.from_class_label(feature)
    assert space.labels == tuple(feature.names)
    assert not space.has_tree


def test_from_class_label_with_tree_matches_synonyms():
    feature = ClassLabel(names=["neutral", "happy", "sad", "angry", "surprised", "fearful", "disgusted"])
    space = LabelSpace.from_class_label(feature, tree="fer2013-valence")
    assert space.labels == tuple(feature.names)
    valence = [space.levels[1][i] for i in space.fine_to_level(1)]
    assert valence == ["neutral", "pleasant", "unpleasant", "unpleasant", "pleasant", "unpleasant", "unpleasant"]


def test_index_of_names_uses_synonyms():
    space = LabelSpace.from_preset("rafdb")
    fer_names = ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
    assert space.index_of_names(fer_names) == [5, 2, 1, 3, 6, 4, 0]


def test_index_of_names_lists_every_unknown_name():
    space = LabelSpace.from_preset("fer2013")
    with pytest.raises(ValueError, match=r"\['contempt', 'boredom'\] are not in the label space"):
        space.index_of_names(["happy", "contempt", "boredom"])


def test_path_distances_fg_emotions():
    space = LabelSpace.from_preset("fg-emotions")
    distances = space.hierarchy_distances(mode="path", sigma=500)
    anxiety, worry, anger = (space.node_index(0, name) for name in ("anxiety", "worry", "anger"))
    coarse_fear = space.node_index(1, "fear")
    coarse_anger = space.node_index(1, "anger")
    unpleasant, pleasant = space.node_index(2, "unpleasant"), space.node_index(2, "pleasant")
    thrill = space.node_index(0, "thrill")
    assert distances.shape == (41, 41)
    assert (distances == distances.T).all()
    assert (np.diag(distances) == 0).all()
    assert distances[anxiety, coarse_fear] == 1
    assert distances[anxiety, worry] == 2
    assert distances[anxiety, unpleasant] == 2
    assert distances[anxiety, coarse_anger] == 3
    assert distances[anxiety, anger] == 4
    # Valence nodes are roots of separate trees, so nothing connects the two halves.
    assert distances[anxiety, thrill] == 500
    assert distances[unpleasant, pleasant] == 500


def test_edge_distances_keep_only_edges():
    space = LabelSpace.from_preset("fg-emotions")
    distances = space.hierarchy_distances(mode="edge", sigma=500)
    anxiety, worry = space.node_index(0, "anxiety"), space.node_index(0, "worry")
    coarse_fear = space.node_index(1, "fear")
    assert distances[anxiety, coarse_fear] == 1
    assert distances[anxiety, worry] == 500
    assert (np.diag(distances) == 0).all()
    assert set(np.unique(distances)) == {0, 1, 500}


def test_distances_without_tree_are_all_unrelated():
    distances = LabelSpace.from_preset("fer2013").hierarchy_distances()
    assert (distances == 500 * (1 - np.eye(7, dtype=np.int64))).all()


def test_sigma_must_exceed_paths():
    with pytest.raises(ValueError, match="sigma=3 must exceed the longest path"):
        LabelSpace.from_preset("fg-emotions").hierarchy_distances(sigma=3)


def test_json_round_trip(tmp_path):
    space = LabelSpace.from_preset("fg-emotions")
    path = tmp_path / "tree.json"
    space.to_json_file(path)
    loaded = LabelSpace.from_json_file(path)
    assert loaded == space
    assert loaded.name == "fg-emotions"


def test_json_file_with_parent_of(tmp_path):
    path = tmp_path / "tree.json"
    path.write_text(json.dumps({"labels": ["joy", "fear"], "parent_of": {"joy": "good", "fear": "bad"}}))
    space = LabelSpace.from_json_file(path)
    assert space.levels == (("joy", "fear"), ("good", "bad"))


def test_invalid_json_file_names_the_file(tmp_path):
    path = tmp_path / "tree.json"
    path.write_text("{labels: ")
    with pytest.raises(ValueError, match="tree.json is not valid JSON"):
        LabelSpace.from_json_file(path)


def test_without_tree_keeps_labels():
    space = LabelSpace.from_preset("fg-emotions")
    flat = space.without_tree()
    assert flat.labels == space.labels
    assert not flat.has_tree
