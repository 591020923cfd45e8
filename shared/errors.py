"""The error hierarchy every part of moi raises; messages say what to do."""

from __future__ import annotations


class MoiError(Exception):
    """Base for errors that are the user's to fix; the CLI prints them as one line."""


class AudioError(MoiError):
    """Audio that cannot be read or used (not audio, empty, truncated to nothing)."""


class AudioTooLong(AudioError):
    """Audio longer than the caller accepts; found from the container or while decoding, so a
    small file holding hours of silence never gets decoded whole."""

    def __init__(self, message: str, seconds: float, limit: float) -> None:
        super().__init__(message)
        self.seconds = seconds
        self.limit = limit


class ContextTooLong(MoiError):
    """The conversation does not fit the model's context window (OpenAI: context_length_exceeded)."""


class ModelNotFound(MoiError):
    """A model role resolved to nothing on this machine; the message names the fix."""


class ConfigError(MoiError):
    """An invalid option or combination of options."""


class EngineError(MoiError):
    """An engine failed to answer (remote down, backend error)."""


class Cancelled(MoiError):
    """Work stopped on request (Stop, barge-in)."""
