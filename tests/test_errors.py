"""Bad input gets a clear error naming the problem and the fix."""

import pytest
import torch
from conftest import CONFIGS

from nxd_autoshard import CaptureError, DivisibilityError, PlanError, autoshard
from nxd_autoshard.tools.hf import build_model, random_batch


@pytest.fixture(scope="module")
def llama():
    return build_model(CONFIGS / "llama.json")


def test_tp_not_dividing_heads_lists_working_values(llama):
    args, kwargs = random_batch(llama)
    with pytest.raises(DivisibilityError, match=r"tp=8.*1, 2, 4"):
        autoshard(llama, 8, example_inputs=args, example_kwargs=kwargs)


def test_pattern_matching_nothing_lists_near_misses(llama):
    args, _ = random_batch(llama)
    with pytest.raises(PlanError, match=r"matches no module.*model\.layers\.0\.self_attn\.q_proj"):
        autoshard(llama, 2, example_inputs=args, plan={"model.layers.*.self_atn.q_proj": "column"})


def test_unknown_style(llama):
    args, _ = random_batch(llama)
    with pytest.raises(PlanError, match="unknown style 'colum'"):
        autoshard(llama, 2, example_inputs=args, plan={"lm_head": "colum"})


def test_unknown_family_plan(llama):
    args, _ = random_batch(llama)
    with pytest.raises(PlanError, match="shipped plans"):
        autoshard(llama, 2, example_inputs=args, plan="falcon")


def test_user_rule_overrides_auto(llama):
    args, kwargs = random_batch(llama)
    sharded = autoshard(
        llama,
        2,
        example_inputs=args,
        example_kwargs=kwargs,
        plan={"model.layers.*.mlp.(gate|up|down)_proj": "replicate"},
    )
    assert str(sharded.placements["model.layers.0.mlp.up_proj.weight"]) == "R"
    assert str(sharded.placements["model.layers.0.self_attn.q_proj.weight"]) == "S(0)"


class Untraceable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.inner(x))


class Gate(torch.nn.Module):
    def forward(self, x):
        if x.sum().item() > 0:  # data-dependent control flow
            return x
        return -x


def test_untraceable_model_names_the_module():
    with pytest.raises(CaptureError, match="module 'gate'"):
        autoshard(Untraceable(), 2, example_inputs=(torch.randn(2, 4),))


def test_bad_arguments(llama):
    args, _ = random_batch(llama)
    with pytest.raises(ValueError, match="tp must be a positive integer"):
        autoshard(llama, 0, example_inputs=args)
    with pytest.raises(ValueError, match="pp must be a positive integer"):
        autoshard(llama, 2, pp=0, example_inputs=args)


def test_unsupported_op_is_gathered_with_a_warning():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(8, 16)
            self.down = torch.nn.Linear(16, 8)

        def forward(self, x):
            h = self.up(x)
            h = torch.flip(h, dims=[-1])  # no rule: must be gathered, never guessed
            return self.down(h)

    torch.manual_seed(0)
    model = Odd()
    x = torch.randn(3, 8)
    with pytest.warns(UserWarning, match="no sharding rule.*flip"):
        sharded = autoshard(
            model, 2, example_inputs=(x,), plan={"up": "column", "down": "row"}, auto=False
        )
    torch.testing.assert_close(sharded(x), model(x))


def test_embedding_width_not_divisible_is_replicated_with_warning():
    """Only a vocab dim is padded; a 'column' embedding whose width tp does not divide is replicated."""

    class Bag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(16, 6)

        def forward(self, ids):
            return self.emb(ids).sum(-1)

    torch.manual_seed(0)
    model = Bag()
    ids = torch.randint(0, 16, (2, 5))
    with pytest.warns(UserWarning, match="'emb.weight' has 6 columns.*tp=4.*vocab_parallel"):
        sharded = autoshard(model, 4, example_inputs=(ids,), plan={"emb": "column"}, auto=False)
    assert str(sharded.placements["emb.weight"]) == "R"
    torch.testing.assert_close(sharded(ids), model(ids))
