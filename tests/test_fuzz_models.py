"""Random small models through the public `autoshard`: equal to the unsharded model, or a clear error.

hypothesis draws a model from a grammar: a linear, one to three ops on the (batch, seq, width)
activation (element-wise, gating halves, unequal splits and joins, reductions, softmax, norms,
heads views and attention, matmuls, cumsum, inner linears, pads and slices), a linear out; and a
width, batch and tp. `TinyLM` puts the same ops in identical repeated residual blocks between
token and position embeddings (a vocabulary tp may not divide, tied to the head or not) and a
cross-entropy loss, at pp 1 or 2, through `train_step`. The simulated sharded model's loss and
every parameter gradient must equal the model's (gradients within the model's own fp32
rounding, measured against an fp64 copy: tests/numerics.py), and identical blocks must be placed
alike; an `AutoshardError` (a refusal that says why) is the only other acceptable outcome. A
wrong number or any other exception fails, and hypothesis shrinks it to a small model.

Examples run from a fixed seed (CI is deterministic); NXD_FUZZ_EXAMPLES raises their number,
NXD_FUZZ_SEED=n explores other models (hypothesis' random search from seed n).
"""

from __future__ import annotations

import copy
import os
import warnings

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st
from numerics import assert_as_exact_as_the_model

from nxd_autoshard import autoshard
from nxd_autoshard.ir.errors import AutoshardError

SEED = os.environ.get("NXD_FUZZ_SEED")
settings.register_profile(
    "nxd_fuzz",
    max_examples=int(os.environ.get("NXD_FUZZ_EXAMPLES", "14")),
    derandomize=SEED is None,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _halves(x):
    return x.chunk(2, -1)


def _heads(x, k):
    b, s, w = x.shape
    return x.view(b, s, k, w // k).transpose(1, 2)


def _merge(x):
    b, k, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, k * d)


# name -> (whether it applies at width w, the width after it, the op on x); ops with
# parameters (norms, inner linears) are built in Fuzz.__init__
OPS = {
    "relu": (lambda w: True, lambda w: w, F.relu),
    "gelu": (lambda w: True, lambda w: w, F.gelu),
    "silu": (lambda w: True, lambda w: w, F.silu),
    "tanh": (lambda w: True, lambda w: w, torch.tanh),
    "square_add": (lambda w: True, lambda w: w, lambda x: x * x + x),
    "scale_shift": (lambda w: True, lambda w: w, lambda x: x * 0.5 + 1.0),
    "glu": (lambda w: w % 2 == 0, lambda w: w // 2, lambda x: F.glu(x, -1)),
    "gate": (lambda w: w % 2 == 0, lambda w: w // 2, lambda x: _halves(x)[0] * _halves(x)[1]),
    "swap_halves": (
        lambda w: w % 2 == 0,
        lambda w: w,
        lambda x: torch.cat(_halves(x)[::-1], -1),
    ),
    "split_unequal": (
        lambda w: w >= 4,
        lambda w: w,
        lambda x: torch.cat(
            x.split([x.shape[-1] // 4, x.shape[-1] - x.shape[-1] // 4], -1)[::-1], -1
        ),
    ),
    "center": (lambda w: True, lambda w: w, lambda x: x - x.mean(-1, keepdim=True)),
    "sum_scale": (lambda w: True, lambda w: w, lambda x: x * x.sum(-1, keepdim=True)),
    "amax_norm": (
        lambda w: True,
        lambda w: w,
        lambda x: x / (x.abs().amax(-1, keepdim=True) + 1.0),
    ),
    "seq_mean": (lambda w: True, lambda w: w, lambda x: x + x.mean(1, keepdim=True)),
    "softmax": (lambda w: True, lambda w: w, lambda x: x.softmax(-1)),
    "log_softmax_seq": (lambda w: True, lambda w: w, lambda x: x.log_softmax(1)),
    "heads_softmax": (
        lambda w: w % 2 == 0,
        lambda w: w,
        lambda x: _merge(_heads(x, 2).softmax(-1)),
    ),
    "attention": (
        lambda w: w % 2 == 0,
        lambda w: w,
        lambda x: _merge(
            F.scaled_dot_product_attention(_heads(x, 2), _heads(x, 2), _heads(x, 2), is_causal=True)
        ),
    ),
    "self_matmul": (
        lambda w: True,
        lambda w: w,
        lambda x: (x @ x.transpose(-1, -2) * 0.1).softmax(-1) @ x,
    ),
    "flatten_tokens": (
        lambda w: True,
        lambda w: w,
        lambda x: F.relu(x.reshape(-1, x.shape[-1])).reshape(x.shape),
    ),
    "cumsum_seq": (
        lambda w: True,
        lambda w: w,
        lambda x: x.permute(0, 2, 1).cumsum(-1).permute(0, 2, 1),
    ),
    "cumsum_features": (lambda w: True, lambda w: w, lambda x: x.cumsum(-1) * 0.1),
    "pad_slice": (lambda w: True, lambda w: w, lambda x: F.pad(x, (1, 2))[..., 1:-2]),
    "drop_first": (lambda w: w > 2, lambda w: w - 1, lambda x: x[..., 1:]),
    "stack_sum": (lambda w: True, lambda w: w, lambda x: torch.stack([x, 2 * x], 0).sum(0)),
    "unsqueeze_squeeze": (lambda w: True, lambda w: w, lambda x: x.unsqueeze(2).squeeze(2)),
    "layer_norm": (lambda w: True, lambda w: w, None),
    "rms_norm": (lambda w: True, lambda w: w, None),
    "linear": (lambda w: True, None, None),
}


class Fuzz(torch.nn.Module):
    """linear -> the drawn ops -> linear."""

    def __init__(self, d_in, width, d_out, steps, inner_widths, bias):
        super().__init__()
        self.inp = torch.nn.Linear(d_in, width, bias=bias)
        self.steps = []
        self.layers = torch.nn.ModuleList()
        w = width
        inner = iter(inner_widths)
        for name in steps:
            applies, after, fn = OPS[name]
            if not applies(w):
                continue
            if name == "linear":
                w2 = next(inner)
                self.layers.append(torch.nn.Linear(w, w2, bias=bias))
                w = w2
            elif name == "layer_norm":
                self.layers.append(torch.nn.LayerNorm(w))
            elif name == "rms_norm":
                self.layers.append(torch.nn.RMSNorm(w))
            else:
                w = after(w)
                self.steps.append(fn)
                continue
            self.steps.append(len(self.layers) - 1)
        self.out = torch.nn.Linear(w, d_out, bias=bias)

    def forward(self, x):
        x = self.inp(x)
        for step in self.steps:
            x = self.layers[step](x) if isinstance(step, int) else step(x)
        return self.out(x)


@st.composite
def models(draw):
    steps = draw(st.lists(st.sampled_from(sorted(OPS)), min_size=1, max_size=3))
    model = Fuzz(
        d_in=draw(st.sampled_from([4, 8])),
        width=draw(st.sampled_from([4, 6, 8, 12, 16])),
        d_out=draw(st.sampled_from([2, 4, 8])),
        steps=steps,
        inner_widths=draw(st.lists(st.sampled_from([4, 6, 8, 16]), min_size=3, max_size=3)),
        bias=draw(st.booleans()),
    )
    batch, seq = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([2, 3, 4]))
    return model, (batch, seq, model.inp.in_features), draw(st.sampled_from([2, 4])), steps


@settings(settings.get_profile("nxd_fuzz"))
@seed(int(SEED or 0))
@given(drawn=models(), seed=st.integers(0, 2**16))
def test_random_model_is_equal_or_refused(drawn, seed):
    model, shape, tp, steps = drawn
    torch.manual_seed(seed)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(shape)
    weight = torch.randn(*shape[:2], model.out.out_features)
    reference = copy.deepcopy(model)
    want = (reference(x) * weight).sum()
    want.backward()
    exact = copy.deepcopy(model).double()  # the rounding-free numbers, to size fp32's own noise
    (exact(x.double()) * weight.double()).sum().backward()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fallbacks warn; the numbers are what is checked
            sharded = autoshard(copy.deepcopy(model), tp, example_inputs=(x,))
            got = (sharded(x) * weight).sum()
    except AutoshardError as err:
        event(f"refused: {type(err).__name__}")
        return  # a clear refusal (DivisibilityError, PlanError, ...): loud, not wrong
    event("sharded")
    got.backward()
    where = f"steps={steps} shape={shape} tp={tp}"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{where}: loss {m}")
    grads = sharded.gather_grads()
    exact_grads = dict(exact.named_parameters())
    for name, param in reference.named_parameters():
        assert name in grads, f"{where}: no gradient for {name}"
        assert_as_exact_as_the_model(
            grads[name], param.grad, exact_grads[name].grad, f"{where}: {name}"
        )


class Block(torch.nn.Module):
    """x + down(ops(up(norm(x)))): a pre-norm residual block around the drawn ops."""

    def __init__(self, width, hidden, steps, norm, bias):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width) if norm == "layer" else torch.nn.RMSNorm(width)
        self.up = torch.nn.Linear(width, hidden, bias=bias)
        self.steps = []
        w = hidden
        for name in steps:
            applies, after, fn = OPS[name]
            if fn is not None and applies(w):
                self.steps.append(fn)
                w = after(w)
        self.down = torch.nn.Linear(w, width, bias=bias)

    def forward(self, x):
        h = self.up(self.norm(x))
        for fn in self.steps:
            h = fn(h)
        return x + self.down(h)


class TinyLM(torch.nn.Module):
    """Token (and position) embeddings, identical repeated blocks, a norm and an LM head
    (tied to the embedding or not); returns logits."""

    def __init__(self, vocab, width, hidden, layers, steps, norm, bias, tied, positions):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.pos = torch.nn.Embedding(8, width) if positions else None
        self.layers = torch.nn.ModuleList(
            Block(width, hidden, steps, norm, bias) for _ in range(layers)
        )
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        if self.pos is not None:
            x = x + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def cross_entropy(logits, labels):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


BLOCK_OPS = sorted(name for name, (_, _, fn) in OPS.items() if fn is not None)


@st.composite
def language_models(draw):
    steps = draw(st.lists(st.sampled_from(BLOCK_OPS), min_size=0, max_size=2))
    layers = draw(st.sampled_from([1, 2, 3]))
    pp = draw(st.sampled_from([1, 2])) if layers > 1 else 1
    model = TinyLM(
        vocab=draw(st.sampled_from([10, 16, 17])),
        width=draw(st.sampled_from([4, 8, 12])),
        hidden=draw(st.sampled_from([8, 12, 16])),
        layers=layers,
        steps=steps,
        norm=draw(st.sampled_from(["layer", "rms"])),
        bias=draw(st.booleans()),
        tied=draw(st.booleans()),
        positions=draw(st.booleans()),
    )
    batch, seq = draw(st.sampled_from([2, 4])), draw(st.sampled_from([3, 4, 8]))
    return model, (batch, seq), draw(st.sampled_from([2, 4])), pp, steps


@settings(settings.get_profile("nxd_fuzz"))
@seed(int(SEED or 0))
@given(drawn=language_models(), seed=st.integers(0, 2**16))
def test_random_language_model_is_equal_or_refused(drawn, seed):
    """Embeddings (the vocabulary padded where tp does not divide it, tied or not), identical
    blocks (which must get identical plans), pipeline stages and a cross-entropy loss: one
    training step's loss and every gradient equal the model's, or a clear refusal."""
    model, (batch, seq), tp, pp, steps = drawn
    torch.manual_seed(seed)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    vocab = model.embed.num_embeddings
    ids = torch.randint(vocab, (batch, seq))
    labels = torch.randint(vocab, (batch, seq))
    reference = copy.deepcopy(model)
    want = cross_entropy(reference(ids), labels)
    want.backward()
    exact = copy.deepcopy(model).double()
    cross_entropy(exact(ids).double(), labels).backward()
    where = f"steps={steps} batch={batch} seq={seq} tp={tp} pp={pp} layers={len(model.layers)}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sharded = autoshard(copy.deepcopy(model), tp, pp=pp, loss_fn=cross_entropy)
            got = sharded.train_step(ids, target=labels)
    except AutoshardError as err:
        event(f"refused: {type(err).__name__}")
        return
    event(f"sharded pp={pp}")
    event(f"embedding {sharded.placements['embed.weight']}, vocab {vocab} at tp {tp}")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{where}: loss {m}")
    grads = sharded.gather_grads()
    exact_grads = dict(exact.named_parameters())
    for name, param in reference.named_parameters():
        assert name in grads, f"{where}: no gradient for {name}"
        assert_as_exact_as_the_model(
            grads[name], param.grad, exact_grads[name].grad, f"{where}: {name}"
        )
    # identical blocks, identical plans: each block's parameters placed as the first block's
    first = {
        n.split(".", 2)[2]: p for n, p in sharded.placements.items() if n.startswith("layers.0.")
    }
    for i in range(1, len(model.layers)):
        mine = {
            n.split(".", 2)[2]: p
            for n, p in sharded.placements.items()
            if n.startswith(f"layers.{i}.")
        }
        assert mine == first, f"{where}: block {i} placed {mine}, block 0 {first}"
