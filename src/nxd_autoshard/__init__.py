"""nxd-autoshard: shard unmodified PyTorch models into tensor-parallel programs with one call."""

from .errors import AutoshardError, BackendError, CaptureError, DivisibilityError, PlanError
from .placements import Partial, Placement, Replicate, Shard
from .sharded import ShardedModule, autoshard

__all__ = [
    "AutoshardError",
    "BackendError",
    "CaptureError",
    "DivisibilityError",
    "Partial",
    "Placement",
    "PlanError",
    "Replicate",
    "Shard",
    "ShardedModule",
    "autoshard",
]
__version__ = "0.1.0"
