"""User-facing errors.

Everything a user can get wrong (input keys, data files, checkpoints) raises :class:`MtcoreError`
with a one-line message that names the key or file and says what was expected. The CLI prints
that line and exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations


class MtcoreError(Exception):
    """An error the user can fix; its message is one line and names the key or file."""


class PluginError(MtcoreError):
    """Plugins disagree (two register the same name) or a requested plugin is unknown."""
