"""`make demo`: autoshard a small HF Llama on a local gloo mesh (tp, then tp x pp), check it against
the original, train a few steps, print the plan and the pipeline stages."""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, LlamaConfig

from nxd_autoshard import autoshard
from nxd_autoshard.tools.launch import run_ranks
from nxd_autoshard.tools.verify import compare

TP = 2
CONFIG = LlamaConfig(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
STEPS = 3


def build():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIG).eval()


def batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG.vocab_size, (4, 32), generator=gen)
    return ids, torch.randint(0, CONFIG.vocab_size, (4, 32), generator=gen)


def rank_main(rank, world):
    """What each torchrun rank would run: one line to shard, then ordinary training code."""
    model = build()
    ids, labels = batch()
    sharded = autoshard(model, tp=world, example_inputs=(ids,), example_kwargs={"labels": labels})
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-3)
    losses, first_grads = [], None
    for step in range(STEPS):
        opt.zero_grad()
        loss = sharded(ids, labels=labels).loss
        loss.backward()
        if step == 0:
            first_grads = sharded.gather_grads()
        opt.step()
        losses.append(loss.item())
    local = {n: tuple(p.shape) for n, p in sharded.named_parameters()}
    return dict(
        losses=losses,
        grads=first_grads if rank == 0 else None,
        local=local,
        placements={n: str(p) for n, p in sharded.placements.items()},
        program=sharded.graph_module.code,
    )


def main():
    console = Console()
    console.print(
        f"[bold]nxd-autoshard demo[/]: Llama ({CONFIG.num_hidden_layers} layers, "
        f"hidden {CONFIG.hidden_size}) at tp={TP} on a local gloo mesh"
    )
    results = run_ranks(rank_main, TP)
    ref = build()
    ids, labels = batch()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    ref_losses, ref_grads = [], None
    for step in range(STEPS):
        opt.zero_grad()
        loss = ref(ids, labels=labels).loss
        loss.backward()
        if step == 0:
            ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        opt.step()
        ref_losses.append(loss.item())

    table = Table(title=f"Plan (tp={TP}): placement and local shape per parameter (layer 0 shown)")
    for col in ("parameter", "placement", "local shape"):
        table.add_column(col)
    for name, placement in results[0]["placements"].items():
        if ".layers." in name and ".layers.0." not in name:
            continue
        table.add_row(name, placement, str(results[0]["local"][name]))
    console.print(table)

    checks = [compare(f"grad {n}", results[0]["grads"][n], g) for n, g in ref_grads.items()]
    checks += [
        compare(f"loss step {i}", torch.tensor(a), torch.tensor(b))
        for i, (a, b) in enumerate(zip(results[0]["losses"], ref_losses))
    ]
    same_program = all(r["program"] == results[0]["program"] for r in results)
    bad = [c for c in checks if not c.ok]
    console.print(f"losses sharded   {['%.6f' % x for x in results[0]['losses']]}")
    console.print(f"losses unsharded {['%.6f' % x for x in ref_losses]}")
    console.print(
        f"gradient checks: {len(checks) - len(bad)} ok, {len(bad)} mismatched "
        f"(worst rel {max(c.max_rel for c in checks):.1e}); "
        f"every rank runs the same program: {same_program}"
    )
    collectives = [
        line.strip() for line in results[0]["program"].splitlines() if "collectives" in line
    ]
    console.print(
        f"collectives in the forward program: {len(collectives)} (all_reduce: "
        f"{sum('all_reduce(' in c and 'grad_' not in c for c in collectives)}, grad_all_reduce: "
        f"{sum('grad_all_reduce' in c for c in collectives)})"
    )
    if bad or not same_program:
        for c in bad:
            console.print(c.line())
        raise SystemExit(1)
    console.print("[green]sharded model verified against the original[/]")
    pipeline_demo(console, ref_losses, ref_grads)


PP_TP, PP = 2, 2


def pipeline_rank_main(rank, world):
    """tp x pp: the same one line with pp=; a step is sharded.train_step (torch pipelining 1F1B)."""
    model = build()
    ids, labels = batch()
    sharded = autoshard(
        model,
        tp=PP_TP,
        pp=PP,
        microbatches=2,
        example_inputs=(ids,),
        example_kwargs={"labels": labels},
    )
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-3)
    losses, first_grads = [], None
    for step in range(STEPS):
        opt.zero_grad()
        losses.append(sharded.train_step(ids, labels=labels).item())
        if step == 0:
            first_grads = sharded.gather_grads()
        opt.step()
    stages = [
        (
            s.index,
            s.blocks,
            len(s.state_names),
            len(s.inputs),
            sum(
                c.flops for c, st in zip(sharded.unit_costs, sharded.stage_of_unit) if st == s.index
            ),
        )
        for s in sharded.stages()
    ]
    return dict(
        losses=losses,
        grads=first_grads if rank % PP_TP == 0 else None,
        stages=stages,
        stage_of_block=sharded.stage_of_block,
    )


def pipeline_demo(console, ref_losses, ref_grads):
    console.print(
        f"\n[bold]tp={PP_TP} x pp={PP}[/] on {PP_TP * PP} gloo processes, 2 microbatches, 1F1B"
    )
    results = run_ranks(pipeline_rank_main, PP_TP * PP)
    first = results[0]
    table = Table(
        title="Pipeline stages (balanced by forward FLOPs; embedding and LM head counted)"
    )
    for col in ("stage", "blocks", "state tensors", "tensors received", "MFLOP"):
        table.add_column(col)
    for index, blocks, n_state, n_in, flops in first["stages"]:
        table.add_row(str(index), ", ".join(blocks), str(n_state), str(n_in), f"{flops / 1e6:.1f}")
    console.print(table)
    grads = {}
    for r in results:
        grads.update(r["grads"] or {})
    checks = [compare(f"grad {n}", grads[n], g) for n, g in ref_grads.items() if n in grads]
    checks += [
        compare(f"loss step {i}", torch.tensor(a), torch.tensor(b))
        for i, (a, b) in enumerate(zip(first["losses"], ref_losses))
    ]
    missing = [n for n in ref_grads if n not in grads]
    bad = [c for c in checks if not c.ok]
    console.print(f"losses tp x pp   {['%.6f' % x for x in first['losses']]}")
    console.print(
        f"gradient checks: {len(checks) - len(bad)} ok, {len(bad)} mismatched, "
        f"{len(missing)} missing"
    )
    if bad or missing:
        for c in bad:
            console.print(c.line())
        raise SystemExit(1)
    console.print("[green]tp x pp model verified against the original[/]")


if __name__ == "__main__":
    main()
