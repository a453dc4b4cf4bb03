"""The error hierarchy: every failure a user can act on is one of these, with a message that says
what was wrong, where, and what to do."""


class RecrankerError(Exception):
    """Base of every error raised on purpose by recranker."""


class ConfigError(RecrankerError):
    """A setting is missing or inconsistent."""


class StackError(RecrankerError):
    """A local service (embedded PostgreSQL, SeaweedFS) could not be started, found, stopped."""


class DataError(RecrankerError):
    """An input file cannot be read as interactions (empty, missing columns, unknown format)."""


class ValidationFailed(RecrankerError):
    """A batch broke more rules than the failure budget allows; nothing of it was merged."""


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
