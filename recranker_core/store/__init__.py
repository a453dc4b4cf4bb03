"""Artifact storage: directories of files (models, adapters) under a prefix in S3, or a local
directory when asked, each with a manifest of checksums; see `artifacts`, `backends`, `fetch`
and `manifest`."""

from recranker_core.errors import ArtifactExistsError, ArtifactNotFoundError
from recranker_core.store.artifacts import ArtifactStore, StoredArtifact
from recranker_core.store.backends import LocalArtifactStore, S3ArtifactStore
from recranker_core.store.fetch import fetch_cached, fetch_registered
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
