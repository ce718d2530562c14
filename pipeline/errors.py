"""The errors the stages raise on purpose: something the user gave (params, a file, a source, the
data) is wrong, and the message names it and the fix.

The ``fssd`` console script prints such an error as ``fssd <command>: error: <message>`` and exits
with status 2 (a crash, a bug, exits with 1 and its traceback); ``FSSD_DEBUG=1`` shows the
traceback of these too. The stages' own error classes (``DownloadError``, ``ConversionError``,
...) derive from :class:`UserError`; params errors are ``fssd.config.ConfigError``.
"""

from __future__ import annotations

__all__ = ["UserError", "InputError", "MissingFileError"]


class UserError(Exception):
    """An error in what the user gave, raised on purpose with a message that names it and the fix."""


class InputError(UserError, ValueError):
    """A bad value: a checksum mismatch, a setting that cannot work with the data, a bad URI."""


class MissingFileError(UserError, FileNotFoundError):
    """A file that params name, or that an earlier stage writes, does not exist."""
