"""The models lane: makes PyPI's torchvision importable beside the CPU torch.

PyPI's torchvision is a CUDA build: its C extension cannot load next to the CPU torch here.
Without it torchvision still registers fake kernels for two of its ops at import, which fails
unless their schemas exist, and transformers then cannot import its models either. This defines
those two schemas (what the extension would define) and nothing else: the detection ops stay
without kernels (a call fails loudly), and no model here uses them.
"""

from __future__ import annotations

import torch


def _torchvision_schemas() -> torch.library.Library | None:
    try:
        torch.ops.torchvision.nms.default  # noqa: B018 - the real extension is loaded
        return None
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")  # noqa: TOR901
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
    return lib


_SCHEMAS = _torchvision_schemas()  # kept alive for the session
