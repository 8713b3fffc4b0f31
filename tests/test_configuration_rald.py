import json

import pytest

from rald_hf import LabelSpace, RALDConfig

from .utils import tiny_config


def test_from_label_space_fills_labels():
    space = LabelSpace.from_preset("fg-emotions")
    config = RALDConfig.from_label_space(space)
    assert config.num_labels == 33
    assert config.id2label[0] == "anxiety"
    assert config.label2id["wrath"] == space.labels.index("wrath")
    assert config.num_label_nodes == 41
    assert config.label_embedding_size == 50
    assert config.use_hierarchy_bias is True
    assert config.label_space_name == "fg-emotions"
    assert config.hierarchy_distances[0][0] == 0


def test_no_tree_defaults_to_rald_l():
    config = RALDConfig.from_label_space(LabelSpace.from_preset("fer2013"))
    assert config.use_hierarchy_bias is False
    assert config.has_tree is False


def test_json_round_trip_is_exact(tmp_path):
    config = tiny_config(
        nnldl_weighting="raw", norm_first=True, feature_norm="batch_norm", backbone_kwargs={"drop_rate": 0.25}
    )
    config.save_pretrained(tmp_path)
    loaded = RALDConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.to_json_string() == config.to_json_string()
    assert loaded.label_embeddings == config.label_embeddings
    assert loaded.id2label == config.id2label


def test_dict_round_trip_is_exact():
    config = tiny_config()
    assert RALDConfig.from_dict(json.loads(config.to_json_string(use_diff=False))).to_dict() == config.to_dict()


def test_bare_config_has_no_labels():
    config = RALDConfig()
    assert not config.has_labels
    assert config.num_label_nodes == 0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("backbone", "", "backbone must name a timm model"),
        ("backbone", 18, "backbone must be a str"),
        ("backbone_kwargs", ["drop_rate"], "backbone_kwargs must be a dict"),
        ("image_size", 0, "image_size must be a positive integer, got 0"),
        ("num_channels", 2.5, "num_channels must be a positive integer"),
        ("hidden_size", -8, "hidden_size must be a positive integer"),
        ("num_attention_heads", 7, "hidden_size=128 must be divisible by num_attention_heads=7"),
        ("mlp_ratio", 0, "mlp_ratio must be > 0.0"),
        ("hidden_dropout_prob", 1.0, r"hidden_dropout_prob must be in \[0, 1\)"),
        ("attention_dropout_prob", -0.1, "attention_dropout_prob must be >= 0.0"),
        ("attention_scale", 0.0, "attention_scale must be > 0.0"),
        ("layer_norm_eps", "small", "layer_norm_eps must be a number"),
        ("attention_residual", "yes", "attention_residual must be a bool"),
        ("use_itrr", 1, "use_itrr must be a bool"),
        ("num_neighbors", 0, "num_neighbors must be a positive integer"),
        ("nnldl_weight", -1.0, "nnldl_weight must be >= 0.0"),
        ("nnldl_weighting", "exp", r"nnldl_weighting='exp' is not supported; choose one of \['softmax', 'raw'"),
        ("nnldl_head_reduction", "sum", "nnldl_head_reduction='sum' is not supported"),
        ("nnldl_loss", "mse", "nnldl_loss='mse' is not supported"),
        ("nnldl_reduction", "sum", "nnldl_reduction='sum' is not supported"),
        (
            "feature_norm",
            "layer_norm",
            r"feature_norm='layer_norm' is not supported; choose one of \['none', 'batch_norm'\]",
        ),
        ("train_relation_mode", "reference", "train_relation_mode='reference' is not supported"),
        ("inference_relation_mode", "batch", "inference_relation_mode='batch' is not supported"),
        ("relation_scope", "world", "relation_scope='world' is not supported"),
        ("hierarchy_distance_mode", "graph", "hierarchy_distance_mode='graph' is not supported"),
        ("reference_bank_size", -1, "reference_bank_size must be a non-negative integer"),
        ("sigma", 0, "sigma must be a positive integer"),
        ("initializer_range", 0, "initializer_range must be > 0.0"),
    ],
)
def test_invalid_field_raises_value_error(field, value, message):
    with pytest.raises(ValueError, match=message):
        RALDConfig(**{field: value})


def test_zero_init_needs_residual():
    with pytest.raises(ValueError, match="zero_init_last=True needs attention_residual=True"):
        RALDConfig(zero_init_last=True, attention_residual=False)


def test_validate_catches_fields_set_after_construction(tmp_path):
    config = tiny_config()
    config.num_neighbors = 0
    with pytest.raises(ValueError, match="num_neighbors must be a positive integer"):
        config.save_pretrained(tmp_path)


def _label_fields(**changes):
    fields = tiny_config().to_dict()
    keys = ("level_names", "level_labels", "parent_ids", "label_embeddings", "hierarchy_distances")
    values = {key: fields[key] for key in keys}
    values.update(changes)
    return values


def test_incomplete_label_space_raises():
    with pytest.raises(ValueError, match=r"incomplete.*\['hierarchy_distances'\] are not"):
        RALDConfig(**_label_fields(hierarchy_distances=None))


def test_embedding_rows_must_match_nodes():
    fields = _label_fields()
    with pytest.raises(ValueError, match=r"one row per label node \(41\), got 40 rows"):
        RALDConfig(**{**fields, "label_embeddings": fields["label_embeddings"][:40]})


def test_distances_must_be_symmetric():
    fields = _label_fields()
    distances = [row[:] for row in fields["hierarchy_distances"]]
    distances[0][1] = 3
    with pytest.raises(ValueError, match=r"not symmetric at \[0\]\[1\]"):
        RALDConfig(**{**fields, "hierarchy_distances": distances})


def test_parent_ids_out_of_range_raise():
    fields = _label_fields()
    parent_ids = [row[:] for row in fields["parent_ids"]]
    parent_ids[0][0] = 6
    with pytest.raises(ValueError, match=r"parent_ids\[0\] has indices \[6\] outside \[0, 6\)"):
        RALDConfig(**{**fields, "parent_ids": parent_ids})


def test_duplicate_level_labels_raise():
    fields = _label_fields()
    levels = [names[:] for names in fields["level_labels"]]
    levels[0][1] = levels[0][0]
    with pytest.raises(ValueError, match=r"level_labels\[0\] has duplicate names \['anxiety'\]"):
        RALDConfig(**{**fields, "level_labels": levels})


def test_conflicting_id2label_raises():
    with pytest.raises(ValueError, match="id2label .* does not match the fine labels"):
        RALDConfig(**_label_fields(), id2label={0: "a", 1: "b"})


def test_word_aliases_reach_embeddings():
    space = LabelSpace(["schadenfreude", "happy"])
    config = RALDConfig.from_label_space(space, word_aliases={"schadenfreude": "gleeful"})
    assert config.label_embedding_size == 50
    assert "word_aliases" not in config.to_dict()
