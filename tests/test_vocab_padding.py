"""A vocab that tp does not divide is padded (as NxD does): sharded, and invisible in outputs and gradients."""

import copy
import warnings

import pytest
import torch
from conftest import config_dict
from numerics import assert_as_exact_as_the_model
from sharded_cache import sharded_family

from nxd_autoshard import Shard, autoshard
from nxd_autoshard.runtime.collectives import local_vocab_embedding
from nxd_autoshard.tools.hf import build_model, random_batch
from nxd_autoshard.tools.launch import run_ranks
from nxd_autoshard.tools.verify import compare, verify_config

# (family, overrides, tp): odd and even vocabs, untied (Llama) and tied (GPT-2, tied Llama) heads
PADDED = [
    ("llama", {"vocab_size": 1023}, 2),
    ("llama", {"vocab_size": 1022}, 4),
    ("llama", {"vocab_size": 1023, "tie_word_embeddings": True}, 2),
    ("gpt2", {"vocab_size": 1023}, 2),
    ("gpt2", {"vocab_size": 1022}, 4),
    ("bert", {"vocab_size": 1023}, 2),  # tied decoder plus a replicated [vocab] bias, padded to add
]
VOCAB_PARAMS = (
    "model.embed_tokens.weight",
    "lm_head.weight",
    "transformer.wte.weight",
    "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.weight",
)


def _assert_all_ok(checks):
    bad = [c.line() for c in checks if not c.ok]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(("family", "overrides", "tp"), PADDED)
def test_simulator_matches_unsharded(family, overrides, tp):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="nxd-autoshard")
        checks = verify_config(config_dict(family, **overrides), tp, world="sim")
    _assert_all_ok(checks)
    assert any(c.name == "output logits" for c in checks)


@pytest.mark.parametrize(("family", "overrides", "tp"), PADDED)
def test_vocab_parameters_are_sharded_over_padded_rows(family, overrides, tp):
    model = build_model(config_dict(family, **overrides))
    args, kwargs = random_batch(model)
    sharded = autoshard(model, tp, example_inputs=args, example_kwargs=kwargs)
    vocab = overrides["vocab_size"]
    padded = -(-vocab // tp) * tp
    names = [n for n in VOCAB_PARAMS if n in sharded.placements]
    assert len(names) >= 2
    for name in names:
        assert sharded.placements[name] == Shard(0), name
        assert sharded.padded[name] == padded
        assert sharded.local_shape(name) == (padded // tp, model.config.hidden_size)
    code = sharded.graph_module.code
    assert f"slice.Tensor(all_gather, 2, 0, {vocab})" in code  # logits gathered, padding dropped
    assert f"[-1, {padded // tp}]" in code  # the loss's logits.view(-1, vocab) is local


def test_padding_is_invisible_in_logits_gradients():
    """A loss of the gathered logits alone: the gather's slice must give the padding zero gradient."""
    model = build_model(config_dict("llama", vocab_size=1022, tie_word_embeddings=True))
    ref = copy.deepcopy(model)
    ids = random_batch(model)[0][0]
    sharded = autoshard(model, 4, example_inputs=(ids,))
    weights = torch.linspace(-1, 1, 1022)  # distinguishes every real column from the padding
    got = sharded(ids).logits
    (got * weights).square().mean().backward()
    want = ref(ids).logits
    (want * weights).square().mean().backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    grads = sharded.gather_grads()
    for name, param in ref.named_parameters():
        check = compare(name, grads[name], param.grad)
        assert check.ok, check.line()


def test_adamw_steps_track_unsharded():
    model = build_model(config_dict("llama", vocab_size=1022))
    ref = copy.deepcopy(model)
    args, kwargs = random_batch(model)
    sharded = autoshard(model, 4, example_inputs=args, example_kwargs=kwargs)
    losses = {}
    for name, m in (("sharded", sharded), ("ref", ref)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        losses[name] = []
        for _ in range(4):
            opt.zero_grad()
            loss = m(*args, **kwargs).loss
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["ref"][-1] < losses["ref"][0]
    torch.testing.assert_close(
        torch.tensor(losses["sharded"]), torch.tensor(losses["ref"]), rtol=1e-4, atol=1e-5
    )
    assert dict(sharded.named_parameters())["lm_head.weight"].shape == (1022, 64)  # full, unpadded


def _train_padded_gloo(rank, world, cfg, steps):
    model = build_model(cfg)
    args, kwargs = random_batch(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="nxd-autoshard")
        sharded = autoshard(model, world, example_inputs=args, example_kwargs=kwargs)
    shapes = {
        n: tuple(p.shape)
        for n, p in sharded.named_parameters(remove_duplicate=False)
        if n in VOCAB_PARAMS
    }
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
    losses, first = [], None
    for _ in range(steps):
        opt.zero_grad()
        out = sharded(*args, **kwargs)
        out.loss.backward()
        if first is None:
            first = (out.loss.detach(), out.logits.detach(), sharded.gather_grads())
        opt.step()
        losses.append(out.loss.item())
    wte = sharded.get_parameter("transformer.wte.weight").detach()
    padding_rows = wte[cfg["vocab_size"] - rank * wte.shape[0] :]  # empty except on the last rank
    state = sharded.full_state_dict()
    return shapes, first, losses, padding_rows, state


def test_gloo_tied_gpt2_tp2_matches_and_trains():
    cfg = config_dict("gpt2", vocab_size=1023)
    steps = 3
    results = run_ranks(_train_padded_gloo, 2, args=(cfg, steps))
    ref = build_model(cfg)
    exact = copy.deepcopy(ref).double()  # the rounding-free training, to size fp32's own noise
    args, kwargs = random_batch(ref)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    exact_opt = torch.optim.AdamW(exact.parameters(), lr=1e-2)
    want_losses, first = [], None
    for _ in range(steps):
        opt.zero_grad()
        exact_opt.zero_grad()
        out = ref(*args, **kwargs)
        out.loss.backward()
        exact(*args, **kwargs).loss.backward()
        if first is None:
            grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
            first = (out.loss.detach(), out.logits.detach(), grads)
        opt.step()
        exact_opt.step()
        want_losses.append(out.loss.item())

    for rank, (shapes, _, losses, padding_rows, _) in enumerate(results):
        # sharded over 1024 padded rows, not replicated
        assert shapes == {"transformer.wte.weight": (512, 64), "lm_head.weight": (512, 64)}
        assert padding_rows.shape[0] == (1 if rank == 1 else 0)
        assert torch.count_nonzero(padding_rows) == 0, "padding rows must never be updated"
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(want_losses), rtol=1e-4, atol=1e-5
        )
    (loss, logits, grads), state = results[0][1], results[0][4]
    checks = [compare("loss", loss, first[0]), compare("logits", logits, first[1])]
    checks += [compare(f"grad {n}", grads[n], g) for n, g in first[2].items()]
    _assert_all_ok(checks)
    # after the steps, compare the padded tied table with the fp64 training's: Adam divides by
    # the gradient's own size, so where a gradient is near zero its rounding moves a weight by a
    # step of lr's size (attention key biases, whose true gradient is zero, are left out)
    assert_as_exact_as_the_model(
        state["transformer.wte.weight"],
        ref.transformer.wte.weight,
        exact.transformer.wte.weight,
        "trained wte",
    )


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_embedding_masks_ids_outside_the_real_vocab(rank):
    vocab, tp = 10, 3  # padded to 12: rows 10 and 11 of the last shard are padding
    table = torch.randn(vocab, 4)
    padded = torch.cat([table, torch.full((2, 4), 7.0)])  # non-zero padding must still stay unseen
    ids = torch.tensor([0, 3, 4, 7, 8, 9, 10, 11])
    local = padded.chunk(tp)[rank]
    got = local_vocab_embedding(local, ids, -1, rank, tp, vocab)
    start = rank * 4
    inside = (ids >= start) & (ids < min(start + 4, vocab))
    want = torch.where(inside.unsqueeze(-1), padded[ids.clamp(max=vocab - 1)], torch.zeros(()))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("tp", [2, 3])
def test_token_ids_outside_the_vocab_raise_as_unsharded(tp):
    torch.manual_seed(0)
    model = _TiedHead()
    ids = torch.tensor([[0, 3, 10]])
    sharded = autoshard(model, tp, example_inputs=(ids,))
    bad = torch.tensor([[0, 3, 11]])
    with pytest.raises(IndexError):
        model(bad)
    with pytest.raises(IndexError, match="token id 11 is outside the vocabulary of 11"):
        sharded(bad)


def test_labels_outside_the_vocab_raise_and_ignored_ones_do_not():
    model, sharded, args, kwargs = sharded_family("gpt2", 2)
    labels = kwargs["labels"].clone()
    labels[0, 0] = -100  # ignore_index: fine
    sharded(*args, labels=labels)
    labels[0, 1] = model.config.vocab_size
    with pytest.raises(IndexError, match="outside the vocabulary"):
        sharded(*args, labels=labels)


class _TiedHead(torch.nn.Module):
    """Token embedding tied to its output head, then reductions over the vocab dim."""

    def __init__(self, vocab=11, width=8):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        logits = self.head(torch.tanh(self.emb(ids))) - 0.5  # the padding columns are -0.5 here
        return logits.amax(-1) + logits.mean(-1) + logits.sum(-1)


def test_reductions_over_a_padded_vocab_gather_it_first():
    torch.manual_seed(0)
    model = _TiedHead()
    ids = torch.randint(0, 11, (3, 5))
    with pytest.warns(UserWarning, match="padded to 12"):
        sharded = autoshard(model, 4, example_inputs=(ids,), plan={"emb": "vocab_parallel"})
    got = sharded(ids)
    got.square().sum().backward()
    ref = copy.deepcopy(model)
    want = ref(ids)
    want.square().sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(sharded.gather_grads()["emb.weight"], ref.emb.weight.grad)


def test_a_new_call_structure_keeps_the_padding():
    """A second capture (no labels, other shapes) reuses the committed placements and paddings."""
    model = build_model(config_dict("gpt2", vocab_size=1023))
    ref, exact = copy.deepcopy(model), copy.deepcopy(model).double()
    args, kwargs = random_batch(model)
    sharded = autoshard(model, 2, example_inputs=args, example_kwargs=kwargs)
    ids = torch.randint(0, 1023, (3, 7), generator=torch.Generator().manual_seed(3))
    got, want, truth = sharded(ids).logits, ref(ids).logits, exact(ids).logits
    assert len(sharded.programs()) == 2
    assert_as_exact_as_the_model(got, want, truth, "logits")
    got.sum().backward()
    want.sum().backward()
    truth.sum().backward()
    grad = sharded.gather_grads()["transformer.wte.weight"]
    wte = "transformer.wte.weight"
    assert_as_exact_as_the_model(
        grad, ref.get_parameter(wte).grad, exact.get_parameter(wte).grad, "wte gradient"
    )


@pytest.mark.parametrize("padding_idx", [0, 5, -1])
def test_embedding_padding_row_gets_no_gradient_on_any_rank(padding_idx):
    # every rank runs the same ops (no branch on which rank holds the padding row)
    vocab, tp = 10, 3
    table = torch.randn(12, 4)
    ids = torch.tensor([[0, 5, 5, 9], [3, 0, 7, 5]])
    want = table[:vocab].clone().requires_grad_()
    # aten.embedding's -1 is "no padding row" (F.embedding's -1 would be the last row)
    reference_pad = padding_idx if padding_idx >= 0 else None
    torch.nn.functional.embedding(ids, want, padding_idx=reference_pad).pow(2).sum().backward()
    pieces = [p.clone().requires_grad_() for p in table.chunk(tp)]
    out = sum(
        local_vocab_embedding(p, ids, padding_idx, r, tp, vocab) for r, p in enumerate(pieces)
    )
    torch.testing.assert_close(out, torch.nn.functional.embedding(ids, table[:vocab]))
    out.pow(2).sum().backward()
    torch.testing.assert_close(torch.cat([p.grad for p in pieces])[:vocab], want.grad)
