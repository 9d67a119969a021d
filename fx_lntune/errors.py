"""The exceptions fx-lntune raises: one base class, one subclass per kind of mistake."""

from __future__ import annotations

__all__ = [
    "LNTuneError",
    "LNTuneConfigError",
    "LNTuneTraceError",
    "LNTuneAdapterError",
    "LNTuneStateError",
    "LNTuneExportError",
    "LNTuneGenerationError",
]


class LNTuneError(Exception):
    """Base class of every error fx-lntune raises on purpose."""


class LNTuneConfigError(LNTuneError, ValueError):
    """The configuration is invalid or matches nothing usable."""


class LNTuneTraceError(LNTuneError, RuntimeError):
    """A capture front-end could not turn the model into a graph."""


class LNTuneAdapterError(LNTuneError, KeyError):
    """An adapter operation named an adapter that is missing, invalid or already present."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class LNTuneStateError(LNTuneError, ValueError):
    """Saved adapter files or a graph's state are missing, corrupt or do not fit."""


class LNTuneExportError(LNTuneError, RuntimeError):
    """A tuned graph could not be exported to the requested format."""


class LNTuneGenerationError(LNTuneError, ValueError):
    """Text generation was asked of a graph that cannot generate, or with arguments it cannot take."""
