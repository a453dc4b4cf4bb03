"""The error hierarchy: every failure a user can act on is one of these, with a message that says
what was wrong, where, and what to do."""

from __future__ import annotations

from typing import Any


class RecrankerError(Exception):
    """Base of every error raised on purpose by recranker. Its first argument is the message;
    further arguments (a ValidationFailed's results) travel with it but never show in its str
    or repr, which Prefect writes into logs and state messages."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


class ConfigError(RecrankerError):
    """A setting is missing or inconsistent."""


class StackError(RecrankerError):
    """A local service (embedded PostgreSQL, SeaweedFS) could not be started, found, stopped."""


class DataError(RecrankerError):
    """An input file cannot be read as interactions (empty, missing columns, unknown format)."""


class ValidationFailed(RecrankerError):
    """A batch broke more rules than the failure budget allows; nothing of it was merged. The
    second argument is the IngestResult (or the list of them)."""

    @property
    def results(self) -> list[Any]:
        """The IngestResult(s) of the rejected file(s), as a list (empty when none was given)."""
        if len(self.args) < 2:
            return []
        attached = self.args[1]
        return list(attached) if isinstance(attached, list) else [attached]


class ArtifactIntegrityError(RecrankerError):
    """A stored artifact does not match its manifest (checksum, backbone, template)."""


class ArtifactExistsError(RecrankerError):
    """A complete artifact (or another artifact around it) is already stored under a prefix;
    artifacts are immutable, a new version gets a new prefix."""


class ArtifactNotFoundError(RecrankerError):
    """Nothing at all is stored under a prefix."""


class StageFailed(RecrankerError):
    """A stage of the nightly chain failed; the stages after it did not run."""


class RunStateError(RecrankerError):
    """A ranking run is not in the state the operation needs (publish an incomplete run, resume
    a failed or dropped one, write a shard it does not have)."""


class BatchRankBusyError(RecrankerError):
    """Another batch ranking holds this database's lock; at most one runs per environment."""
