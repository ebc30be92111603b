"""Reductions over a sharded dim in whole models: a z-loss (logsumexp of vocab-parallel logits)
and a max-pooling over a column-parallel hidden dim reduce locally and all-reduce the small
result, never gathering the activation; loss and every gradient equal the unsharded model's,
in the simulator at tp 2 and 4 and on 2 gloo ranks."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from nxd_autoshard import autoshard
from nxd_autoshard.ir import ops
from nxd_autoshard.runtime.simulator import trace_collectives
from nxd_autoshard.tools.launch import run_ranks

VOCAB, WIDTH, HIDDEN = 32, 16, 32


class ZLossLM(torch.nn.Module):
    """Embedding, an MLP block and an LM head; the loss is cross entropy plus PaLM's z-loss
    (the squared logsumexp of the logits), written by hand in the model."""

    def __init__(self, vocab: int = VOCAB):
        super().__init__()
        self.vocab = vocab
        self.embed = torch.nn.Embedding(vocab, WIDTH)
        self.up = torch.nn.Linear(WIDTH, HIDDEN)
        self.down = torch.nn.Linear(HIDDEN, WIDTH)
        self.lm_head = torch.nn.Linear(WIDTH, vocab, bias=False)

    def forward(self, ids, labels):
        x = self.embed(ids)
        x = x + self.down(F.gelu(self.up(x)))
        logits = self.lm_head(x)
        z = torch.logsumexp(logits, dim=-1)
        loss = F.cross_entropy(logits.view(-1, self.vocab), labels.view(-1))
        return loss + 1e-2 * z.pow(2).mean()


class MaxPooled(torch.nn.Module):
    """An MLP block gated by max-poolings (amax and max.dim's values) of its sharded hidden."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(WIDTH, HIDDEN)
        self.down = torch.nn.Linear(HIDDEN, WIDTH)

    def forward(self, x, target):
        h = F.gelu(self.up(x))
        gate = h.amax(-1, keepdim=True) - h.min(-1).values.unsqueeze(-1)
        out = x + self.down(h) * torch.sigmoid(gate)
        return ((out - target) ** 2).mean()


PLANS = {
    ZLossLM: {"embed": "vocab_parallel", "up": "column", "down": "row", "lm_head": "column"},
    MaxPooled: {"up": "column", "down": "row"},
}


# a vocab tp does not divide (31: padded to 32) has its padding left out of the logsumexp
MODELS = {
    "z_loss": ZLossLM,
    "z_loss_padded_vocab": lambda: ZLossLM(VOCAB - 1),
    "max_pool": MaxPooled,
}


def _batch(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    if isinstance(model, ZLossLM):
        ids = torch.randint(0, model.vocab, (2, 6))
        return model, (ids, torch.randint(0, model.vocab, (2, 6)))
    # x carries a gradient, as the report assumes of a floating input (its grad_all_reduce)
    return model, (torch.randn(2, 6, WIDTH).requires_grad_(), torch.randn(2, 6, WIDTH))


def _reference(model, args):
    ref = copy.deepcopy(model)
    loss = ref(*args)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in ref.named_parameters()}


def _assert_matches(loss, grads, want_loss, want_grads):
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(want_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def _shard(model, tp, args):
    return autoshard(model, tp, example_inputs=args, plan=PLANS[type(model)], auto=False)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", list(MODELS))
def test_reduction_over_sharded_dim_all_reduces_the_reduced_value(name, tp):
    model, args = _batch(name)
    cls = type(model)
    want_loss, want_grads = _reference(model, args)
    sharded = _shard(model, tp, args)
    program = sharded.graph_module
    lowered = [n.target for n in program.graph.nodes if n.target in ops.REDUCTIONS]
    want = (
        [ops.logsumexp_all_reduce]
        if cls is ZLossLM
        else [
            ops.amax_all_reduce,
            ops.max_dim_all_reduce,
        ]
    )
    assert lowered == want
    report = sharded.explain()
    with trace_collectives() as log:
        loss = sharded(*args)
        loss.backward()
    # what the report predicts is what ran, shapes and bytes
    traced = Counter((kind, phase, tuple(shape), size) for kind, phase, shape, size in log)
    assert Counter((e.kind, e.phase, tuple(e.shape), e.bytes) for e in report.events()) == traced
    kinds = Counter((kind, phase) for kind, phase, _, _ in log)
    assert not any(kind == "all_gather" for kind, _ in kinds), kinds  # no activation gathered
    reduced = {tuple(shape) for kind, _, shape, _ in log if kind.startswith("all_reduce(")}
    # the reduced value, one entry per token (and the vocab-parallel loss's, per flat token)
    assert reduced == ({(2, 6, 1), (12,)} if cls is ZLossLM else {(2, 6, 1)})
    if cls is ZLossLM:
        assert kinds[("all_reduce(max)", "forward")] == 1 + 1  # logsumexp's and the loss's
    else:
        assert kinds[("all_reduce(max)", "forward")] == 1  # amax
        assert kinds[("all_reduce(min)", "forward")] == 2  # min.dim's value and index
        assert ("all_reduce", "backward") in kinds  # amax's tie counts
    _assert_matches(loss.detach(), sharded.gather_grads(), want_loss, want_grads)


def _on_rank(rank: int, world: int, model, args) -> dict:
    sharded = _shard(copy.deepcopy(model), world, args)
    loss = sharded(*args)
    loss.backward()
    return {"loss": loss.detach(), "grads": sharded.gather_grads()}


@pytest.mark.parametrize("name", list(MODELS))
def test_reduction_over_sharded_dim_on_gloo(name):
    model, args = _batch(name)
    want_loss, want_grads = _reference(model, args)
    for out in run_ranks(_on_rank, 2, args=(model, args), timeout_s=300):
        _assert_matches(out["loss"], out["grads"], want_loss, want_grads)


def _ties():
    """0, 1, 2, 0, ... in rows of 8: the max of a row is tied within a shard and across shards,
    in unequal counts per rank (row 1 at tp 2: twice on rank 0, once on rank 1)."""
    return torch.arange(4 * 8).remainder(3).float().reshape(4, 8)


def _weights():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, generator=gen) for _ in range(4)]


def _reductions_on_rank(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from nxd_autoshard.runtime import collectives as C

    piece = _ties().chunk(world, 1)[rank].clone().requires_grad_()
    with C.axis_groups({"tp": dist.group.WORLD}):
        amax = C.amax_all_reduce(piece, (1,), False, "max", None, "tp")
        amin = C.amax_all_reduce(piece, (1,), True, "min", None, "tp").squeeze(1)
        values, index = C.max_dim_all_reduce(piece, 1, False, "max", None, "tp")
        argmin = C.argmax_all_reduce(piece, 1, False, "min", None, "tp")
        lse = C.logsumexp_all_reduce(piece, (1,), False, None, "tp")
        outs = (amax, amin, values, lse)
        sum((o * w).sum() for o, w in zip(outs, _weights())).backward()
    return {
        "outs": [o.detach() for o in outs],
        "index": index,
        "argmin": argmin,
        "grad": piece.grad,
    }


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_reductions_with_ties_on_gloo(world):
    # the process-group lowering itself: values, indices (the first extremum) and gradients
    # (torch's share per tie, counted over all ranks) equal torch's on the whole tensor
    full = _ties().requires_grad_()
    values, index = full.max(1)
    outs = (full.amax(1), full.amin(1, keepdim=True).squeeze(1), values, full.logsumexp(1))
    sum((o * w).sum() for o, w in zip(outs, _weights())).backward()
    ranks = run_ranks(_reductions_on_rank, world, timeout_s=300)
    for out in ranks:
        for got, want in zip(out["outs"], outs):
            torch.testing.assert_close(got, want.detach())
        assert torch.equal(out["index"], index) and torch.equal(out["argmin"], full.argmin(1))
    torch.testing.assert_close(torch.cat([out["grad"] for out in ranks], 1), full.grad)
