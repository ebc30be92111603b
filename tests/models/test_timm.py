"""timm 1.0's own ViT (fused qkv reshaped to (B, N, 3, heads, head_dim), a class token, a pooled
head), tiny random configs: loss and every gradient against the unsharded model, collectives per
block against the optimum.

`make test-models` installs timm, torchvision and pillow with --no-deps into a directory of their
own (see the Makefile and conftest.py: PyPI's torchvision is a CUDA build).
"""

from __future__ import annotations

import warnings

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is installed by `make test-models`")

from nxd_autoshard import autoshard  # noqa: E402


def _vit(**kw):
    config = dict(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10,
        mlp_ratio=2.0,
    )  # fmt: skip
    config.update(kw)
    return timm.models.vision_transformer.VisionTransformer(**config)


def _check(model, tp: int):
    torch.manual_seed(1)
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    want = torch.nn.functional.cross_entropy(model(images), labels)
    want.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sharded = autoshard(model, tp, example_inputs=(images,))
    got = torch.nn.functional.cross_entropy(sharded(images), labels)
    got.backward()
    torch.testing.assert_close(got, want)
    grads = sharded.gather_grads()
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, msg=name, atol=1e-5, rtol=1e-4)
    report = sharded.explain()
    placements = {p.name: str(p.placement) for p in report.parameters}
    messages = [str(w.message) for w in caught if "nxd-autoshard" in str(w.message)]
    return report.totals, placements, messages


@pytest.mark.parametrize("tp", [2, 4])
def test_vit_fused_qkv_at_the_optimum(tp):
    torch.manual_seed(0)
    totals, placements, messages = _check(_vit(), tp)
    assert placements["blocks.0.attn.qkv.weight"] == "S(0)"  # by heads, block by block
    assert placements["blocks.0.attn.proj.weight"] == "S(1)"
    assert placements["blocks.0.mlp.fc1.weight"] == "S(0)"
    assert totals["block_collectives"] == totals["block_optimum"] == [[2, 2]]
    assert totals["replicated_block_matmuls"] == 0
    assert not [m for m in messages if "replicated" in m], messages


def test_vit_with_qk_norm_and_layer_scale():
    """Per-head q/k LayerNorms and LayerScale: replicated weights whose grads are all-reduced."""
    torch.manual_seed(0)
    totals, placements, messages = _check(_vit(qk_norm=True, init_values=0.1), 2)
    assert placements["blocks.0.attn.qkv.weight"] == "S(0)"
    assert totals["replicated_block_matmuls"] == 0
    assert totals["block_collectives"] == totals["block_optimum"]
