"""The compiled plan (`sharded.compiled`): one read-only value with no runtime inside, the same
on every runtime, and what explain() and golden files read."""

import dataclasses

import pytest
import torch
from conftest import CONFIGS

from nxd_autoshard import Shard, autoshard
from nxd_autoshard.compiler.compiled import CompiledPlan
from nxd_autoshard.inspect.golden import golden_text
from nxd_autoshard.inspect.report import explain
from nxd_autoshard.tools.hf import build_model, random_batch
from nxd_autoshard.tools.launch import run_ranks


@pytest.fixture(scope="module")
def gpt2():
    model = build_model(CONFIGS / "gpt2.json")
    args, kwargs = random_batch(model)
    return model, args, kwargs, autoshard(model, 2, example_inputs=args, example_kwargs=kwargs)


def test_the_compiled_plan_is_read_only(gpt2):
    _, _, _, sharded = gpt2
    compiled = sharded.compiled
    assert isinstance(compiled, CompiledPlan)
    name = "transformer.h.0.attn.c_attn.weight"
    with pytest.raises(TypeError):
        compiled.placements[name] = Shard(0)
    with pytest.raises(TypeError):
        compiled.parameters[name] = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        compiled.programs = ()
    # the module's own plan is untouched by what was handed out
    assert sharded.plan.placements[name] == compiled.placements[name]


def test_it_holds_shapes_and_programs_not_weights_or_a_runtime(gpt2):
    model, _, _, sharded = gpt2
    compiled = sharded.compiled
    fields = {f.name: getattr(compiled, f.name) for f in dataclasses.fields(compiled)}
    assert not any(isinstance(v, (torch.Tensor, torch.nn.Module)) for v in fields.values())
    assert list(compiled.parameters) == [
        n for n, _ in model.named_parameters(remove_duplicate=False)
    ]
    # GPT-2's LM head is tied to the token embedding: the alias names its first name
    assert compiled.parameters["lm_head.weight"].tied_to == "transformer.wte.weight"
    assert compiled.local_shape("transformer.h.0.mlp.c_fc.weight") == sharded.local_shape(
        "transformer.h.0.mlp.c_fc.weight"
    )


def test_explain_and_goldens_read_it(gpt2):
    _, _, _, sharded = gpt2
    compiled = sharded.compiled
    mine, theirs = explain(compiled, "json"), sharded.explain("json")
    mine.pop("history"), theirs.pop("history")  # pass timings: the rest is the same plan
    assert mine == theirs
    assert golden_text(compiled) == golden_text(sharded)
    with pytest.raises(IndexError, match=r"program=3, but 1 program\(s\) are captured"):
        explain(compiled, program=3)


def test_a_later_capture_leaves_an_earlier_value_as_it_was(gpt2):
    model, args, kwargs, _ = gpt2
    sharded = autoshard(model, 2, example_inputs=args, example_kwargs=kwargs)
    before = sharded.compiled
    sharded(torch.randint(0, 64, (2, 8)))  # a new signature: a second program
    assert len(before.programs) == 1 and len(sharded.compiled.programs) == 2
    assert sharded.compiled.placements == before.placements  # decided once


def _golden_on_rank(rank, world):
    model = build_model(CONFIGS / "gpt2.json")
    args, kwargs = random_batch(model)
    sharded = autoshard(model, world, example_inputs=args, example_kwargs=kwargs)
    return golden_text(sharded.compiled), dict(sharded.compiled.placements)


def test_the_process_group_runtime_runs_the_simulators_plan(gpt2):
    _, _, _, simulated = gpt2
    results = run_ranks(_golden_on_rank, 2)
    for text, placements in results:
        assert text == golden_text(simulated.compiled)
        assert placements == dict(simulated.compiled.placements)
