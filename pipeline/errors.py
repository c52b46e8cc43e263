"""Errors a user can act on.

Every error the pipeline raises on bad input or bad configuration is a :class:`NemoError`: the CLI
prints its message (what is wrong, where, and how to fix it) instead of a traceback and exits
with status 2. Anything else escaping a stage is a bug or a crash and keeps its traceback.
"""

from __future__ import annotations


class NemoError(Exception):
    """A problem the user can fix: bad input file, bad config value, busy artifact."""

    exit_code = 2


class ConfigError(NemoError):
    """A config file or `--set` override that does not validate."""


class InputError(NemoError):
    """Input data (dataset files, images, models) that is missing or malformed."""


class LockBusy(NemoError):
    """Another run holds the artifact's lock and the caller asked not to wait."""

    exit_code = 3


class NotPublished(NemoError):
    """The artifact the current config resolves to has not been built yet."""

    exit_code = 1


class StorageError(NemoError):
    """The work dir cannot be written (disk full, permissions, read-only); finished shards are
    kept, so the run resumes once the cause is fixed."""
