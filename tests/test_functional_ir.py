"""Programs reach propagation without in-place writes (functional IR), and stay equal to the model."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from nxd_autoshard import autoshard


class FilledKeys(torch.nn.Module):
    """Attention whose keys are an `empty` buffer filled through two slices, as HF DeepSeek-V3's
    (a no-rope part and a rope part per head); the attention reads the buffer itself."""

    def __init__(self, hidden: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q = torch.nn.Linear(hidden, hidden, bias=False)
        self.k_nope = torch.nn.Linear(hidden, hidden // 2, bias=False)
        self.k_rope = torch.nn.Linear(hidden, hidden // 2, bias=False)
        self.v = torch.nn.Linear(hidden, hidden, bias=False)
        self.o = torch.nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        h, d = self.heads, self.head_dim
        q = self.q(x).view(b, s, h, d).transpose(1, 2)
        k = q.new_empty(b, h, s, d)
        k[..., : d // 2] = self.k_nope(x).view(b, s, h, d // 2).transpose(1, 2)
        k[..., d // 2 :] = self.k_rope(x).view(b, s, h, d // 2).transpose(1, 2)
        v = self.v(x).view(b, s, h, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = self.o(out.transpose(1, 2).reshape(b, s, h * d))
        out.div_(2.0)  # an in-place op on an activation
        return out


def _check_equal(model: torch.nn.Module, tp: int, x: torch.Tensor) -> list[str]:
    """Loss and every gradient of the simulated sharded model against the model; the warnings."""
    want = model(x).square().mean()
    want.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sharded = autoshard(model, tp, example_inputs=(x,))
        got = sharded(x).square().mean()
    got.backward()
    torch.testing.assert_close(got, want)
    for name, grad in sharded.gather_grads().items():
        torch.testing.assert_close(grad, expected[name], msg=name)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("tp", [2, 4])
def test_buffer_filled_through_slices_is_equal(tp):
    torch.manual_seed(0)
    model = FilledKeys()
    _check_equal(model, tp, torch.randn(2, 8, 32))


def test_no_in_place_op_reaches_propagation():
    torch.manual_seed(0)
    model = FilledKeys()
    sharded = autoshard(model, 2, example_inputs=(torch.randn(2, 8, 32),))
    gm = sharded.history.step("capture")
    assert "copy_" not in gm.text and "div_" not in gm.text and "slice_scatter" in gm.text


def test_a_buffer_filled_through_slices_is_sharded_with_its_writers():
    """The `new_empty` keys are sharded by heads with the projections that fill them: a local
    slice of the buffer, no gather, only the row-parallel all-reduce and the input's backward one."""
    torch.manual_seed(0)
    sharded = autoshard(FilledKeys(), 2, example_inputs=(torch.randn(2, 8, 32),))
    report = sharded.explain()
    placements = {p.name: str(p.placement) for p in report.parameters}
    assert placements["k_nope.weight"] == placements["k_rope.weight"] == "S(0)", placements
    assert report.totals["forward"] == {"all_reduce": 1}
    assert report.totals["backward"] == {"all_reduce": 1}
