"""Comparing a sharded result with the model's, within the model's own fp32 rounding.

Sharding sums in another order than the unsharded model does, and how fp32 rounds a sum
depends on the CPU's kernels (two machines here rounded one GPT-2 embedding gradient element
of 0.045, in a tensor of scale 100, 5e-4 apart). So a fixed per-element tolerance either
flakes by machine or is loose. Instead the sharded result is checked against a float64 copy
of the model: it must be as close to those rounding-free numbers as the model's own fp32
result is, with a margin. A wrong result is off by its own size, not by a multiple of the
rounding noise, so this still catches every real error.
"""

from __future__ import annotations

import torch

MARGIN = 8  # the sharded error may be this many times the unsharded fp32 model's own


def assert_as_exact_as_the_model(got, fp32, fp64, what: str, *, atol: float = 1e-4) -> None:
    """`got` (sharded, fp32) is within `atol + MARGIN x |fp32 - fp64|` of the fp64 truth."""
    truth = fp64.detach().double()
    noise = (fp32.detach().double() - truth).abs().max().item() if truth.numel() else 0.0
    torch.testing.assert_close(
        got.detach().double(),
        truth,
        rtol=1e-4,
        atol=atol + MARGIN * noise,
        msg=lambda m: f"{what}: {m} (the fp32 model's own error: {noise:.2e})",
    )
