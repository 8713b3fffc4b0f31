import math

import pytest
import torch

from rald_hf.training import NNLDLOptions, nnldl_loss, nnldl_target


def _relations(scores: list[list[float]], heads: int = 1) -> torch.Tensor:
    table = torch.tensor(scores, dtype=torch.float32)  # (N, K)
    return table.unsqueeze(1).expand(-1, heads, -1).clone()  # (N, H, K)


def test_target_averages_top_neighbors():
    # Image 0 relates most to 2, then 1; image 1 to 0, then 2; image 2 to 1, then 0.
    relations = _relations([[9.0, 1.0, 2.0, 0.0], [3.0, 9.0, 1.0, 0.0], [1.0, 2.0, 9.0, 0.5], [0, 0, 0, 9.0]])
    probs = torch.eye(4)
    options = NNLDLOptions(num_neighbors=2, weighting="uniform")
    target, neighbors = nnldl_target(relations, probs, options)
    assert neighbors[0].tolist() == [2, 1]
    assert neighbors[1].tolist() == [0, 2]
    torch.testing.assert_close(target[0], torch.tensor([0.0, 0.5, 0.5, 0.0]))
    torch.testing.assert_close(target[1], torch.tensor([0.5, 0.0, 0.5, 0.0]))


def test_softmax_weights_match_renormalized_attention():
    relations = _relations([[0.0, 2.0, 1.0, -1.0], [2.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    probs = torch.eye(4)
    target, _ = nnldl_target(relations, probs, NNLDLOptions(num_neighbors=2, weighting="softmax"))
    # softmax over the whole row without image 0 itself, restricted to images 1 and 2, renormalised.
    full = torch.softmax(torch.tensor([2.0, 1.0, -1.0]), dim=0)
    expected = torch.tensor([0.0, full[0] / (full[0] + full[1]), full[1] / (full[0] + full[1]), 0.0])
    torch.testing.assert_close(target[0], expected)


def test_raw_weights_clip_negative_scores():
    relations = _relations([[0.0, 3.0, 1.0], [3.0, 0.0, -2.0], [-1.0, -2.0, 0.0]])
    probs = torch.eye(3)
    target, _ = nnldl_target(relations, probs, NNLDLOptions(num_neighbors=2, weighting="raw"))
    torch.testing.assert_close(target[0], torch.tensor([0.0, 0.75, 0.25]))
    torch.testing.assert_close(target[1], torch.tensor([1.0, 0.0, 0.0]))
    # Both neighbours of image 2 score below zero: uniform weights instead of a division by zero.
    torch.testing.assert_close(target[2], torch.tensor([0.5, 0.5, 0.0]))


def test_self_is_excluded_unless_included():
    relations = _relations([[10.0, 1.0, 0.0], [1.0, 10.0, 0.0], [0.0, 1.0, 10.0]])
    probs = torch.eye(3)
    _, excluded = nnldl_target(relations, probs, NNLDLOptions(num_neighbors=1))
    _, included = nnldl_target(relations, probs, NNLDLOptions(num_neighbors=1, include_self=True))
    assert excluded[:, 0].tolist() == [1, 0, 1]
    assert included[:, 0].tolist() == [0, 1, 2]


def test_head_reduction_mean_and_max():
    relations = torch.tensor([[[0.0, 4.0, 0.0], [0.0, -4.0, 1.0]], [[0.0] * 3] * 2, [[0.0] * 3] * 2])  # (3, 2, 3)
    probs = torch.eye(3)
    _, mean_neighbors = nnldl_target(relations, probs, NNLDLOptions(num_neighbors=1, head_reduction="mean"))
    _, max_neighbors = nnldl_target(relations, probs, NNLDLOptions(num_neighbors=1, head_reduction="max"))
    assert mean_neighbors[0, 0].item() == 2  # means: image 1 scores 0, image 2 scores 0.5
    assert max_neighbors[0, 0].item() == 1  # maxima: image 1 scores 4, image 2 scores 1


def test_offset_excludes_global_self():
    # Two local images at positions 2 and 3 of a global batch of 4.
    relations = _relations([[1.0, 2.0, 50.0, 3.0], [5.0, 1.0, 2.0, 50.0]])
    probs = torch.eye(4)
    _, neighbors = nnldl_target(relations, probs, NNLDLOptions(num_neighbors=1), self_offset=2)
    assert neighbors[:, 0].tolist() == [3, 0]


def test_small_batch_uses_fewer_neighbors():
    relations = _relations([[0.0, 1.0, 2.0], [1.0, 0.0, 2.0], [2.0, 1.0, 0.0]])
    _, neighbors = nnldl_target(relations, torch.eye(3), NNLDLOptions(num_neighbors=5))
    assert neighbors.shape == (3, 2)


def test_batch_of_one_gives_zero_loss():
    logits = torch.randn(1, 7, requires_grad=True)
    loss = nnldl_loss(logits, torch.zeros(1, 4, 1), NNLDLOptions(num_neighbors=5))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("batch_size", [2, 3, 5, 6])
def test_small_batches_are_finite(batch_size):
    torch.manual_seed(batch_size)
    logits = torch.randn(batch_size, 7, requires_grad=True)
    relations = torch.randn(batch_size, 4, batch_size)
    loss = nnldl_loss(logits, relations, NNLDLOptions(num_neighbors=5))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


def test_kl_is_cross_entropy_minus_entropy():
    torch.manual_seed(0)
    logits = torch.randn(6, 5)
    relations = torch.randn(6, 2, 6)
    cross_entropy = nnldl_loss(logits, relations, NNLDLOptions(loss="cross_entropy"))
    kl = nnldl_loss(logits, relations, NNLDLOptions(loss="kl"))
    target, _ = nnldl_target(relations, logits.softmax(-1), NNLDLOptions())
    entropy = -(target * target.log()).sum()
    torch.testing.assert_close(cross_entropy - kl, entropy)
    assert kl.item() >= 0


def test_kl_matches_torch_kl_div():
    torch.manual_seed(1)
    logits = torch.randn(5, 4)
    relations = torch.randn(5, 3, 5)
    target, _ = nnldl_target(relations, logits.softmax(-1), NNLDLOptions(num_neighbors=2))
    expected = torch.nn.functional.kl_div(logits.log_softmax(-1), target, reduction="sum")
    torch.testing.assert_close(nnldl_loss(logits, relations, NNLDLOptions(num_neighbors=2)), expected)


def test_bfloat16_inputs_give_the_float32_loss():
    """Outputs of a forward pass under bfloat16 autocast are scored in float32, with the same neighbours."""
    torch.manual_seed(4)
    logits = torch.randn(6, 5).bfloat16()
    relations = torch.randn(6, 3, 6).bfloat16()
    options = NNLDLOptions(num_neighbors=2)
    loss = nnldl_loss(logits, relations, options)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, nnldl_loss(logits.float(), relations.float(), options), rtol=0, atol=0)


def test_paper_reduction_divides_by_classes():
    torch.manual_seed(2)
    logits = torch.randn(6, 7)
    relations = torch.randn(6, 2, 6)
    batch_mean = nnldl_loss(logits, relations, NNLDLOptions(reduction="batch_mean"))
    paper = nnldl_loss(logits, relations, NNLDLOptions(reduction="paper"))
    torch.testing.assert_close(paper, batch_mean / 7)


def test_detached_target_stops_gradients():
    torch.manual_seed(3)
    relations = torch.randn(4, 2, 4, requires_grad=True)
    logits = torch.randn(4, 3, requires_grad=True)
    nnldl_loss(logits, relations, NNLDLOptions(detach_target=True)).backward()
    assert relations.grad is None
    relations.grad = None
    nnldl_loss(logits, relations, NNLDLOptions(detach_target=False)).backward()
    assert relations.grad is not None
    assert relations.grad.abs().sum() > 0


def test_loss_is_zero_when_prediction_matches_target():
    # Every image predicts the same distribution, so the neighbours' mean equals each prediction.
    logits = torch.tensor([[1.0, 2.0, 3.0]]).repeat(4, 1)
    relations = torch.randn(4, 2, 4)
    assert math.isclose(nnldl_loss(logits, relations, NNLDLOptions()).item(), 0.0, abs_tol=1e-6)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="relations cover 3 images but logits 4"):
        nnldl_loss(torch.randn(4, 3), torch.randn(3, 2, 4), NNLDLOptions())
    with pytest.raises(ValueError, match="relations have 6 candidates but there are 4 candidate logits"):
        nnldl_loss(torch.randn(4, 3), torch.randn(4, 2, 6), NNLDLOptions())
