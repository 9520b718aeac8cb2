import pytest
import torch

from esn_core.models.seeded_draws import draw_uniforms, inverse_cdf


def test_uniforms_depend_on_the_rows_seed_and_cap_only():
    together = draw_uniforms([3, 4, 3], [5, 2, 5], "cpu")
    assert together.shape == (3, 5)
    assert torch.equal(together[0], together[2])
    assert torch.equal(together[1, :2], draw_uniforms([4], [2], "cpu")[0])
    assert torch.equal(together[1, :2], torch.rand(2, generator=torch.Generator().manual_seed(4)))
    assert torch.all(together[1, 2:] == 0)
    assert not torch.equal(together[0], draw_uniforms([4], [5], "cpu")[0])


def test_inverse_cdf_picks_the_first_index_past_the_uniform():
    probs = torch.tensor([[0.25, 0.25, 0.5]]).repeat(4, 1)  # cdf 0.25, 0.5, 1.0
    assert inverse_cdf(probs, torch.tensor([0.0, 0.1, 0.3, 0.9])).tolist() == [0, 0, 1, 2]
    # a boundary belongs to the next index (right=True): u = 0.25 is past the first bin
    assert inverse_cdf(probs[:1], torch.tensor([0.25])).tolist() == [1]


def test_inverse_cdf_scales_by_the_total_and_skips_zero_weights():
    weights = torch.tensor([[2.0, 0.0, 6.0], [0.0, 0.0, 3.0]])  # cdf 2, 2, 8 and 0, 0, 3
    assert inverse_cdf(weights, torch.tensor([0.24, 0.0])).tolist() == [0, 2]
    assert inverse_cdf(weights, torch.tensor([0.26, 0.99])).tolist() == [2, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_cdf_never_returns_past_the_last_index(dtype):
    # a uniform that rounds onto the total would search past the end without the clamp
    weights = torch.full((1, 7), 1 / 7, dtype=dtype)
    assert inverse_cdf(weights, torch.tensor([1.0])).tolist() == [6]
