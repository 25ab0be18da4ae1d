"""Exceptions raised for bad input. Each names the thing that is wrong."""

from __future__ import annotations


class GemmaError(Exception):
    """Base class of every error this package raises for bad input."""


class ConfigError(GemmaError, ValueError):
    """A config field holds an invalid or unsupported value."""


class WeightError(GemmaError, ValueError):
    """A weight set does not match the layout of its config."""


class CheckpointError(GemmaError, ValueError):
    """A checkpoint file or folder is missing, truncated or malformed."""


class InputError(GemmaError, ValueError):
    """Token ids, masks or lengths that the model cannot accept."""


class BackendError(GemmaError, RuntimeError):
    """A backend is unknown, not installed, or lacks an op kind."""
