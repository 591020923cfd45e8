"""The error hierarchy every part of moi raises; messages say what to do."""

from __future__ import annotations


class MoiError(Exception):
    """Base for errors that are the user's to fix; the CLI prints them as one line."""


class AudioError(MoiError):
    """Audio that cannot be read or used (not audio, empty, truncated to nothing)."""


class ModelNotFound(MoiError):
    """A model role resolved to nothing on this machine; the message names the fix."""


class ConfigError(MoiError):
    """An invalid option or combination of options."""


class EngineError(MoiError):
    """An engine failed to answer (remote down, backend error)."""


class Cancelled(MoiError):
    """Work stopped on request (Stop, barge-in)."""
