"""Batch-independent inference: the reference bank, its guards, and the pipeline on real images."""

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize
from transformers import TrainerCallback, pipeline

from rald_hf import LabelSpace, RALDConfig, RALDForImageClassification, RALDImageProcessor
from rald_hf.modeling_rald import EvaluationPlan, _exact_gelu, select_reference_indices
from rald_hf.training import ReferenceBankCallback, predict_images

from .training.test_trainer import _args
from .utils import ImageList, tiny_config, tiny_images


def _model_with_bank(bank_size: int = 13, **overrides) -> RALDForImageClassification:
    torch.manual_seed(0)
    # test_efficientnet has BatchNorm, whose training-mode statistics would depend on the batch.
    model = RALDForImageClassification(tiny_config(space="fer2013", **overrides))
    labels = torch.arange(40) % 7
    model.build_reference_bank(ImageList(tiny_images(40, seed=7), labels), size=bank_size, labels=labels.tolist())
    return model.eval()


@pytest.mark.parametrize("feature_norm", ["none", "batch_norm"])
def test_reference_logits_do_not_depend_on_batch(feature_norm):
    model = _model_with_bank(feature_norm=feature_norm)
    images = tiny_images(64, seed=3)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batch = model(images).logits
        alone = torch.cat([model(images[i : i + 1]).logits for i in range(64)])
        shuffled = model(images[order]).logits
    torch.testing.assert_close(alone, batch, rtol=0, atol=1e-5)
    torch.testing.assert_close(shuffled, batch[order], rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["reference", "transductive", "self"])
@pytest.mark.parametrize(
    "overrides",
    [{}, {"norm_first": True}, {"attention_residual": False}, {"feature_norm": "batch_norm", "use_lgifo": False}],
)
def test_evaluation_plan_matches_module_path(mode, overrides, monkeypatch):
    # Dropout must be skipped, not applied, so the model gets some.
    model = _model_with_bank(hidden_dropout_prob=0.3, attention_dropout_prob=0.3, **overrides)
    plan_calls = []
    run = EvaluationPlan.run
    monkeypatch.setattr(EvaluationPlan, "run", lambda plan, *a, **k: plan_calls.append(plan) or run(plan, *a, **k))
    images = tiny_images(9)
    with torch.no_grad():
        planned = model(images, relation_mode=mode, output_hidden_states=True)
        alone = model(images[4:5], relation_mode=mode).logits
    assert len(plan_calls) == 2
    full = model(images, relation_mode=mode, output_hidden_states=True)  # with gradients: the modules' forward
    assert len(plan_calls) == 2
    # Float rounding differs between the two forms of the linear layers, by about 1e-7 of the values.
    torch.testing.assert_close(planned.logits, full.logits.detach(), rtol=1e-6, atol=1e-6)
    for planned_state, full_state in zip(planned.hidden_states, full.hidden_states, strict=True):
        torch.testing.assert_close(planned_state, full_state.detach(), rtol=1e-6, atol=1e-6)
    if mode != "transductive":
        torch.testing.assert_close(alone, full.logits[4:5].detach(), rtol=0, atol=1e-5)


def test_exact_gelu_matches_module():
    x = torch.linspace(-12, 12, 4001)
    torch.testing.assert_close(_exact_gelu(x), torch.nn.GELU()(x), rtol=0, atol=2e-6)
    # In float64 the two agree to rounding. The tanh approximation differs by up to 4.7e-4 and would fail.
    torch.testing.assert_close(_exact_gelu(x.double()), torch.nn.GELU()(x.double()), rtol=0, atol=1e-12)


class _GELUSubclass(torch.nn.GELU):
    pass


class _Unchanged(torch.nn.Module):
    """A parametrization that returns the weight as it is; registering it changes the layer's class."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


@pytest.mark.parametrize(
    "change",
    [
        lambda model: model.rald.itrr.mlp.act.register_forward_hook(lambda *args: None),
        lambda model: setattr(model.rald.itrr.mlp, "act", torch.nn.GELU(approximate="tanh")),
        lambda model: setattr(model.rald.lgifo.mlp, "act", _GELUSubclass()),
        lambda model: model.rald.itrr.attention.proj_dropout.register_forward_pre_hook(lambda *args: None),
        lambda model: torch.nn.modules.module.register_module_forward_hook(lambda *args: None),
        lambda model: parametrize.register_parametrization(model.rald.lgifo.mlp.fc2, "weight", _Unchanged()) and None,
    ],
    ids=["hook", "tanh", "subclass", "hook-on-dropout", "global-hook", "parametrized"],
)
def test_modules_run_when_not_plain(change, monkeypatch):
    """Any change the plan cannot follow sends evaluation calls back to the modules, from the next call on."""
    model = _model_with_bank()
    images = tiny_images(5)
    with torch.no_grad():
        model(images)  # computes the constants, which calls the label encoder's modules
    module_calls = []
    forward = torch.nn.GELU.forward
    monkeypatch.setattr(torch.nn.GELU, "forward", lambda module, x: module_calls.append(module) or forward(module, x))
    with torch.no_grad():
        planned = model(images).logits
        assert module_calls == []
        handle = change(model)
        try:
            changed = model(images).logits
        finally:
            if handle is not None:
                handle.remove()
    # Both blocks' activations ran as modules (a change that renews the constants also runs the label encoder's).
    assert {model.rald.itrr.mlp.act, model.rald.lgifo.mlp.act} <= set(module_calls)
    expected = model(images).logits.detach()  # with gradients: the modules' forward pass
    torch.testing.assert_close(changed, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(planned, expected, rtol=1e-6, atol=1e-6)


def test_inner_model_hooks_still_run():
    model = _model_with_bank()
    images = tiny_images(4)
    seen = []
    with torch.no_grad():
        plain = model(images)  # without hooks the inner model's module call is skipped
        handle = model.rald.register_forward_hook(lambda module, args, output: seen.append(output))
        hooked = model(images)
        handle.remove()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0].last_hidden_state, hooked.last_hidden_state, rtol=0, atol=0)
    for field in ("logits", "image_relations", "last_hidden_state", "backbone_features"):
        torch.testing.assert_close(getattr(hooked, field), getattr(plain, field), rtol=0, atol=0)


def test_inner_model_call_in_training(monkeypatch):
    model = _model_with_bank().train()
    calls = []
    call = torch.nn.Module.__call__
    monkeypatch.setattr(
        torch.nn.Module, "__call__", lambda module, *a, **k: calls.append(module) or call(module, *a, **k)
    )
    model(tiny_images(4))
    assert model.rald in calls
    calls.clear()
    with torch.no_grad():
        model.eval()(tiny_images(4), relation_mode="transductive")  # training moved the batch-norm statistics
    assert model.rald not in calls  # in evaluation without gradients the module call is skipped


@pytest.mark.parametrize("with_gradients", [False, True])
def test_tuple_outputs_match_output_objects(with_gradients):
    model = _model_with_bank()
    images = tiny_images(4)
    with torch.set_grad_enabled(with_gradients):
        for module in (model, model.rald):
            objects = module(images, output_hidden_states=True).to_tuple()
            plain = module(images, output_hidden_states=True, return_dict=False)
            assert len(plain) == len(objects)
            for got, expected in zip(plain, objects, strict=True):
                torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_folded_lgifo_yields_to_hooks():
    model = _model_with_bank()
    attention = model.rald.lgifo.attention
    images = tiny_images(7)
    with torch.no_grad():
        folded_logits = model(images).logits
        assert model.rald.inference_constants(with_bank=True).plan is not None
    torch.testing.assert_close(folded_logits, model(images).logits.detach(), rtol=0, atol=1e-6)

    # A hook on a folded layer must run, so the evaluation path calls that layer as a module again.
    calls = []
    handle = attention.proj.register_forward_hook(lambda module, args, output: calls.append(1) or 2 * output)
    with torch.no_grad():
        hooked = model(images).logits
    assert len(calls) == 1
    torch.testing.assert_close(hooked, model(images).logits.detach(), rtol=0, atol=1e-6)
    assert (hooked - folded_logits).abs().max() > 1e-4
    handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(images).logits, folded_logits, rtol=0, atol=0)


def test_model_built_under_inference_mode():
    # Inference tensors carry no version counter, yet caching and reloading must still work.
    other = _model_with_bank()
    with torch.inference_mode():
        model = _model_with_bank()
        images = tiny_images(5)
        first = model(images).logits
        assert model.rald.inference_constants(with_bank=True) is model.rald.inference_constants(with_bank=True)
        torch.testing.assert_close(model(images).logits, first, rtol=0, atol=0)
        for parameter in other.rald.label_encoder.parameters():
            parameter.add_(0.3)
        model.load_state_dict(other.state_dict())
        reloaded = model(images).logits
        torch.testing.assert_close(reloaded, other(images).logits, rtol=0, atol=1e-6)
    assert (reloaded - first).abs().max() > 1e-4


def test_reference_differs_from_transductive():
    model = _model_with_bank()
    with torch.no_grad():
        reference = model(tiny_images(9), relation_mode="reference").logits
        transductive = model(tiny_images(9), relation_mode="transductive").logits
    assert (reference - transductive).abs().max() > 1e-6


def test_auto_mode_uses_bank():
    model = _model_with_bank()
    assert model.rald.resolve_relation_mode() == "reference"
    model.rald.clear_reference_bank()
    assert model.rald.resolve_relation_mode() == "transductive"
    assert model.config.reference_bank_size == 0
    assert model.config.reference_bank_fingerprint is None


def test_reference_scores_only_when_needed():
    model = _model_with_bank(bank_size=13)
    images = tiny_images(5)
    with torch.no_grad():
        assert model(images, relation_mode="reference").image_relations is None
    assert model(images, relation_mode="reference").image_relations is None  # with gradients, still eval mode
    attention = model.rald.itrr.attention
    with torch.no_grad():
        bank = model.rald.inference_constants(with_bank=True).bank
        _, scores = attention.attend(torch.randn(5, 30), mode="reference", bank=bank, need_scores=True)
    assert scores.shape == (5, 3, 14)  # each image, then the bank


def test_single_image_attention_matches_explicit():
    model = _model_with_bank(bank_size=13)
    attention = model.rald.itrr.attention
    with torch.no_grad():
        attention.qkv.weight.normal_(std=0.3, generator=torch.Generator().manual_seed(1))  # peaked attention
        bank = model.rald.inference_constants(with_bank=True).bank
        token = torch.randn(1, 30, generator=torch.Generator().manual_seed(2))
        fused, no_scores = attention.attend(token, mode="reference", bank=bank, need_scores=False)
        explicit, scores = attention.attend(token, mode="reference", bank=bank, need_scores=True)
    assert no_scores is None
    assert scores.shape == (1, 3, 14)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-6)
    assert explicit.abs().max() > 0.3


def test_bank_is_class_balanced_and_seeded():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 3)
    indices = select_reference_indices(labels, 30, per_class=True, seed=4)
    counts = torch.bincount(labels[indices], minlength=3).tolist()
    # Class 2 has only 3 images; its share goes to the other classes.
    assert counts == [14, 13, 3]
    assert torch.equal(indices, select_reference_indices(labels, 30, per_class=True, seed=4))
    assert not torch.equal(indices, select_reference_indices(labels, 30, per_class=True, seed=5))
    assert len(set(indices.tolist())) == 30


def test_bank_larger_than_dataset_takes_everything():
    labels = torch.tensor([0, 1, 1])
    assert select_reference_indices(labels, 10, per_class=True, seed=0).tolist() == [0, 1, 2]
    assert select_reference_indices(labels, 10, per_class=False, seed=0).tolist() == [0, 1, 2]


def test_bank_round_trip(tmp_path):
    model = _model_with_bank()
    images = tiny_images(6, seed=9)
    with torch.no_grad():
        expected = model(images).logits
    model.save_pretrained(tmp_path)
    loaded = RALDForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.reference_bank_size == 13
    torch.testing.assert_close(loaded.rald.reference_features, model.rald.reference_features)
    torch.testing.assert_close(loaded.rald.reference_labels, model.rald.reference_labels)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).logits, expected, rtol=0, atol=1e-6)


def test_stale_bank_raises_until_rebuilt():
    model = _model_with_bank()
    with torch.no_grad():
        model.rald.backbone.conv_stem.weight.mul_(1.5)
        with pytest.raises(ValueError, match="reference bank was built with other backbone weights"):
            model(tiny_images(2))
    labels = torch.arange(40) % 7
    model.build_reference_bank(ImageList(tiny_images(40, seed=7), labels), size=13)
    with torch.no_grad():
        assert model(tiny_images(2)).logits.shape == (2, 7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_bank_survives_cast(dtype):
    model = _model_with_bank().to(dtype)
    images = tiny_images(4).to(dtype)
    with torch.no_grad():
        batch = model(images).logits
        alone = torch.cat([model(images[i : i + 1]).logits for i in range(4)])
    assert batch.dtype == dtype
    torch.testing.assert_close(alone, batch)
    with torch.no_grad():
        model.rald.backbone.conv_stem.weight.mul_(1.5)
    assert _raises_stale_bank(model, images)


def _raises_stale_bank(model: RALDForImageClassification, images: torch.Tensor | None = None) -> bool:
    try:
        with torch.no_grad():
            model(tiny_images(2) if images is None else images)
    except ValueError as error:
        assert "reference bank was built with other backbone weights" in str(error)
        return True
    return False


def test_bank_check_after_cached_calls():
    model = _model_with_bank()
    backbone = model.rald.backbone
    inner = backbone.blocks[0][0].conv.weight
    assert not _raises_stale_bank(model)  # fills the cache

    # The first and last backbone parameters are part of the cache key.
    with torch.no_grad():
        backbone.conv_stem.weight.mul_(1.5)
    assert _raises_stale_bank(model)
    model.build_reference_bank(ImageList(tiny_images(40, seed=7), torch.arange(40) % 7), size=13)
    assert not _raises_stale_bank(model)

    # An inner weight is not, so an edit between two evaluation calls needs a mode switch or a cache clear.
    with torch.no_grad():
        inner.mul_(1.5)
    assert not _raises_stale_bank(model)
    model.eval()
    assert _raises_stale_bank(model)
    with torch.no_grad():
        inner.div_(1.5)
    model.rald.clear_inference_cache()
    assert not _raises_stale_bank(model)


def test_bank_check_eval_mode_step():
    model = _model_with_bank()
    inner = model.rald.backbone.blocks[0][0].conv.weight
    optimizer = torch.optim.SGD([inner], lr=10.0)
    assert not _raises_stale_bank(model)
    # Training in evaluation mode (frozen batch norm), one step on an inner weight only, without a mode switch.
    model(tiny_images(4), relation_mode="transductive").logits.square().sum().backward()
    optimizer.step()
    assert _raises_stale_bank(model)


def test_bank_check_backbone_load():
    model = _model_with_bank()
    assert not _raises_stale_bank(model)
    state = {name: tensor + 0.5 for name, tensor in model.rald.backbone.state_dict().items()}
    model.rald.backbone.load_state_dict(state)
    assert _raises_stale_bank(model)


@pytest.mark.parametrize(
    "overrides", [{"use_hierarchy_bias": True}, {"norm_first": True, "feature_norm": "batch_norm"}]
)
def test_constants_cache_tracks_read_tensors(overrides):
    """Edit each tensor outside the backbone in place, one after another. The cached constants must equal freshly
    computed ones after every edit, and edits of tensors they do not read must keep the cached object."""
    rald = _model_with_bank(**overrides).rald
    backbone_ids = {id(tensor) for tensor in (*rald.backbone.parameters(), *rald.backbone.buffers())}
    head = [
        (name, tensor)
        for name, tensor in (*rald.named_parameters(), *rald.named_buffers())
        if id(tensor) not in backbone_ids and tensor.is_floating_point()
    ]
    cache_kept = []
    with torch.no_grad():
        for name, tensor in head:
            before = rald.inference_constants(with_bank=True)
            tensor.mul_(1.1).add_(0.05)  # changes zeros too, and keeps variances positive
            cached = rald.inference_constants(with_bank=True)
            fresh = rald._compute_constants(with_bank=True, for_evaluation=True)
            for got, expected in zip(_constant_tensors(cached), _constant_tensors(fresh), strict=True):
                torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"stale constants after editing {name}")
            if cached is before:
                cache_kept.append(name)
    # The plan keeps transposed copies of the linear weights, so every edit outside the backbone renews the cache.
    assert cache_kept == []


def _constant_tensors(constants) -> list[torch.Tensor]:
    """Every tensor of the constants and of their evaluation plan, in a fixed order."""
    plan = constants.plan
    tensors = [constants.label_tokens, constants.label_keys, *(constants.bank or ())]
    tensors += [*plan.image_proj, *(plan.feature_norm or ())[:4], *(plan.final_norm or ())[1:3]]
    for block, *rest in (plan.itrr, plan.lgifo):
        tensors += [*block.fc1, *block.fc2, *block.norm2[1:3], *(block.norm1 or ())[1:3]]
        tensors += [tensor for part in rest[1:] for tensor in part]  # ITRR's qkv and proj, LGIFO's folded weights
    return tensors


class _LowRankAdapter(torch.nn.Module):
    """A linear layer plus a trainable low-rank update, in the way LoRA wraps a projection."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base
        self.down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.down.weight, std=1.0)
        torch.nn.init.normal_(self.up.weight, std=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


def test_bank_follows_adapter_on_projection():
    model = _model_with_bank(bank_size=13)
    attention = model.rald.itrr.attention
    with torch.no_grad():
        model(tiny_images(3))  # fills the cache with the plain projection
        plain_values = model.rald.inference_constants(with_bank=True).bank[1]
    attention.qkv = _LowRankAdapter(attention.qkv)
    model.eval()  # a mode switch lists the tracked tensors again
    tokens = model.rald.embed_features(model.rald.reference_features, use_running_stats=True)
    for _ in range(2):
        with torch.no_grad():
            keys, values = model.rald.inference_constants(with_bank=True).bank
            expected = attention.qkv(tokens)[:, 30:].view(13, 2, 3, 10).permute(1, 2, 0, 3)  # (2, H, M, Dh)
        torch.testing.assert_close(keys, expected[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(values, expected[1], rtol=0, atol=1e-6)
        with torch.no_grad():
            attention.qkv.up.weight.mul_(2)  # an in-place edit of the adapter must refresh the bank too
    assert (values - plain_values).abs().max() > 0.01


def test_adapter_used_from_the_next_call():
    model = _model_with_bank()
    images = tiny_images(5)
    with torch.no_grad():
        before = model(images).logits
        model.rald.itrr.mlp.fc1 = _LowRankAdapter(model.rald.itrr.mlp.fc1)  # no mode switch in between
        after = model(images).logits
    expected = model(images).logits.detach()  # with gradients: the modules' forward pass
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-6)
    assert (after - before).abs().max() > 1e-3


def test_global_hook_before_first_call():
    model = _model_with_bank()
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, output: seen.append(module))
    try:
        with torch.no_grad():
            model(tiny_images(3))
    finally:
        handle.remove()
    assert model.rald in seen
    assert model.rald.itrr.attention.qkv in seen
    assert model.rald.lgifo.mlp.fc2 in seen


def test_transductive_relations_in_evaluation():
    model = _model_with_bank()
    images = tiny_images(4)
    with torch.no_grad():
        planned = model(images, relation_mode="transductive").image_relations
    expected = model(images, relation_mode="transductive").image_relations.detach()
    assert planned.shape == (4, 3, 4)
    torch.testing.assert_close(planned, expected, rtol=1e-6, atol=1e-6)


def test_head_module_in_training_mode():
    """A head module set to training on its own (test-time batch-norm adaptation) runs as the modules do."""
    model = _model_with_bank(feature_norm="batch_norm")
    norm = model.rald.feature_norm
    images = tiny_images(6)
    with torch.no_grad():
        evaluated = model(images, relation_mode="self").logits
        running_mean = norm.running_mean.clone()
        norm.train()
        adapted = model(images, relation_mode="self").logits
    assert (norm.running_mean - running_mean).abs().max() > 1e-6
    assert (adapted - evaluated).abs().max() > 1e-4


def test_functional_call_uses_given_weights():
    model = _model_with_bank()
    images = tiny_images(4)
    halved = {
        name: tensor.detach() * 0.5
        for name, tensor in model.named_parameters()
        if ".mlp." in name and not name.startswith("rald.label_encoder")
    }
    with torch.no_grad():
        own = model(images).logits
        borrowed = torch.func.functional_call(model, halved, (images,)).logits
        again = model(images).logits
    expected = torch.func.functional_call(model, halved, (images,)).logits.detach()  # with gradients: the modules
    torch.testing.assert_close(borrowed, expected, rtol=1e-6, atol=1e-6)
    assert (borrowed - own).abs().max() > 1e-4
    torch.testing.assert_close(again, own, rtol=0, atol=0)


def test_label_attention_with_adapter_on_query():
    model = _model_with_bank()
    attention = model.rald.lgifo.attention
    attention.q = _LowRankAdapter(attention.q)
    model.eval()
    images = tiny_images(5)
    with torch.no_grad():
        shorter = model(images).logits
        assert model.rald.inference_constants(with_bank=True).plan is None
    full = model(images).logits  # with gradients: the modules' forward
    torch.testing.assert_close(shorter, full.detach(), rtol=0, atol=1e-6)


def test_bank_keys_cached_until_weights_change():
    model = _model_with_bank()
    with torch.no_grad():
        first = model.rald.inference_constants(with_bank=True).bank
        assert model.rald.inference_constants(with_bank=True).bank is first
        model.rald.image_proj.weight.add_(0.1)
        second = model.rald.inference_constants(with_bank=True).bank
    assert second is not first
    assert (second[0] - first[0]).abs().max() > 1e-4
    assert (second[1] - first[1]).abs().max() > 1e-4


def test_constants_follow_device_and_dtype_moves():
    model = _model_with_bank()
    with torch.no_grad():
        before = model(tiny_images(3)).logits
        model.double()
        doubled = model(tiny_images(3).double()).logits
    assert doubled.dtype == torch.float64
    torch.testing.assert_close(doubled.float(), before, rtol=1e-4, atol=1e-4)


def test_constants_follow_autocast():
    """Constants cached under bfloat16 autocast are not reused by a float32 call, nor the other way round."""
    model = _model_with_bank()
    images = tiny_images(3)
    with torch.no_grad():
        reference = model(images).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images).logits
            assert model.rald.inference_constants(with_bank=True).label_tokens.dtype == torch.bfloat16
        after = model(images).logits
        assert model.rald.inference_constants(with_bank=True).label_tokens.dtype == torch.float32
    torch.testing.assert_close(after, reference, rtol=0, atol=0)
    torch.testing.assert_close(low.float(), reference, rtol=0.05, atol=0.05)


def test_constants_follow_load_state_dict():
    model = _model_with_bank()
    other = _model_with_bank()
    with torch.no_grad():
        for parameter in other.rald.label_encoder.parameters():
            parameter.add_(0.3)
        other.rald.label_encoder.label_embeddings.mul_(2.0)
        model(tiny_images(2))  # fills the cache
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model(tiny_images(2)).logits, other(tiny_images(2)).logits)


def test_bank_shape_checks():
    model = _model_with_bank()
    with pytest.raises(ValueError, match=r"Reference features must have shape \(M, 256\)"):
        model.rald.set_reference_bank(torch.zeros(4, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels has 3 entries for a dataset of 40 images"):
        model.build_reference_bank(ImageList(tiny_images(40), torch.zeros(40)), labels=[0, 1, 2])
    with pytest.raises(ValueError, match="size must be a positive number"):
        model.build_reference_bank(ImageList(tiny_images(4), torch.zeros(4)), size=0)


def test_callback_clears_and_rebuilds_bank(tmp_path):
    model = _model_with_bank()
    labels = torch.arange(7) % 7
    dataset = ImageList(tiny_images(7, seed=11), labels)
    callback = ReferenceBankCallback(dataset, size=5, labels=labels.numpy(), seed=2)
    seen = {}

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen["bank_during_training"] = model.rald.has_reference_bank

    from rald_hf.training import RALDTrainer

    trainer = RALDTrainer(model=model, args=_args(tmp_path), train_dataset=dataset, callbacks=[callback, Probe()])
    trainer.train()
    assert seen["bank_during_training"] is False
    assert model.config.reference_bank_size == 5
    assert model.rald.reference_labels.tolist() == sorted(model.rald.reference_labels.tolist())


@pytest.mark.data
def test_pipeline_matches_predict_on_fer2013(data_dir, tmp_path):
    """pipeline() and predict_images return the same labels and scores for an image, alone or with others."""
    from datasets import load_dataset

    test = load_dataset(str(data_dir / "fer2013"), split="test").shuffle(seed=0).select(range(24))
    images = [row["image"] for row in test]
    space = LabelSpace.from_preset("fer2013")
    torch.manual_seed(0)
    config = RALDConfig.from_label_space(space, backbone="mobilenetv2_100", image_size=48, hidden_size=64)
    model = RALDForImageClassification(config)
    model.load_backbone_weights(str(data_dir / "weights" / "mobilenetv2_100.in1k.safetensors"))
    processor = RALDImageProcessor.from_backbone(model.rald.backbone, image_size=48)
    bank_images = processor(images)["pixel_values"]
    mapping = torch.tensor(space.index_of_names(test.features["label"].names))
    bank_labels = mapping[torch.tensor(test["label"])]
    model.build_reference_bank(ImageList(bank_images, bank_labels), size=16, labels=bank_labels.tolist())
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    classifier = pipeline("image-classification", model=str(tmp_path), top_k=7)
    assert classifier.model.config.id2label == model.config.id2label
    alone = [classifier(image) for image in images[:6]]
    together = classifier(images[:6], batch_size=6)
    reversed_batch = classifier(images[5::-1], batch_size=6)[::-1]
    for single, batched, backwards in zip(alone, together, reversed_batch, strict=True):
        assert [p["label"] for p in single] == [p["label"] for p in batched] == [p["label"] for p in backwards]
        np.testing.assert_allclose([p["score"] for p in single], [p["score"] for p in batched], atol=1e-5)
        np.testing.assert_allclose([p["score"] for p in single], [p["score"] for p in backwards], atol=1e-5)
        assert sum(p["score"] for p in single) == pytest.approx(1.0, abs=1e-4)
        assert {p["label"] for p in single} == set(space.labels)

    predicted = predict_images(tmp_path, images[:6], top_k=7)
    predicted_alone = [predict_images(tmp_path, [image], top_k=7)[0] for image in images[:6]]
    for from_pipeline, from_predict, from_single in zip(alone, predicted, predicted_alone, strict=True):
        assert [p["label"] for p in from_pipeline] == [label for label, _ in from_predict]
        np.testing.assert_allclose([p["score"] for p in from_pipeline], [s for _, s in from_predict], atol=1e-5)
        np.testing.assert_allclose([s for _, s in from_single], [s for _, s in from_predict], atol=1e-5)
