"""Errors raised by nxd-autoshard; each names the node or module at fault and what to do."""

from __future__ import annotations

__all__ = ["AutoshardError", "CaptureError", "PlanError", "DivisibilityError", "BackendError"]


class AutoshardError(Exception):
    """Base class of every error this package raises on purpose."""


class CaptureError(AutoshardError):
    """The model could not be captured into a graph."""


class PlanError(AutoshardError):
    """A sharding plan is malformed or does not fit the model."""


class DivisibilityError(AutoshardError):
    """A size of the model cannot be split evenly across the requested tp."""


class BackendError(AutoshardError):
    """A requested runtime backend (torch-xla, Neuron) is not available."""
