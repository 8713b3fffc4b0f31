import numpy as np
import pytest
import torch

from rald_hf import RALDForImageClassification
from rald_hf.training import NNLDLOptions, RALDTrainer, RALDTrainingArguments, nnldl_loss
from rald_hf.training.run import random_backbone_sgd_warning

from ..utils import ImageList, tiny_config, tiny_images

NUM_IMAGES = 7


def _dataset(size: int = NUM_IMAGES) -> ImageList:
    labels = torch.tensor([i % 7 for i in range(size)])
    return ImageList(tiny_images(size, seed=11), labels)


def _model(**overrides) -> RALDForImageClassification:
    torch.manual_seed(0)
    # ConvNeXt has no BatchNorm, so a micro-batch computes what the large batch computes for its images.
    defaults = dict(backbone="test_convnext", hidden_dropout_prob=0.0, space="fer2013")
    return RALDForImageClassification(tiny_config(**{**defaults, **overrides}))


def _args(tmp_path, **overrides) -> RALDTrainingArguments:
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=NUM_IMAGES,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=3,
        use_cpu=True,
    )
    values.update(overrides)
    return RALDTrainingArguments(**values)


def _train_one_step(tmp_path, model, **overrides) -> tuple[dict[str, torch.Tensor], list[dict]]:
    trainer = RALDTrainer(model=model, args=_args(tmp_path, **overrides), train_dataset=_dataset())
    trainer.train()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return params, trainer.state.log_history


def test_accumulation_matches_large_batch(tmp_path):
    """Without cross-image attention and NNLDL, micro-batches of 4 and 3 give the update of one batch of 7."""
    overrides = dict(train_relation_mode="self", nnldl_weight=0.0)
    large, large_logs = _train_one_step(tmp_path / "large", _model(**overrides))
    accumulated, accumulated_logs = _train_one_step(
        tmp_path / "accumulated", _model(**overrides), per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    start = _model(**overrides)
    moved = [name for name, p in start.named_parameters() if (large[name] - p).abs().max() > 1e-6]
    assert moved, "the step changed no parameter, so the comparison would prove nothing"
    for name, value in large.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-5, atol=1e-6, msg=f"{name} differs")
    assert accumulated_logs[0]["loss"] == pytest.approx(large_logs[0]["loss"], rel=1e-4)


def test_accumulation_changes_update_with_batch_attention(tmp_path):
    """With ITRR and NNLDL each image relates only to its micro-batch, so the update differs."""
    large, _ = _train_one_step(tmp_path / "large", _model())
    accumulated, _ = _train_one_step(
        tmp_path / "accumulated", _model(), per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    differences = [float((accumulated[name] - value).abs().max()) for name, value in large.items()]
    assert max(differences) > 1e-5


def test_compute_loss_adds_weighted_nnldl(tmp_path):
    model = _model(nnldl_weight=0.5)
    trainer = RALDTrainer(model=model, args=_args(tmp_path), train_dataset=_dataset())
    model.train()
    torch.manual_seed(0)
    images = tiny_images(NUM_IMAGES, seed=5)
    labels = torch.arange(NUM_IMAGES) % 7
    loss, outputs = trainer.compute_loss(
        model, {"pixel_values": images, "labels": labels}, return_outputs=True, num_items_in_batch=NUM_IMAGES
    )
    ce = torch.nn.functional.cross_entropy(outputs.logits, labels)
    nnldl = nnldl_loss(outputs.logits, outputs.image_relations, NNLDLOptions.from_config(model.config)) / NUM_IMAGES
    torch.testing.assert_close(loss, ce + 0.5 * nnldl)
    assert nnldl.item() > 0


def test_evaluation_loss_is_cross_entropy(tmp_path):
    model = _model(nnldl_weight=2.0)
    trainer = RALDTrainer(model=model, args=_args(tmp_path), train_dataset=_dataset())
    model.eval()
    images = tiny_images(NUM_IMAGES, seed=5)
    labels = torch.arange(NUM_IMAGES) % 7
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(model, {"pixel_values": images, "labels": labels}, return_outputs=True)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(outputs.logits, labels))


def test_bf16_channels_last_step_close_to_float32(tmp_path):
    """A bfloat16 step on channels-last convolutions moves the weights as a float32 step does, within bf16 error."""
    exact, exact_logs = _train_one_step(tmp_path / "float32", _model())
    model = _model()
    fast, fast_logs = _train_one_step(tmp_path / "bf16", model, bf16=True, channels_last=True)
    convolutions = [p for p in model.rald.backbone.parameters() if p.ndim == 4]
    assert convolutions and all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    start = dict(_model().named_parameters())
    exact_moves = torch.cat([(exact[name] - p).flatten() for name, p in start.items()])
    fast_moves = torch.cat([(fast[name] - p).flatten() for name, p in start.items()])
    assert exact_moves.norm() > 1e-3
    assert (fast_moves - exact_moves).norm() < 0.1 * exact_moves.norm()
    assert fast_logs[0]["loss"] == pytest.approx(exact_logs[0]["loss"], rel=0.02)

    # Channels-last weights save to safetensors and reload unchanged.
    model.save_pretrained(tmp_path / "saved")
    reloaded = RALDForImageClassification.from_pretrained(tmp_path / "saved").state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(reloaded[name], value, rtol=0, atol=0, msg=f"{name} differs")


def test_logs_report_both_terms(tmp_path):
    _, logs = _train_one_step(tmp_path, _model(), max_steps=2)
    training_logs = [entry for entry in logs if "loss" in entry]
    assert len(training_logs) == 2
    for entry in training_logs:
        assert entry["ce_loss"] > 0
        assert entry["nnldl_loss"] >= 0
        assert entry["loss"] == pytest.approx(entry["ce_loss"] + entry["nnldl_loss"], rel=1e-3, abs=1e-3)


def test_nnldl_warmup_ramps_weight(tmp_path):
    trainer = RALDTrainer(
        model=_model(nnldl_weight=0.8), args=_args(tmp_path, nnldl_warmup_steps=4), train_dataset=_dataset()
    )
    weights = []
    for step in (0, 1, 2, 4, 10):
        trainer.state.global_step = step
        weights.append(trainer.nnldl_weight())
    assert weights == pytest.approx([0.0, 0.2, 0.4, 0.8, 0.8])


def test_balanced_class_weights(tmp_path):
    train_labels = np.array([0, 0, 0, 1, 2, 2])
    trainer = RALDTrainer(
        model=_model(),
        args=_args(tmp_path, class_weighting="balanced"),
        train_dataset=_dataset(),
        train_labels=train_labels,
    )
    # sklearn's "balanced": N / (classes present * count), and 1 for classes absent from the training set.
    expected = [6 / (3 * 3), 6 / (3 * 1), 6 / (3 * 2), 1.0, 1.0, 1.0, 1.0]
    torch.testing.assert_close(trainer.class_weights, torch.tensor(expected))


def test_balanced_options_need_labels(tmp_path):
    with pytest.raises(ValueError, match="need the training labels"):
        RALDTrainer(model=_model(), args=_args(tmp_path, balanced_sampler=True), train_dataset=_dataset())


def test_balanced_sampler_evens_classes(tmp_path):
    train_labels = np.array([0] * 90 + [1] * 10)
    trainer = RALDTrainer(
        model=_model(),
        args=_args(tmp_path, balanced_sampler=True),
        train_dataset=_dataset(100),
        train_labels=train_labels,
    )
    drawn = train_labels[list(trainer._get_train_sampler())]
    share = np.mean(drawn == 1)
    assert 0.35 < share < 0.65, f"class 1 drawn {share:.2f} of the time"


@pytest.mark.parametrize(("field", "value"), [("nnldl_warmup_steps", -1), ("class_weighting", "inverse")])
def test_invalid_training_arguments(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        _args(tmp_path, **{field: value})


def test_feature_relations_pick_neighbours_without_itrr(tmp_path):
    model = _model(use_itrr=False, nnldl_relation="features", nnldl_weight=1.0)
    trainer = RALDTrainer(model=model, args=_args(tmp_path), train_dataset=_dataset())
    model.train()
    images = tiny_images(NUM_IMAGES, seed=5)
    labels = torch.arange(NUM_IMAGES) % 7
    loss, outputs = trainer.compute_loss(
        model, {"pixel_values": images, "labels": labels}, return_outputs=True, num_items_in_batch=NUM_IMAGES
    )
    assert outputs.image_relations is None
    features = torch.nn.functional.normalize(outputs.backbone_features.detach(), dim=-1)
    relations = (features @ features.T).unsqueeze(1)
    nnldl = nnldl_loss(outputs.logits, relations, NNLDLOptions.from_config(model.config)) / NUM_IMAGES
    ce = torch.nn.functional.cross_entropy(outputs.logits, labels)
    torch.testing.assert_close(loss, ce + nnldl)
    assert nnldl.item() > 0


@pytest.mark.parametrize(
    ("overrides", "optimizer", "warns"),
    [
        ({}, "sgd", True),
        ({"use_itrr": False}, "sgd", True),
        ({"use_itrr": False, "use_lgifo": False}, "sgd", False),
        ({"use_itrr": False, "use_lgifo": False, "norm_first": True}, "sgd", True),
        ({}, "adamw_torch", False),
    ],
)
def test_random_backbone_sgd_warning(overrides, optimizer, warns):
    config = tiny_config(**overrides)
    warning = random_backbone_sgd_warning(config, optimizer)
    assert (warning is not None) == warns
    if warns:
        assert "adamw_torch" in warning
