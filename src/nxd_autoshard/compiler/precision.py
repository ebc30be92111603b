"""Mixed precision (`autoshard(..., precision="bf16")`): fp32 master weights, bf16 compute.

The model is captured as its bf16 copy would run (`model.to(bfloat16)`: the model's own
upcasts, such as RMSNorm's variance or the loss's `logits.float()`, stay in the program), and
this pass makes the program read the fp32 master weights: each floating state input is cast
to bf16 just before its first use. The cast's backward turns the bf16 gradient into fp32, so
`.grad` of every parameter is fp32 and accumulates in fp32 over microbatches and stages (NxD's
use_master_weights + use_fp32_grad_acc); the optimizer steps the fp32 weights themselves.
The cast sits with its first user (same module), so a recomputed region recasts its weights
instead of keeping a bf16 copy alive.
"""

from __future__ import annotations

import torch
import torch.fx

from nxd_autoshard.ir.meta import placement_of, set_placement

__all__ = ["DTYPES", "cast_state"]

# precision name -> compute dtype (fp16 would need loss scaling, which is not here)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cast_state(gm: torch.fx.GraphModule, n_state: int, dtype: torch.dtype) -> torch.fx.GraphModule:
    """Make the first `n_state` placeholders (weights, buffers) fp32 inputs cast to `dtype` at use."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"][:n_state]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for ph in placeholders:
        val = ph.meta.get("val")
        if not isinstance(val, torch.Tensor) or not val.is_floating_point() or not ph.users:
            continue
        first = min(ph.users, key=order.__getitem__)
        with gm.graph.inserting_before(first):
            cast = gm.graph.call_function(torch.ops.aten._to_copy.default, (ph,), {"dtype": dtype})
        ph.replace_all_uses_with(cast, delete_user_cb=lambda user: user is not cast)
        cast.meta.update(
            {k: v for k, v in first.meta.items() if k in ("nn_module_stack", "stack_trace")}
        )
        cast.meta["val"] = val
        set_placement(cast, placement_of(ph))
        ph.meta["val"] = val.to(torch.float32)  # the fp32 master's metadata (fake stays fake)
    gm.graph.lint()
    gm.recompile()
    return gm
