"""Ragged batching of speech decoders (esn_core.models.ragged): padded rows compute what
each row computes alone, checked against single-row runs of small convolution stacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esn_core.models.ragged import key_padding, longest_first, past_the_end, ragged_time_axis, valid_lengths


class EdgePad(nn.Module):
    """A resampler-like layer that pads by replicating its edge (as BigVGAN's do)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, 1, 5, dtype=torch.float64))

    def forward(self, x):
        return F.conv1d(F.pad(x, (2, 2), mode="replicate"), self.weight, groups=x.shape[1])


class Vocoder(nn.Module):
    """same conv -> transposed conv x3 -> edge-padded filter -> dilated conv -> strided down."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pre = nn.Conv1d(4, 6, 7, padding=3)
        self.up = nn.ConvTranspose1d(6, 6, 7, stride=3, padding=2)  # (k - s) / 2 = 2: x3
        self.edge = EdgePad(6)
        self.dilated = nn.Conv1d(6, 6, 3, dilation=3, padding=3)
        self.down = nn.Conv1d(6, 2, 4, stride=3, padding=1)  # x1/3 back to the input rate
        self.double()

    def forward(self, x):
        x = self.pre(x)
        x = torch.tanh(self.up(x))
        x = x + self.edge(x) ** 2
        x = self.dilated(torch.sin(x))
        return self.down(x)


def test_valid_lengths_scale_with_the_layer_and_refuse_a_broken_ratio():
    lengths = torch.tensor([4, 7, 10])
    assert valid_lengths(lengths, 10, 30).tolist() == [12, 21, 30]
    assert valid_lengths(torch.tensor([4, 10]), 10, 5).tolist() == [2, 5]
    with pytest.raises(ValueError, match="from 10 to 5 steps"):
        valid_lengths(lengths, 10, 5)  # 7 steps would become 3.5


def test_key_padding_blocks_keys_past_the_end_but_never_a_position_itself():
    assert past_the_end(torch.tensor([2, 3]), 3).tolist() == [[False, False, True],
                                                               [False, False, False]]
    blocked = key_padding(torch.tensor([2, 3]), 3)
    assert blocked[0].tolist() == [[False, False, True],
                                   [False, False, True],
                                   [False, False, False]]  # the padded query keeps its own key
    assert not blocked[1].any()


def _rows_alone(model, rows):
    with torch.no_grad():
        return [model(r[None])[0] for r in rows]


def test_padded_rows_through_a_conv_stack_equal_each_row_alone():
    model = Vocoder()
    generator = torch.Generator().manual_seed(1)
    lengths = [9, 4, 13, 1]
    rows = [torch.randn(4, n, generator=generator, dtype=torch.float64) for n in lengths]
    alone = _rows_alone(model, rows)
    # Garbage (not zeros) in the padding: nothing of it may reach a real position.
    batch = torch.randn(len(rows), 4, max(lengths), generator=generator, dtype=torch.float64) * 50
    for b, row in enumerate(rows):
        batch[b, :, : row.shape[1]] = row
    with torch.no_grad():
        plain = model(batch)
        with ragged_time_axis(model, lengths, replicate_padded=(EdgePad,)):
            ragged = model(batch)
        after = model(batch)
    assert torch.equal(after, plain)  # the hooks are gone
    for b, one in enumerate(alone):
        assert one.shape[-1] == lengths[b]
        torch.testing.assert_close(ragged[b, :, : lengths[b]], one, rtol=0, atol=1e-12)
    # Without the refills the short rows read their neighbours' padding.
    assert (plain[1, :, :4] - alone[1]).abs().max() > 1e-3


def test_replicate_padding_needs_its_own_refill():
    model = Vocoder()
    lengths = [5, 11]
    generator = torch.Generator().manual_seed(2)
    rows = [torch.randn(4, n, generator=generator, dtype=torch.float64) for n in lengths]
    alone = _rows_alone(model, rows)
    batch = torch.zeros(2, 4, 11, dtype=torch.float64)
    for b, row in enumerate(rows):
        batch[b, :, : row.shape[1]] = row
    with torch.no_grad(), ragged_time_axis(model, lengths):  # EdgePad not declared
        wrong = model(batch)
    assert (wrong[0, :, :5] - alone[0]).abs().max() > 1e-6


def test_unsupported_padding_and_wrong_batches_are_refused():
    reflect = nn.Sequential(nn.Conv1d(2, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="0 pads with 'reflect'"):
        with ragged_time_axis(reflect, [3]):
            pass
    model = Vocoder()
    with pytest.raises(ValueError, match="3 lengths for a batch of 2 rows"):
        with torch.no_grad(), ragged_time_axis(model, [3, 4, 5]):
            model(torch.zeros(2, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least one step"):
        with ragged_time_axis(model, [0, 3]):
            pass
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_longest_first_groups_rows_of_similar_length():
    assert longest_first([3, 9, 5, 9, 1], max_rows=2) == [[1, 3], [2, 0], [4]]  # ties: input order
    assert longest_first([3, 9, 5]) == [[1, 2, 0]]  # None: one group
    assert longest_first([]) == []
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        longest_first([3], max_rows=0)
