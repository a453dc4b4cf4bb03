"""Artifact storage: directories of files (models, adapters) under a prefix in S3, or a local
directory when asked, each with a manifest of checksums; see `artifacts` and `manifest`."""

from recranker_core.store.artifacts import (
    ArtifactExistsError,
    ArtifactNotFoundError,
    ArtifactStore,
    LocalArtifactStore,
    S3ArtifactStore,
    StoredArtifact,
    fetch_cached,
    fetch_registered,
)
from recranker_core.store.manifest import FileEntry, Manifest

__all__ = [
    "ArtifactExistsError",
    "ArtifactNotFoundError",
    "ArtifactStore",
    "FileEntry",
    "LocalArtifactStore",
    "Manifest",
    "S3ArtifactStore",
    "StoredArtifact",
    "fetch_cached",
    "fetch_registered",
]
