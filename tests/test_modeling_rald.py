import json

import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from rald_hf import LabelSpace, RALDConfig, RALDForImageClassification, RALDModel

from .utils import BATCH_SIZE, tiny_config, tiny_images


def _model(seed: int = 0, **overrides) -> RALDForImageClassification:
    torch.manual_seed(seed)
    return RALDForImageClassification(tiny_config(**overrides))


@pytest.mark.parametrize(("preset", "num_labels"), [("fg-emotions", 33), ("fer2013", 7)])
def test_output_shapes(preset, num_labels):
    model = _model(space=preset)
    outputs = model(tiny_images(), output_hidden_states=True)
    assert outputs.logits.shape == (BATCH_SIZE, num_labels)
    assert outputs.image_relations.shape == (BATCH_SIZE, 3, BATCH_SIZE)
    assert outputs.last_hidden_state.shape == (BATCH_SIZE, 30)
    assert outputs.backbone_features.shape == (BATCH_SIZE, 256)
    assert [tuple(h.shape) for h in outputs.hidden_states] == [(BATCH_SIZE, 30)] * 3


def test_rald_l_has_no_bias_table():
    rald_l = _model(space="fer2013")
    assert rald_l.config.use_hierarchy_bias is False
    assert rald_l.rald.label_encoder.hierarchy_bias is None
    assert not any("hierarchy_bias" in name for name, _ in rald_l.named_parameters())


def test_backbone_width_used_without_hidden_size():
    model = _model(hidden_size=None, num_attention_heads=4)
    assert model.rald.width == 256
    assert model(tiny_images()).last_hidden_state.shape == (BATCH_SIZE, 256)


def test_gradients_reach_every_module():
    model = _model()
    model.train()
    labels = torch.arange(BATCH_SIZE)
    outputs = model(tiny_images(), labels=labels)
    # The CE loss reaches ITRR's keys only through the attention; add the relations as NNLDL would use them.
    (outputs.loss + outputs.image_relations.sum() * 1e-3).backward()
    groups = {
        "backbone": model.rald.backbone,
        "image_proj": model.rald.image_proj,
        "itrr": model.rald.itrr,
        "hlrr": model.rald.label_encoder,
        "hierarchy_bias": model.rald.label_encoder.hierarchy_bias,
        "lgifo": model.rald.lgifo,
        "classifier": model.classifier,
    }
    for name, module in groups.items():
        grads = [p.grad for p in module.parameters()]
        assert grads and all(g is not None for g in grads), f"{name}: some parameters got no gradient"
        total = sum(float(g.abs().sum()) for g in grads)
        assert total > 0, f"{name}: all gradients are zero"


def test_label_embeddings_are_frozen_buffers():
    model = _model()
    encoder = model.rald.label_encoder
    assert "label_embeddings" in dict(encoder.named_buffers())
    assert not encoder.label_embeddings.requires_grad
    assert "rald.label_encoder.label_embeddings" in model.state_dict()
    assert all("label_embeddings" not in name for name, _ in model.named_parameters())
    torch.testing.assert_close(encoder.label_embeddings, torch.tensor(model.config.label_embeddings))


def test_hierarchy_bias_changes_label_tokens():
    model = _model().eval()
    encoder = model.rald.label_encoder
    with torch.no_grad():
        before = encoder()
        encoder.hierarchy_bias.weight.zero_()
        after = encoder()
    assert (before - after).abs().max() > 1e-4


def test_distances_do_not_matter_without_bias():
    model = _model(space="fer2013").eval()
    encoder = model.rald.label_encoder
    with torch.no_grad():
        before = encoder()
        encoder.distance_buckets.fill_(1)
        after = encoder()
    torch.testing.assert_close(before, after)


def test_bias_follows_distance_at_init():
    bias = _model().rald.label_encoder.hierarchy_bias.weight.squeeze(-1)
    assert bias.tolist() == [-float(i) for i in range(len(bias))]
    # fg-emotions: distances 0 to 4 plus the unrelated bucket.
    assert len(bias) == 6


@pytest.mark.parametrize(
    "overrides", [{}, {"attention_residual": False}, {"norm_first": True}, {"feature_norm": "batch_norm"}]
)
def test_save_load_round_trip(tmp_path, overrides):
    model = _model(**overrides)
    images = tiny_images()
    with torch.no_grad():
        model(images)  # one training-mode pass, so that batch-norm running statistics leave their initial values
    model.eval()
    with torch.no_grad():
        expected = model(images).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = RALDForImageClassification.from_pretrained(tmp_path).eval()
    expected_state = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, expected_state[name], rtol=0, atol=0, msg=f"{name} changed")
    with torch.no_grad():
        actual = loaded(images).logits
    # The weights are compared bit for bit above. The logits get a float32 tolerance: after the training-mode
    # pass they differed by 7e-8 from the original model's.
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_meta_device_load_restores_buffers(tmp_path):
    model = _model()
    with torch.no_grad():
        model.rald.label_encoder.label_embeddings.mul_(3.0)
    model.save_pretrained(tmp_path)
    loaded = RALDForImageClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.rald.label_encoder.label_embeddings, model.rald.label_encoder.label_embeddings)
    torch.testing.assert_close(loaded.rald.label_encoder.distance_buckets, model.rald.label_encoder.distance_buckets)


def test_auto_classes_are_registered(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_rald.RALDConfig",
        "AutoModel": "modeling_rald.RALDModel",
        "AutoModelForImageClassification": "modeling_rald.RALDForImageClassification",
    }
    assert (tmp_path / "configuration_rald.py").exists()
    assert (tmp_path / "modeling_rald.py").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), RALDConfig)
    assert isinstance(AutoModelForImageClassification.from_pretrained(tmp_path), RALDForImageClassification)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, RALDModel)
    torch.testing.assert_close(base.backbone.state_dict()["conv_stem.weight"], model.rald.backbone.conv_stem.weight)


def test_transductive_output_depends_on_batch():
    model = _model().eval()
    images = tiny_images()
    with torch.no_grad():
        full = model(images, relation_mode="transductive").logits
        half = model(images[:4], relation_mode="transductive").logits
    assert (full[:4] - half).abs().max() > 1e-6


def test_self_mode_is_batch_independent():
    model = _model().eval()
    images = tiny_images()
    with torch.no_grad():
        full = model(images, relation_mode="self").logits
        single = torch.cat([model(images[i : i + 1], relation_mode="self").logits for i in range(BATCH_SIZE)])
    torch.testing.assert_close(full, single, rtol=1e-5, atol=1e-5)


def test_reference_mode_without_bank_raises():
    model = _model().eval()
    with pytest.raises(ValueError, match="needs a reference bank.*build_reference_bank"):
        model(tiny_images(), relation_mode="reference")


def test_unknown_relation_mode_raises():
    with pytest.raises(ValueError, match="relation_mode='batch' is not supported"):
        _model()(tiny_images(), relation_mode="batch")


def test_ablations_remove_modules():
    model = _model(use_itrr=False, use_lgifo=False)
    assert model.rald.itrr is None
    assert model.rald.lgifo is None
    outputs = model(tiny_images())
    assert outputs.image_relations is None
    assert outputs.logits.shape == (BATCH_SIZE, 33)


def test_pixel_values_shape_is_checked():
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(N, 3, H, W\), got \(3, 35, 35\)"):
        _model()(torch.zeros(3, 35, 35))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.tensor([0, 1, 2]), r"labels must have shape \(7,\)"),
        (torch.full((7,), 33), r"labels must lie in \[0, 33\), got values from 33 to 33"),
        (torch.zeros(7), "labels must hold integer class indices"),
    ],
)
def test_bad_labels_raise(labels, message):
    with pytest.raises(ValueError, match=message):
        _model()(tiny_images(), labels=labels)


def test_unknown_backbone_raises():
    with pytest.raises(ValueError, match="backbone='resnet_nope' is not a model of timm"):
        _model(backbone="resnet_nope")


def test_config_without_labels_raises():
    with pytest.raises(ValueError, match="no label space; build it with RALDConfig.from_label_space"):
        RALDModel(RALDConfig(backbone="test_efficientnet"))


def test_load_backbone_weights_from_local_file(tmp_path):
    torch.manual_seed(5)
    source = timm.create_model("test_efficientnet", num_classes=11)
    path = tmp_path / "test_efficientnet.safetensors"
    save_file(source.state_dict(), str(path))
    model = _model()
    model.load_backbone_weights(str(path))
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("classifier")}
    actual = model.rald.backbone.state_dict()
    assert set(actual) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, msg=f"backbone weight {key} differs")


def test_cross_entropy_loss_value():
    model = _model()
    labels = torch.tensor([0, 5, 9, 12, 20, 31, 32])
    outputs = model(tiny_images(), labels=labels)
    expected = torch.nn.functional.cross_entropy(outputs.logits, labels)
    torch.testing.assert_close(outputs.loss, expected)


def test_label_tokens_cached_until_weights_change():
    model = _model().eval()
    with torch.no_grad():
        first = model.rald.label_tokens()
        assert model.rald.label_tokens() is first
        model.rald.label_encoder.proj.weight.add_(0.5)
        second = model.rald.label_tokens()
    assert second is not first
    assert (second - first).abs().max() > 1e-4
    # With gradients enabled the branch is always recomputed, so it trains.
    assert model.rald.label_tokens().requires_grad


def test_edits_through_data_need_cache_clear():
    model = _model().eval()
    with torch.no_grad():
        first = model.rald.label_tokens()
        # Writes through .data bypass the version counter, so the cache cannot notice them.
        model.rald.label_encoder.proj.weight.data.add_(0.5)
        assert model.rald.label_tokens() is first
        model.rald.clear_inference_cache()
        second = model.rald.label_tokens()
    assert (second - first).abs().max() > 1e-4


def test_label_space_of_any_size():
    space = LabelSpace.from_parent_map(["joy", "relief", "fear"], {"joy": "good", "relief": "good", "fear": "bad"})
    model = RALDForImageClassification(tiny_config(space))
    assert model(tiny_images()).logits.shape == (BATCH_SIZE, 3)


def test_backbone_weights_of_another_architecture(tmp_path):
    other = timm.create_model("test_resnet", num_classes=0)
    path = tmp_path / "test_resnet.safetensors"
    save_file(other.state_dict(), str(path))
    with pytest.raises(ValueError, match=r"do not fit the test_efficientnet backbone .*Pass weights saved"):
        _model().load_backbone_weights(str(path))


def test_zero_init_blocks_start_as_identity():
    model = _model(zero_init_last=True, norm_first=True).eval()
    for layer in (model.rald.itrr, model.rald.lgifo, model.rald.label_encoder.layer):
        assert layer.attention.proj.weight.abs().max() == 0
        assert layer.mlp.fc2.weight.abs().max() == 0
    with torch.no_grad():
        outputs = model(tiny_images(), output_hidden_states=True)
    projected, related, guided = outputs.hidden_states
    # Pre-norm blocks with zero branches pass their input through unchanged.
    torch.testing.assert_close(related, projected)
    torch.testing.assert_close(guided, projected)


def test_zero_init_survives_save_and_load(tmp_path):
    model = _model(zero_init_last=True)
    with torch.no_grad():
        model.rald.itrr.attention.proj.weight.fill_(0.25)
    model.save_pretrained(tmp_path)
    loaded = RALDForImageClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.rald.itrr.attention.proj.weight, model.rald.itrr.attention.proj.weight)


def test_feature_norm_standardises_batch():
    model = _model(feature_norm="batch_norm", seed=3)
    with torch.no_grad():
        features = model.rald.extract_backbone_features(tiny_images())
        normalised = model.rald.feature_norm(features)
    # At initialisation the affine part is the identity, so each channel has zero mean and variance
    # var / (var + eps), which is 1 up to the epsilon.
    variance = features.var(0, unbiased=False)
    expected_variance = variance / (variance + model.rald.feature_norm.eps)
    torch.testing.assert_close(normalised.mean(0), torch.zeros(features.shape[1]), rtol=0, atol=1e-5)
    torch.testing.assert_close(normalised.var(0, unbiased=False), expected_variance, rtol=0, atol=1e-4)
    assert not torch.allclose(features.mean(0), torch.zeros(features.shape[1]), atol=1e-2)


def test_feature_norm_single_image_uses_running_stats():
    model = _model(feature_norm="batch_norm")
    norm = model.rald.feature_norm
    with torch.no_grad():
        model(tiny_images())
        running_mean = norm.running_mean.clone()
        tracked = norm.num_batches_tracked.item()
        single = model(tiny_images(1)).logits
    assert torch.isfinite(single).all()
    torch.testing.assert_close(norm.running_mean, running_mean, rtol=0, atol=0)
    assert tracked == 1
    assert norm.num_batches_tracked.item() == tracked


def test_feature_norm_is_kept_for_new_labels():
    model = _model(feature_norm="batch_norm")
    with torch.no_grad():
        model.rald.feature_norm.running_mean.add_(0.5)
    new = model.for_label_space(LabelSpace.from_preset("fer2013"))
    assert new.config.feature_norm == "batch_norm"
    torch.testing.assert_close(new.rald.feature_norm.running_mean, model.rald.feature_norm.running_mean)
