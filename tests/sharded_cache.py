"""One sharded model per (family, tp) for the inspection tests (captured once per process)."""

import functools
import warnings

from conftest import CONFIGS, wide_heads

from nxd_autoshard import autoshard
from nxd_autoshard.tools.hf import build_model, random_batch


@functools.cache
def sharded_family(family: str, tp: int):
    """(model, sharded, args, kwargs) of a tiny HF family at tp; tp 8 uses 8 heads."""
    config = wide_heads(family) if tp == 8 else CONFIGS / f"{family}.json"
    model = build_model(config)
    args, kwargs = random_batch(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bert's replicated head dense warns; goldens pin it
        sharded = autoshard(model, tp, example_inputs=args, example_kwargs=kwargs)
    return model, sharded, args, kwargs
