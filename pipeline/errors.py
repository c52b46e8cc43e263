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


class MissingLibrary(NemoError):
    """An optional library a stage needs under the current config is not installed; the
    message names the nemo-pipe extra that installs it."""


class LockBusy(NemoError):
    """Another run holds the artifact's lock and the caller asked not to wait."""

    exit_code = 3


class NotPublished(NemoError):
    """The artifact the current config resolves to has not been built yet."""

    exit_code = 1


class StorageError(NemoError):
    """The work dir cannot be written (disk full, permissions, read-only); finished shards are
    kept, so the run resumes once the cause is fixed."""


class UpstreamCorrupt(NemoError):
    """A published artifact's file no longer matches its manifest (changed or gone after
    publishing, or an unreadable manifest). Names the artifact, so the runner can mark it
    corrupt and rebuild it before retrying the stage that read it."""

    def __init__(self, message: str, *, stage: str = "", key: str = "", artifact: str = "",
                 file: str = "", what: str = "") -> None:
        super().__init__(message)
        self.stage, self.key, self.artifact, self.file, self.what = stage, key, artifact, file, what

    def __reduce__(self) -> tuple:  # crosses process boundaries (shard workers, dask)
        return (_rebuild_upstream_corrupt, (str(self), self.stage, self.key, self.artifact,
                                            self.file, self.what))


def _rebuild_upstream_corrupt(message: str, stage: str, key: str, artifact: str, file: str,
                              what: str) -> UpstreamCorrupt:
    return UpstreamCorrupt(message, stage=stage, key=key, artifact=artifact, file=file, what=what)


class ArtifactCorrupt(NemoError):
    """A published artifact asked for by `path` / `load` fails its integrity check."""
