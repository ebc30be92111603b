"""Golden graphs: every family's rewritten program is pinned; the text is stable and fails loudly."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import CONFIGS, FAMILIES
from sharded_cache import sharded_family

from nxd_autoshard import autoshard
from nxd_autoshard.inspect.golden import GoldenMismatch, assert_golden, golden_text
from nxd_autoshard.tools.hf import build_model, random_batch

GOLDENS = Path(__file__).parent / "goldens"
ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("family", FAMILIES)
def test_family_program_matches_golden(family, assert_golden):
    _, sharded, _, _ = sharded_family(family, 2)
    assert_golden(sharded, f"{family}_tp2")


def test_llama_tp8_matches_golden(assert_golden):
    _, sharded, _, _ = sharded_family("llama", 8)
    assert_golden(sharded, "llama_tp8")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pipeline_stages_match_golden(family, assert_golden):
    # tp 2 x pp 2 over 3 layers: each stage's program, what it receives and sends, is pinned
    from conftest import config_dict

    config = config_dict(family, **{"n_layer" if family == "gpt2" else "num_hidden_layers": 3})
    model = build_model(config)
    args, kwargs = random_batch(model, batch=4)
    sharded = autoshard(model, 2, pp=2, example_inputs=args, example_kwargs=kwargs)
    text = assert_golden(sharded, f"{family}_tp2_pp2")
    assert "| stage 0 of 2" in text and "| stage 1 of 2" in text and "# receives: " in text


def test_golden_text_names_what_it_pins():
    text = golden_text(sharded_family("llama", 2)[1])
    assert "model.layers.0.self_attn.q_proj.weight: S(0) [32, 64] f32 (parameter)" in text
    assert "all_reduce[tp](" in text and "grad_all_reduce[tp](" in text
    assert "input_ids: R [s0, s1] i64 (input)" in text
    # nothing that changes run to run or across torch versions
    for unstable in ("0x", ".default", ".Tensor(", "cpu", "meta", "p_model_", "sym_size_int"):
        assert unstable not in text, unstable


_SEPARATE = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from conftest import CONFIGS
    from nxd_autoshard import autoshard
    from nxd_autoshard.inspect.golden import golden_text
    from nxd_autoshard.tools.hf import build_model, random_batch
    model = build_model(CONFIGS / "llama.json")
    args, kwargs = random_batch(model)
    sys.stdout.write(golden_text(autoshard(model, 2, example_inputs=args, example_kwargs=kwargs)))
""")


def test_golden_is_the_same_in_a_separate_process():
    code = _SEPARATE.format(tests=str(Path(__file__).parent))
    env = {"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    ).stdout
    assert out == golden_text(sharded_family("llama", 2)[1])
    assert out == (GOLDENS / "llama_tp2.txt").read_text()


def test_changed_plan_fails_with_a_readable_diff():
    model = build_model(CONFIGS / "llama.json")
    args, kwargs = random_batch(model)
    mlp_replicated = {"model.layers.*.mlp.(gate|up|down)_proj": "replicate"}
    changed = autoshard(model, 2, example_inputs=args, example_kwargs=kwargs, plan=mlp_replicated)
    with pytest.raises(GoldenMismatch) as err:
        assert_golden(changed, GOLDENS / "llama_tp2.txt")
    message = str(err.value)
    assert "--- llama_tp2.txt (golden)" in message and "+++ llama_tp2.txt (now)" in message
    assert "-  model.layers.0.mlp.up_proj.weight: S(0) [64, 64] f32 (parameter)" in message
    assert "+  model.layers.0.mlp.up_proj.weight: R [128, 64] f32 (parameter)" in message
    assert "--update-goldens" in message


_PLUGIN_TEST = textwrap.dedent("""
    import torch
    from nxd_autoshard import autoshard


    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(8, 16)
            self.down = torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))


    def shard(plan):
        return autoshard(MLP(), 2, example_inputs=(torch.randn(3, 8),), plan=plan, auto=False)


    def test_megatron(assert_golden):
        assert_golden(shard({"up": "column", "down": "row"}), "mlp")
""")
_CHANGED = textwrap.dedent("""

    def test_replicated(assert_golden):
        assert_golden(shard({"up": "replicate", "down": "replicate"}), "mlp")


    def test_never_pinned(assert_golden):
        assert_golden(shard({"up": "column", "down": "row"}), "never_pinned")
""")


def _pytest(
    folder: Path, *extra: str, env_update: dict | None = None
) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", **(env_update or {})}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            "-W",
            "ignore::DeprecationWarning",
            *extra,
            str(folder),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=folder,
        timeout=300,
        check=False,
    )


def test_pytest_plugin_writes_only_when_asked_and_shows_the_diff(tmp_path):
    """The installed pytest11 plugin end to end: env var, plain run, --update-goldens."""
    test_file = tmp_path / "test_user.py"
    golden = tmp_path / "goldens" / "mlp.txt"
    test_file.write_text(_PLUGIN_TEST)
    first = _pytest(tmp_path, env_update={"NXD_UPDATE_GOLDENS": "1"})
    assert first.returncode == 0, first.stdout + first.stderr
    assert "golden" in first.stdout and "created" in first.stdout  # the write is reported
    pinned = golden.read_text()
    assert "all_reduce[tp](" in pinned and "up.weight: S(0) [8, 8] f32" in pinned

    test_file.write_text(_PLUGIN_TEST + _CHANGED)
    second = _pytest(tmp_path)
    assert second.returncode == 1
    assert "2 failed, 1 passed" in second.stdout
    assert "-  up.weight: S(0) [8, 8] f32 (parameter)" in second.stdout
    assert "+  up.weight: R [16, 8] f32 (parameter)" in second.stdout
    assert "never_pinned.txt does not exist" in second.stdout
    assert golden.read_text() == pinned, "a failing run must not touch the golden"
    assert not (tmp_path / "goldens" / "never_pinned.txt").exists()

    third = _pytest(tmp_path, "-v", "--update-goldens", "-k", "replicated")
    assert third.returncode == 0, third.stdout + third.stderr
    assert "WILL BE REWRITTEN" in third.stdout and "rewritten" in third.stdout
    assert golden.read_text() != pinned and "all_reduce" not in golden.read_text()
