"""Sequence parallelism (Megatron-SP): norms, dropout and residual adds on Shard(seq), a
reduce-scatter leaving each row-parallel output and an all-gather entering each column-parallel
input; loss and every gradient equal the unsharded model's (issue 11, part 1)."""

import copy
import json
from collections import Counter

import pytest
import torch
from conftest import CONFIGS, config_dict
from test_equivalence import UNSEEN

from nxd_autoshard import autoshard
from nxd_autoshard.ir import ops
from nxd_autoshard.ir.printer import target_name
from nxd_autoshard.ir.program import module_path
from nxd_autoshard.runtime.simulator import trace_collectives
from nxd_autoshard.tools.cli import main
from nxd_autoshard.tools.hf import build_model, random_batch
from nxd_autoshard.tools.verify import verify_config

BART = dict(
    model_type="bart",
    vocab_size=128,
    d_model=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    max_position_embeddings=64,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
)
CASES = {
    "llama": config_dict("llama"),
    "gpt2 (tied, vocab 127 padded)": config_dict("gpt2", vocab_size=127),
    "falcon (parallel attn + MLP)": UNSEEN["falcon"],
    "llama GQA (2 kv heads < tp 4)": config_dict("llama", num_key_value_heads=2),
    "t5 (encoder-decoder)": UNSEEN["t5"],
    "bart (encoder-decoder)": BART,
}
TPS = {
    "llama": (2, 4),
    "gpt2 (tied, vocab 127 padded)": (2, 4),
    "llama GQA (2 kv heads < tp 4)": (4,),
}


def _assert_all_ok(checks):
    bad = [c.line() for c in checks if not c.ok]
    assert not bad, "\n".join(bad)
    assert any(c.name.startswith("grad") for c in checks)
    assert all("(missing)" not in c.name for c in checks)


def _sharded(cfg, tp, seq=16, **options):
    model = build_model(cfg).train()
    args, kwargs = random_batch(model, seq=seq)
    sharded = autoshard(
        model, tp, sequence_parallel=True, example_inputs=args, example_kwargs=kwargs, **options
    )
    return model, sharded, args, kwargs


@pytest.mark.parametrize("name,tp", [(name, tp) for name in CASES for tp in TPS.get(name, (2,))])
def test_simulator_matches_unsharded(name, tp):
    _assert_all_ok(verify_config(CASES[name], tp, world="sim", sequence_parallel=True))
    # and it is sequence parallel: the blocks reduce-scatter, never all-reduce, an activation
    _, sharded, _, _ = _sharded(CASES[name], tp)
    report = sharded.explain()
    assert report.sequence_parallel and report.sequence_ops > 0
    for block in report.blocks:
        assert block.forward.get("reduce_scatter", 0) >= 1, (block.name, block.forward)
        assert "all_reduce" not in block.forward, (block.name, block.forward)
    assert "sequence parallel: " in report.to_text()


def test_every_block_at_the_sequence_parallel_optimum_with_tp_bytes():
    """Per block 2 all-gathers + 2 reduce-scatters forward and their conjugates backward (plus
    the 2 norm weights' gradient all-reduces), ring bytes equal to TP's 2 + 2 all-reduces."""
    cfg = config_dict("llama")
    model, sharded, args, kwargs = _sharded(cfg, 2)
    report = sharded.explain()
    for block in report.blocks:
        assert block.forward == {"all_gather": 2, "reduce_scatter": 2}
        assert block.backward == {"all_gather": 2, "reduce_scatter": 2, "all_reduce": 2}
        assert block.extra == 0
    # the report's collectives are the simulator's, kind by kind and byte by byte
    with trace_collectives() as log:
        sharded(*args, **kwargs).loss.backward()
    traced = Counter((k, phase, b) for k, phase, _, b in log)
    reported = Counter((e.kind, e.phase, e.bytes) for e in report.events())
    assert traced == reported

    def ring(rows, tp=2):  # bytes a ring algorithm sends per rank
        total = 0.0
        for row in rows:
            for e in row.forward + row.backward:
                if row.of_parameter:
                    continue  # a norm weight's [64] gradient: not an activation
                if e.kind == "all_reduce":
                    total += 2 * (tp - 1) / tp * e.bytes
                elif e.kind == "all_gather":
                    total += (tp - 1) * e.bytes
                elif e.kind == "reduce_scatter":
                    total += (tp - 1) / tp * e.bytes
        return total

    plain = autoshard(model, 2, example_inputs=args, example_kwargs=kwargs).explain()
    block = report.blocks[0].name
    sp_rows = [c for c in report.collectives if c.block == block]
    tp_rows = [c for c in plain.collectives if c.block == block]
    assert ring(sp_rows) == ring(tp_rows) > 0
    # the gathers entering column-parallel regions reduce-scatter their gradient
    gm = sharded.graph_module
    assert sum(n.target is ops.all_gather_rs for n in gm.graph.nodes) == 2 * len(report.blocks) + 1


def test_activations_saved_for_backward_shrink():
    """What autograd keeps for backward, summed over the simulated ranks, is smaller with SP."""
    cfg = config_dict("llama")
    model = build_model(cfg).train()
    args, kwargs = random_batch(model, seq=32)

    def saved(**options):
        sharded = autoshard(model, 2, example_inputs=args, example_kwargs=kwargs, **options)
        total = [0]

        def pack(t):
            if t.dim() >= 3:  # activations (weights are 1-D or 2-D)
                total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            sharded(*args, **kwargs)
        return total[0]

    assert saved(sequence_parallel=True) < saved()


def test_training_dropout_draws_the_unsharded_masks():
    """Dropout on a sequence shard takes its part of the whole value's mask: with the same seed
    GPT-2's embedding and residual dropout match the unsharded model exactly (no mask repeated
    per shard)."""
    model = build_model(config_dict("gpt2", attn_pdrop=0.0, resid_pdrop=0.3, embd_pdrop=0.3))
    model.train()
    args, kwargs = random_batch(model, seq=16)
    ref = copy.deepcopy(model)
    torch.manual_seed(5)
    ref_loss = ref(*args, **kwargs).loss
    ref_loss.backward()
    sharded = autoshard(
        model, 2, sequence_parallel=True, example_inputs=args, example_kwargs=kwargs
    )
    dropouts = [n for n in sharded.graph_module.graph.nodes if n.target is ops.sequence_dropout]
    assert len(dropouts) == 5  # embedding + 2 per block
    torch.manual_seed(5)
    loss = sharded(*args, **kwargs).loss
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    grads = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "features",
    [
        {"pp": 2},
        {"activation_checkpointing": "full"},
        {"precision": "bf16"},
        {"pp": 2, "activation_checkpointing": "selective", "precision": "bf16"},
    ],
)
def test_with_pipeline_checkpointing_and_bf16(features):
    cfg = config_dict("llama", num_hidden_layers=2)
    _assert_all_ok(verify_config(cfg, 2, world="sim", sequence_parallel=True, **features))


def test_checkpointing_recomputes_no_collective():
    """Full checkpointing with SP: regions are cut at the reduce-scatters and all-gathers, so
    backward issues exactly the collectives it issues without checkpointing."""
    cfg = config_dict("llama")

    def backward(mode):
        _, sharded, args, kwargs = _sharded(cfg, 2, activation_checkpointing=mode)
        with trace_collectives() as log:
            out = sharded(*args, **kwargs)
            forward = len(log)
            out.loss.backward()
        return log[forward:]

    plain, full = backward(None), backward("full")
    assert full == plain
    assert all(phase == "backward" for _, phase, _, _ in full)
    kinds = Counter(kind for kind, _, _, _ in full)
    assert kinds["all_gather"] == 5 and kinds["reduce_scatter"] == 5  # 4 in blocks + head/embed


@pytest.mark.parametrize(
    "family,tp,seq,pp",
    [
        ("llama", 2, 7, 1),
        ("llama", 4, 9, 1),
        ("gpt2", 2, 9, 1),
        ("gpt2", 4, 7, 1),
        ("llama", 2, 7, 2),
    ],
)
def test_sequence_length_tp_does_not_divide_is_padded(family, tp, seq, pp):
    """The shards hold the sequence padded to a multiple of tp (copies of the last row, sliced
    off at every gather): loss and every gradient are the unsharded model's."""
    cfg = config_dict(family)
    _assert_all_ok(verify_config(cfg, tp, pp=pp, world="sim", seq=seq, sequence_parallel=True))
    _, sharded, _, _ = _sharded(cfg, tp, seq=seq)
    targets = Counter(n.target for n in sharded.graph_module.graph.nodes)
    assert targets[ops.pad_sequence] > 0 and targets[ops.unpad_sequence] > 0
    assert targets[ops.reduce_scatter] > 0  # and it is still sequence parallel


def test_lengths_tp_does_not_divide_get_the_padded_program():
    """Captured (dynamic) at 16, the program splits equally, as Megatron-SP; the first call at a
    length tp 4 does not divide captures the padded program, which serves every such length."""
    model = build_model(config_dict("llama")).train()
    args, kwargs = random_batch(model, seq=16)  # captured with a dynamic sequence at 16
    sharded = autoshard(
        copy.deepcopy(model), 4, sequence_parallel=True, example_inputs=args, example_kwargs=kwargs
    )
    for seq in (10, 7, 13, 12):
        args, kwargs = random_batch(model, seq=seq)
        model.zero_grad()
        sharded.zero_grad()
        want = model(*args, **kwargs).loss
        want.backward()
        got = sharded(*args, **kwargs).loss
        got.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        grads = dict(sharded.named_parameters())
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    padded = [
        any(n.target is ops.pad_sequence for n in program.gm.graph.nodes)
        for program in sharded.programs()
    ]
    assert padded == [False, True]


def test_padded_dropout_draws_the_unsharded_masks():
    model = build_model(config_dict("gpt2", attn_pdrop=0.0, resid_pdrop=0.3, embd_pdrop=0.3))
    model.train()
    args, kwargs = random_batch(model, seq=7)
    ref = copy.deepcopy(model)
    torch.manual_seed(5)
    ref(*args, **kwargs).loss.backward()
    sharded = autoshard(
        model, 4, sequence_parallel=True, example_inputs=args, example_kwargs=kwargs
    )
    torch.manual_seed(5)
    sharded(*args, **kwargs).loss.backward()
    grads = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_gloo_padded_sequence():
    _assert_all_ok(verify_config(config_dict("llama"), 2, seq=7, sequence_parallel=True))


@pytest.mark.parametrize(
    "family,flags",
    [("gpt2", []), ("llama", ["--pp", "2", "--precision", "bf16"])],
)
def test_gloo_tp2_verify_cli(family, flags, capsys):
    config = str(CONFIGS / f"{family}.json")
    rc = main(["verify", "--config", config, "--tp", "2", "--sequence-parallel", *flags])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert " 0 failed" in out and "grad " in out and "MISMATCH" not in out


def test_plan_cli_sequence_parallel(tmp_path):
    out = tmp_path / "plan.json"
    rc = main(
        [
            "plan",
            "--config",
            str(CONFIGS / "llama.json"),
            "--tp",
            "2",
            "--sequence-parallel",
            "--seq",
            "32",
            "--format",
            "json",
            "-o",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["sequence_parallel"] and data["sequence_ops"] > 0
    assert "model.layers.*.input_layernorm" in data["sequence_regions"]
    assert data["totals"]["extra_over_optimum"] == 0


def _compiled_rank(rank, world):
    from torch._dynamo.utils import counters

    model = build_model(
        config_dict("gpt2", n_layer=1, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    )
    model.train()
    args, kwargs = random_batch(model, seq=16)
    out = {}
    for compile in (None, "aot_eager"):
        sharded = autoshard(
            copy.deepcopy(model),
            2,
            example_inputs=args,
            example_kwargs=kwargs,
            sequence_parallel=True,
            compile=compile,
        )
        loss = sharded.train_step(*args, **kwargs)
        out[compile] = (loss, {n: p.grad for n, p in sharded.named_parameters()})
    return out, sum(counters["graph_break"].values())


def test_compiles_in_one_graph_on_gloo():
    from nxd_autoshard.tools.launch import run_ranks

    for out, breaks in run_ranks(_compiled_rank, 2, timeout_s=300):
        assert breaks == 0
        (loss, grads), (loss_c, grads_c) = out[None], out["aot_eager"]
        torch.testing.assert_close(loss_c, loss)
        for name, grad in grads.items():
            torch.testing.assert_close(grads_c[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_program_matches_golden(family, assert_golden):
    model = build_model(config_dict(family))
    args, kwargs = random_batch(model)
    sharded = autoshard(
        model, 2, sequence_parallel=True, example_inputs=args, example_kwargs=kwargs
    )
    text = assert_golden(sharded, f"{family}_tp2_sp")
    assert "reduce_scatter[tp](" in text and "all_gather_rs[tp](" in text


class _MixingLM(torch.nn.Module):
    """Blocks whose residual stream also mixes positions (adds its mean over the sequence)
    between the row-parallel output and the next column-parallel input: padding rows there
    would enter that mean, so it must read the gathered, unpadded sequence."""

    def __init__(self, vocab=64, hidden=32, layers=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(hidden) for _ in range(layers))
        self.up = torch.nn.ModuleList(torch.nn.Linear(hidden, 4 * hidden) for _ in range(layers))
        self.down = torch.nn.ModuleList(torch.nn.Linear(4 * hidden, hidden) for _ in range(layers))
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for norm, up, down in zip(self.norms, self.up, self.down):
            h = h + down(torch.nn.functional.gelu(up(norm(h))))
            h = h + 0.5 * h.mean(dim=1, keepdim=True)
        logits = self.head(h)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


@pytest.mark.parametrize("tp,seq", [(2, 7), (4, 9)])
def test_padding_never_enters_a_reduction_over_the_sequence(tp, seq):
    torch.manual_seed(0)
    model = _MixingLM()
    ids = torch.randint(0, 64, (2, seq))
    ref = copy.deepcopy(model)
    want = ref(ids)
    want.backward()
    sharded = autoshard(model, tp, sequence_parallel=True, example_inputs=(ids,))
    nodes = list(sharded.graph_module.graph.nodes)
    assert any(n.target is ops.pad_sequence for n in nodes)  # it is sequence parallel, padded
    got = sharded(ids)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    grads = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


class _LastTokensLM(torch.nn.Module):
    """A block, a norm, then the hidden states of the last tokens only (a slice of the sequence
    dim, as HF's logits_to_keep) into a column-parallel LM head."""

    def __init__(self, vocab=32, width=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.up = torch.nn.Linear(width, 2 * width)
        self.down = torch.nn.Linear(2 * width, width)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, ids, labels):
        x = self.embed(ids)
        x = self.norm(x + self.down(torch.nn.functional.gelu(self.up(x))))
        logits = self.head(x[:, 3:].transpose(0, 1))  # a slice of the sequence, then a view
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels[:, 3:].transpose(0, 1).flatten()
        )


@pytest.mark.parametrize("tp", [2, 4])
def test_gather_into_a_column_through_slices_reduce_scatters_its_gradient(tp):
    # all_gather -> slice (of the gathered sequence dim) -> transpose -> column linear: the
    # gradient all-reduce before the column fuses into the gather (all_gather_rs), whose
    # backward reduce-scatters the zero-filled gradient instead of all-reducing it
    torch.manual_seed(0)
    model = _LastTokensLM()
    ids, labels = torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8))
    ref = copy.deepcopy(model)
    want = ref(ids, labels)
    want.backward()
    plan = {"embed": "vocab_parallel", "up": "column", "down": "row", "head": "column"}
    sharded = autoshard(
        model, tp, example_inputs=(ids, labels), plan=plan, auto=False, sequence_parallel=True
    )
    head = next(n for n in sharded.graph_module.graph.nodes if module_path(n) == "head")
    chain = [head.args[0]]
    while chain[-1].target not in (ops.all_gather, ops.all_gather_rs):
        chain.append(chain[-1].args[0])
    assert chain[-1].target is ops.all_gather_rs, [n.target for n in chain]
    assert [target_name(n.target) for n in chain[:-1]] == ["aten.transpose", "aten.slice"]
    with trace_collectives() as log:
        loss = sharded(ids, labels)
        loss.backward()
    backward = Counter(k for k, phase, shape, _ in log if phase == "backward" and len(shape) == 3)
    # up's input gradient (the embedding's value is all-reduced for up, reduce-scattered for
    # the residual), the two reduce-scatters' all-gathers, and the head's reduce-scatter: no
    # second all-reduce of an activation's gradient
    assert backward == {"all_reduce": 1, "all_gather": 2, "reduce_scatter": 1}
    torch.testing.assert_close(loss.detach(), want.detach())
    grads = sharded.gather_grads()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
