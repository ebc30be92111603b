"""torch-xla lowering on one CPU device (PJRT_DEVICE=CPU, `make test-xla`): every tp rank of a
stage traces to the same HLO, with the collectives and replica groups the plan says; the world
size 1 program run on the XLA device equals eager CPU; torch.compile(backend="openxla").

Nothing with a collective over more than one device runs here: the traces are lazy graphs
(FACTS: torch-xla's CPU all-reduce across threads aborts), read as HLO text.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch_xla")
sys.path.insert(0, str(Path(__file__).parent.parent))

from conftest import config_dict  # noqa: E402

from nxd_autoshard import autoshard  # noqa: E402
from nxd_autoshard.ir.mesh import Mesh  # noqa: E402
from nxd_autoshard.runtime import xla  # noqa: E402
from nxd_autoshard.runtime.base import state_value  # noqa: E402
from nxd_autoshard.tools import neuron  # noqa: E402
from nxd_autoshard.tools.hf import build_model, random_batch  # noqa: E402

# the runtime starts before any CPU backward (FACTS: a later XLA backward dies otherwise)
DEVICE = xla.xla_device()


def _sharded(family: str, tp: int, pp: int = 1, dp: int = 1, **config):
    model = build_model(config_dict(family, num_hidden_layers=2, **config))
    args, kwargs = random_batch(model, batch=2 * pp, seq=16)
    sharded = autoshard(model, tp, pp=pp, dp=dp, example_inputs=args, example_kwargs=kwargs)
    return model, sharded, args, kwargs


# (family, tp, pp, dp): two families; tp alone, tp x pp x dp, and a tied embedding across stages
CASES = [("llama", 2, 1, 1), ("gpt2", 2, 1, 1), ("llama", 2, 2, 2), ("gpt2", 4, 2, 1)]


@pytest.mark.parametrize("family,tp,pp,dp", CASES)
def test_one_hlo_per_stage_with_the_plans_collectives(family, tp, pp, dp):
    _, sharded, args, kwargs = _sharded(family, tp, pp, dp)
    mesh = Mesh(dp, pp, tp)
    proofs = neuron.prove_one_program(sharded, args, kwargs, ranks="all")
    assert [p.index for p in proofs] == list(range(pp))
    tp_groups = xla.hlo_groups(mesh.groups("tp"))
    for proof in proofs:
        assert len(proof.ranks) == tp * dp
        assert proof.identical, f"stage {proof.index}: ranks {proof.ranks} trace different HLO"
        # the HLO's collectives, by kind and replica groups, are the ones our program counts
        assert proof.collectives == proof.expected, (proof.collectives, proof.expected)
        assert proof.collectives[("all-reduce", tp_groups)] >= 2  # Megatron's per block, at least
        if proof.index == pp - 1:  # the vocab-parallel loss: its max all-reduce over tp
            assert proof.collectives[("all-reduce/max", tp_groups)] == 1
        if dp > 1:  # the step's gradient average over dp, one coalesced all-reduce
            assert proof.collectives[("all-reduce", xla.hlo_groups(mesh.groups("dp")))] == 1
    if family == "gpt2" and pp > 1:  # wte / lm_head: summed across the first and last stage
        tied = xla.hlo_groups(
            [[mesh.rank(pp=0, tp=t), mesh.rank(pp=pp - 1, tp=t)] for t in range(tp)]
        )
        assert proofs[0].collectives[("all-reduce", tied)] == 1
        assert proofs[-1].collectives[("all-reduce", tied)] == 1


def test_a_rank_baked_in_as_a_constant_is_caught(monkeypatch):
    """The proof has teeth: the rank as a Python int (what a rank-specialised program does)
    gives rank 0 and rank 1 different HLO."""
    _, sharded, args, kwargs = _sharded("llama", 2)
    monkeypatch.setattr(xla, "_rank_input", lambda coord, device: coord)
    (proof,) = neuron.prove_one_program(sharded, args, kwargs)
    assert not proof.identical


def test_hlo_counts_read_kinds_and_groups():
    text = (
        "  %all-reduce.3 = (f32[4]{0}, /*index=1*/f32[]) all-reduce(f32[4]{0} %a), "
        "replica_groups={{0,1},{2,3}}, to_apply=%AddComputation.1\n"
        "  %all-reduce.4 = f32[4]{0} all-reduce(f32[4]{0} %all-reduce.3), "
        "replica_groups={{0,1},{2,3}}, to_apply=%MaxComputation.2\n"
        "  ROOT %all-gather.5 = f32[8]{0} all-gather(f32[4]{0} %b), replica_groups={{0,2}}, dimensions={0}\n"
    )
    assert xla.hlo_collectives(text) == {
        ("all-reduce", "{{0,1},{2,3}}"): 1,
        ("all-reduce/max", "{{0,1},{2,3}}"): 1,
        ("all-gather", "{{0,2}}"): 1,
    }
    assert xla.canonical_hlo('HloModule IrToHlo.7, x\n%a = f32[] p(), metadata={op_name="x"}') == (
        "HloModule program, x\n%a = f32[] p()"
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_world_size_one_on_xla_equals_eager_cpu(family):
    model, sharded, args, kwargs = _sharded(family, 1)
    (spec,) = neuron.stage_specs(sharded, args, kwargs)
    trace = neuron.trace_stage(sharded, spec, 0)
    assert xla.program_collectives(spec.gm)  # the program keeps its collectives at tp 1
    results = trace.results()
    import torch_xla

    torch_xla.sync()  # runs it: at world size 1 the all-reduces over {{0}} are the identity
    want = model(*args, **kwargs).loss
    want.backward()
    torch.testing.assert_close(results[0].cpu(), want.detach(), rtol=1e-5, atol=1e-6)
    _assert_grads(model, trace.grads)


def _assert_grads(model, got: dict) -> None:
    """Every parameter's gradient (a tied one under any of its names) equals eager CPU's."""
    named = dict(model.named_parameters(remove_duplicate=False))
    assert {id(named[n]) for n in got} == {id(p) for p in model.parameters()}
    for name, grad in got.items():
        torch.testing.assert_close(grad.cpu(), named[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_openxla_compile_of_a_stage_program(family):
    """torch.compile(backend="openxla") of the world size 1 program (its collectives are over the
    whole world, so they trace as functional collectives): loss and gradients equal eager CPU."""
    import torch_xla

    model, sharded, args, kwargs = _sharded(family, 1)
    (spec,) = neuron.stage_specs(sharded, args, kwargs)
    program = sharded.programs()[0]
    state = [state_value(sharded, program, n).detach().to(DEVICE) for n in spec.state_names]
    params = [s for n, s in zip(spec.state_names, state) if n in sharded.full_shapes]
    for p in params:
        p.requires_grad_(True)
    inputs = [x.to(DEVICE) if isinstance(x, torch.Tensor) else x for x in spec.inputs]
    local = xla.on_device(spec.gm, DEVICE)
    compiled = torch.compile(local.forward, backend="openxla", fullgraph=True)
    with xla.xla_ops(Mesh(), xla._rank_input(0, DEVICE).reshape(())):
        loss = compiled(*state, *inputs)[0]
        loss.backward()
    torch_xla.sync()
    want = model(*args, **kwargs).loss
    want.backward()
    torch.testing.assert_close(loss.detach().cpu(), want.detach(), rtol=1e-5, atol=1e-6)
    names = [n for n in spec.state_names if n in sharded.full_shapes]
    _assert_grads(model, {n: p.grad for n, p in zip(names, params) if p.grad is not None})


@pytest.mark.parametrize(
    "family,overrides", [("llama", {"vocab_size": 127}), ("gpt2", {"vocab_size": 127})]
)
def test_padded_vocab_is_one_program(family, overrides):
    """A vocab tp does not divide: the last rank's padding rows are masked by a comparison with
    the rank input, not by a rank-specific slice."""
    _, sharded, args, kwargs = _sharded(family, 2, **overrides)
    assert sharded.padded  # the embedding / LM head are padded to 128 rows
    (proof,) = neuron.prove_one_program(sharded, args, kwargs)
    assert proof.identical
    assert proof.collectives == proof.expected


@pytest.mark.parametrize("name", ["mixtral", "t5"])
def test_more_families_are_one_program(name):
    """MoE experts (Mixtral's fused expert weights) and an encoder-decoder (T5, where some
    sharded values carry no gradient: their shard has no backward all-gather)."""
    from test_equivalence import UNSEEN

    model = build_model(UNSEEN[name])
    args, kwargs = random_batch(model, seq=16)
    sharded = autoshard(model, 2, example_inputs=args, example_kwargs=kwargs)
    (proof,) = neuron.prove_one_program(sharded, args, kwargs)
    assert proof.identical
    assert proof.collectives == proof.expected, (proof.collectives, proof.expected)


@pytest.mark.parametrize("name", ["z_loss", "z_loss_padded_vocab", "max_pool"])
def test_sharded_reductions_are_one_program_with_their_all_reduces(name):
    """A z-loss (logsumexp) and max-poolings (amax, min.dim) over sharded dims: every rank
    traces one HLO whose max/min/sum all-reduces are those the program counts; no all-gather."""
    import test_sharded_reductions as reductions

    model, args = reductions._batch(name)
    sharded = reductions._shard(model, 2, args)
    (proof,) = neuron.prove_one_program(sharded, args, {})
    assert proof.identical
    assert proof.collectives == proof.expected, (proof.collectives, proof.expected)
    tp = xla.hlo_groups(Mesh(1, 1, 2).groups("tp"))
    assert not any(kind == "all-gather" for kind, _ in proof.collectives)
    if name == "max_pool":  # amax's max, min.dim's value and index; amax's tie counts backward
        assert proof.collectives[("all-reduce/max", tp)] == 1
        assert proof.collectives[("all-reduce/min", tp)] == 2
    else:  # logsumexp's max and the loss's
        assert proof.collectives[("all-reduce/max", tp)] == 2
