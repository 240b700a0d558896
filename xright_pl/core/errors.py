"""Errors a user can fix: the CLI prints them as one paragraph, without a traceback."""

from __future__ import annotations


class XRightError(ValueError):
    """Base of the errors that name what is wrong and how to fix it."""


class ConfigError(XRightError):
    """An invalid setting (lam outside [0, 1], k < 1, a missing optimum, ...)."""


class DataError(XRightError):
    """A data or data-config problem, with the source, the row, the field and how to fix it."""
