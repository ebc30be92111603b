"""save_checkpoint: the merged safetensors checkpoint equals the weights, and transformers loads it."""

import json

import pytest
import torch
from conftest import config_dict
from safetensors.torch import load_file

from nxd_autoshard import autoshard
from nxd_autoshard.tools.hf import build_model, random_batch
from nxd_autoshard.tools.launch import run_ranks


def _layers(family: str, n: int, **extra) -> dict:
    return config_dict(
        family, **{"n_layer" if family == "gpt2" else "num_hidden_layers": n}, **extra
    )


def _merged(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        part = load_file(f)
        assert not set(part) & set(out), "a tensor is written twice"
        out.update(part)
    return out


def _save_worker(rank, world, cfg, directory, steps):
    model = build_model(cfg, seed=0)
    args, kwargs = random_batch(model, batch=4, seed=1)
    sharded = autoshard(model, 2, pp=2, example_inputs=args, example_kwargs=kwargs)
    opt = sharded.optimizer(torch.optim.AdamW, lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        sharded.train_step(*args, **kwargs)
        opt.step()
    sharded.save_checkpoint(directory)
    return sharded.eval_step(*args, **kwargs).item()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tp2_pp2_checkpoint_merges_back_bit_for_bit(family, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _layers(family, 3)
    run_ranks(_save_worker, 4, args=(cfg, str(tmp_path), 0))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    model = build_model(cfg, seed=0)
    merged = _merged(tmp_path)
    state = model.state_dict()
    assert set(merged) == set(index["weight_map"]) <= set(state)
    assert all(torch.equal(merged[n], state[n]) for n in merged)
    # the only tensor not written is GPT-2's LM head, tied to (and loaded from) wte, as HF saves it
    assert set(state) - set(merged) <= {"lm_head.weight"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    args, kwargs = random_batch(model, batch=2, seed=3)
    assert torch.equal(loaded(*args, **kwargs).logits, model.eval()(*args, **kwargs).logits)


def test_trained_checkpoint_has_the_trained_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _layers("llama", 3)
    losses = run_ranks(_save_worker, 4, args=(cfg, str(tmp_path), 2))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    args, kwargs = random_batch(loaded, batch=4, seed=1)
    with torch.no_grad():
        assert abs(loaded(*args, **kwargs).loss.item() - losses[0]) < 1e-5
    assert losses[0] < build_model(cfg, seed=0)(*args, **kwargs).loss.item()  # it trained


def test_padded_vocab_is_saved_unpadded_in_simulation(tmp_path):
    cfg = config_dict("llama", vocab_size=127)
    model = build_model(cfg, seed=0)
    args, kwargs = random_batch(model, batch=2, seed=1)
    sharded = autoshard(model, 2, example_inputs=args, example_kwargs=kwargs)
    assert sharded.padded  # the vocab really is padded to 128
    sharded.save_checkpoint(tmp_path)
    merged = load_file(tmp_path / "model.safetensors")
    assert merged["model.embed_tokens.weight"].shape == (127, 64)
    assert all(torch.equal(merged[n], t) for n, t in model.state_dict().items() if n in merged)
    assert (tmp_path / "config.json").exists()
