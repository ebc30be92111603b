"""The one-liner without example inputs: autoshard returns at once and captures at the first call."""

import copy

import pytest
import torch
from conftest import CONFIGS
from test_errors import Untraceable

from nxd_autoshard import CaptureError, autoshard
from nxd_autoshard.inspect.golden import golden_text
from nxd_autoshard.tools.hf import build_model, random_batch
from nxd_autoshard.tools.launch import run_ranks


@pytest.fixture(scope="module")
def llama():
    return build_model(CONFIGS / "llama.json")


class Mlp(torch.nn.Module):
    """A model with no example inputs of its own (no dummy_inputs)."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_first_call_captures_the_program_example_inputs_would(llama):
    args, kwargs = random_batch(llama)
    lazy = autoshard(llama, 2)
    assert lazy.programs() == [] and "not captured yet" in repr(lazy)
    out = lazy(*args, **kwargs)
    torch.testing.assert_close(out.loss, llama(*args, **kwargs).loss, rtol=1e-5, atol=1e-6)
    eager = autoshard(llama, 2, example_inputs=args, example_kwargs=kwargs)
    assert len(lazy.programs()) == 1
    assert golden_text(lazy) == golden_text(eager)
    assert lazy.placements == eager.placements


def test_simulated_pipeline_optimizer_before_the_first_step(llama):
    """Without a process group the parameters are the full tensors: they exist before capture."""
    model, ref = copy.deepcopy(llama), copy.deepcopy(llama)
    sharded = autoshard(model, tp=2, pp=2)
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-3)
    assert sharded.programs() == []  # building the optimizer needed no program
    assert [n for n, _ in sharded.named_parameters()] == [n for n, _ in ref.named_parameters()]
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    args, kwargs = random_batch(llama, batch=4)
    got, want = [], []
    for _ in range(2):
        opt.zero_grad()
        got.append(sharded.train_step(*args, **kwargs).item())
        opt.step()
        ref_opt.zero_grad()
        loss = ref(*args, **kwargs).loss
        loss.backward()
        ref_opt.step()
        want.append(loss.item())
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-5)
    assert len(sharded.stages()) == 2


def test_explain_before_any_call_uses_the_models_dummy_inputs(llama):
    sharded = autoshard(llama, 2, pp=2)
    text = sharded.explain("text")
    assert "LlamaForCausalLM | tp 2 | pp 2" in text
    shapes = [
        tuple(n.meta["val"].shape)
        for n in sharded.graph_module.graph.nodes
        if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)
    ]
    assert (3, 5) in shapes  # transformers' DUMMY_INPUTS, captured as one microbatch (static)
    assert len(sharded.stages()) == 2
    assert "<" in sharded._repr_html_()


def test_without_example_inputs_of_its_own_it_says_what_to_pass():
    model = Mlp()
    sharded = autoshard(model, 2)
    with pytest.raises(
        ValueError, match=r"explain\(\) needs the captured program.*example_inputs="
    ):
        sharded.explain()
    html = sharded._repr_html_()  # a notebook cell showing it does not fail
    assert "not captured yet" in html and "example_inputs=" in html
    # in the simulator the parameters are the model's own full tensors, plan or not
    assert [p is q for p, q in zip(sharded.parameters(), model.parameters())] == [True] * 4
    x = torch.randn(3, 8)
    torch.testing.assert_close(sharded(x), model(x), rtol=1e-5, atol=1e-6)
    assert "Mlp | tp 2" in sharded.explain("text")


def test_capture_errors_name_the_module_at_the_first_call():
    sharded = autoshard(Untraceable(), 2)  # nothing is traced yet
    with pytest.raises(CaptureError, match="module 'gate'"):
        sharded(torch.randn(2, 4))


def _mesh_before_the_first_call(rank, world):
    out = {}
    plain = autoshard(Mlp(), world)
    try:
        plain.parameters()
    except ValueError as err:
        out["error"] = str(err)
    model = build_model(CONFIGS / "gpt2.json")
    args, kwargs = random_batch(model)
    sharded = autoshard(model, world)
    opt = sharded.optimizer(torch.optim.AdamW, lr=1e-3)  # this rank's shards, from dummy_inputs
    out["shape"] = tuple(sharded.get_parameter("transformer.h.0.mlp.c_fc.weight").shape)
    out["losses"] = []
    for _ in range(2):
        opt.zero_grad()
        loss = sharded(*args, **kwargs).loss
        loss.backward()
        opt.step()
        out["losses"].append(loss.item())
    out["code"] = sharded.programs()[-1].gm.code
    return out


def test_process_group_parameters_before_the_first_call():
    """On a mesh the parameters are the plan's shards: captured from dummy_inputs, or an error."""
    got = run_ranks(_mesh_before_the_first_call, 2)
    assert "this rank's parameters" in got[0]["error"] and "example_inputs=" in got[0]["error"]
    ref = build_model(CONFIGS / "gpt2.json")
    full = tuple(ref.get_parameter("transformer.h.0.mlp.c_fc.weight").shape)
    assert got[0]["shape"] == (full[0], full[1] // 2)  # GPT-2's Conv1D column split
    args, kwargs = random_batch(ref)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    want = []
    for _ in range(2):
        opt.zero_grad()
        loss = ref(*args, **kwargs).loss
        loss.backward()
        opt.step()
        want.append(loss.item())
    assert got[0]["losses"] == got[1]["losses"] and got[0]["code"] == got[1]["code"]
    torch.testing.assert_close(
        torch.tensor(got[0]["losses"]), torch.tensor(want), rtol=1e-4, atol=1e-5
    )
