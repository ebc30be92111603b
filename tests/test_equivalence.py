"""Loss, outputs and every gradient of sharded models equal the unsharded model's."""

import pytest

from conftest import CONFIGS, FAMILIES, config_dict, wide_heads
from nxd_autoshard.verify import verify_config


def _assert_all_ok(checks):
    bad = [c.line() for c in checks if not c.ok]
    assert not bad, "\n".join(bad)
    assert any(c.name.startswith("grad") for c in checks)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp", [2, 4])
def test_simulator_matches_unsharded(family, tp):
    _assert_all_ok(verify_config(CONFIGS / f"{family}.json", tp, world="sim"))


@pytest.mark.parametrize("family", FAMILIES)
def test_simulator_tp8(family):
    _assert_all_ok(verify_config(wide_heads(family), 8, world="sim"))


@pytest.mark.parametrize("family", FAMILIES)
def test_gloo_tp2_matches_unsharded(family):
    _assert_all_ok(verify_config(CONFIGS / f"{family}.json", 2, world="gloo"))


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_gloo_tp4_matches_unsharded(family):
    _assert_all_ok(verify_config(CONFIGS / f"{family}.json", 4, world="gloo"))


def test_gqa_fewer_kv_heads_than_tp_replicates_kv():
    cfg = config_dict("llama", num_attention_heads=8, num_key_value_heads=2)
    _assert_all_ok(verify_config(cfg, 8, world="sim"))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "bert"])
def test_family_plan_file_matches_unsharded(family):
    _assert_all_ok(verify_config(CONFIGS / f"{family}.json", 2, world="sim", plan=family))
