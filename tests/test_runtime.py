"""The runtime seam on a tiny MLP (no HF models): the simulator and 2 gloo ranks both give the
unsharded model's loss and every gradient; the runtime is chosen once, in autoshard."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

from nxd_autoshard import autoshard
from nxd_autoshard.runtime.process_group import ProcessGroupRuntime
from nxd_autoshard.runtime.simulated import SimulatorRuntime
from nxd_autoshard.tools.launch import run_ranks

SRC = Path(__file__).resolve().parents[1] / "src" / "nxd_autoshard"


class Block(torch.nn.Module):
    def __init__(self, width: int = 16, hidden: int = 32):
        super().__init__()
        self.up = torch.nn.Linear(width, hidden)
        self.down = torch.nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class TinyMLP(torch.nn.Module):
    """Two residual MLP blocks: a column/row pair each under tp, one block per stage under pp."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def mse(output, target):
    return ((output - target) ** 2).mean()


def _model_and_batch():
    torch.manual_seed(0)
    return TinyMLP(), torch.randn(4, 16), torch.randn(4, 16)


def _reference(model, x, y):
    ref = copy.deepcopy(model)
    loss = mse(ref(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in ref.named_parameters()}


def _assert_matches(loss, grads, want_loss, want_grads):
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(want_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_simulator_tp2_matches_unsharded():
    model, x, y = _model_and_batch()
    want_loss, want_grads = _reference(model, x, y)
    sharded = autoshard(model, 2, example_inputs=(x,), loss_fn=mse)
    assert isinstance(sharded.runtime, SimulatorRuntime)
    assert sharded.local_shape("layers.0.up.weight") == (16, 16)  # column-parallel: half the rows
    assert sharded.full_shape("layers.0.up.weight") == (32, 16)
    loss = sharded.train_step(x, target=y)
    _assert_matches(loss, sharded.gather_grads(), want_loss, want_grads)
    torch.testing.assert_close(sharded.eval_step(x, target=y), want_loss, rtol=1e-5, atol=1e-6)


def test_simulator_pp2_matches_unsharded():
    model, x, y = _model_and_batch()
    want_loss, want_grads = _reference(model, x, y)
    sharded = autoshard(
        model, 1, pp=2, microbatches=2, schedule="gpipe", example_inputs=(x[:2],), loss_fn=mse
    )
    assert len(sharded.stages()) == 2
    loss = sharded.train_step(x, target=y)
    _assert_matches(loss, sharded.gather_grads(), want_loss, want_grads)


def _on_rank(rank: int, world: int, model, x, y) -> dict:
    out = {}
    sharded = autoshard(copy.deepcopy(model), 2, example_inputs=(x,), loss_fn=mse)
    out["runtime"] = type(sharded.runtime).__name__
    out["local_up"] = tuple(sharded.get_parameter("layers.0.up.weight").shape)
    out["tp_loss"] = sharded.train_step(x, target=y)
    out["tp_grads"] = sharded.gather_grads()
    out["tp_state"] = sharded.full_state_dict()
    with pytest.raises(RuntimeError) as err:
        sharded.simulate(x)
    out["simulate_error"] = str(err.value)
    piped = autoshard(
        copy.deepcopy(model),
        1,
        pp=2,
        microbatches=2,
        schedule="gpipe",
        example_inputs=(x[:2],),
        loss_fn=mse,
    )
    out["pp_loss"] = piped.train_step(x, target=y)
    out["pp_grads"] = piped.gather_grads()  # this rank's stage only
    with pytest.raises(RuntimeError) as err:
        piped(x)
    out["forward_error"] = str(err.value)
    return out


def test_gloo_tp2_and_pp2_match_unsharded():
    model, x, y = _model_and_batch()
    want_loss, want_grads = _reference(model, x, y)
    ranks = run_ranks(_on_rank, 2, args=(model, x, y), timeout_s=300)
    for rank, out in enumerate(ranks):
        assert out["runtime"] == ProcessGroupRuntime.__name__
        assert out["local_up"] == (16, 16)  # this rank's half of the 32 rows
        _assert_matches(out["tp_loss"], out["tp_grads"], want_loss, want_grads)
        for name, p in model.named_parameters():
            assert torch.equal(out["tp_state"][name], p.detach()), name
        assert "this module is one rank's" in out["simulate_error"]
        assert "train_step" in out["forward_error"]
        stage = {n: g for n, g in want_grads.items() if n.startswith(f"layers.{rank}.")}
        _assert_matches(out["pp_loss"], out["pp_grads"], want_loss, stage)


def test_runtime_is_chosen_once():
    # outside runtime/, only autoshard asks whether there is a process group
    branch = re.compile(r"\b(groups? is (not )?None|on_mesh|_groups\b)")
    offenders = [
        f"{path.relative_to(SRC)}:{i}: {line.strip()}"
        for path in sorted(SRC.rglob("*.py"))
        if path.parts[len(SRC.parts)] not in ("runtime", "rules") and path.name != "api.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if branch.search(line)
    ]
    assert not offenders, "\n".join(offenders)
