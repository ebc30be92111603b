"""nxd-autoshard: shard unmodified PyTorch models into tensor-parallel programs with one call."""

from nxd_autoshard.api import autoshard
from nxd_autoshard.ir.errors import (
    AutoshardError,
    BackendError,
    CaptureError,
    DivisibilityError,
    PlanError,
)
from nxd_autoshard.ir.placements import Partial, Placement, Replicate, Shard
from nxd_autoshard.module import ShardedModule

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
