"""Typed settings for every stage: one object, read from the environment (prefix RECRANKER_,
nested sections with a double underscore, e.g. RECRANKER_INGEST__FAILURE_BUDGET=0.02)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class IngestSettings(BaseModel):
    """Rules a staged batch of interactions must satisfy before it is merged."""

    rating_min: float = Field(1.0, description="Lowest valid rating (inclusive).")
    rating_max: float = Field(5.0, description="Highest valid rating (inclusive).")
    failure_budget: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Largest share of bad rows a batch may have; above it the whole batch is "
        "rejected and nothing is merged.",
    )
    max_id_length: int = Field(
        256, ge=1, le=2000, description="Longest user or item id accepted, in characters."
    )
    future_tolerance_s: int = Field(
        300, ge=0, description="Seconds an event timestamp may lie ahead of the ingest clock."
    )
    min_event_ts: str = Field(
        "1970-01-01T00:00:00Z",
        description="Earliest valid event timestamp (ISO 8601); older rows are quarantined.",
    )
    work_mem: str = Field(
        "256MB",
        description="PostgreSQL work_mem of the ingest session (sorts and hashes over a batch).",
    )
    auto_create_items: bool = Field(
        False,
        description="Create unknown items from interaction rows instead of quarantining them "
        "(when no item file comes with the batch).",
    )

    @model_validator(mode="after")
    def _scale_is_ordered(self) -> IngestSettings:
        if self.rating_min >= self.rating_max:
            raise ValueError(
                f"rating_min ({self.rating_min}) must be below rating_max ({self.rating_max})"
            )
        return self


class Settings(BaseSettings):
    """Everything recranker can be told. Defaults run the embedded local stack."""

    model_config = SettingsConfigDict(
        env_prefix="RECRANKER_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    home: Path = Field(
        Path(".recranker"),
        description="Local state: embedded PostgreSQL and SeaweedFS data, downloaded wheels, "
        "datasets, caches and reports.",
    )
    database_url: str | None = Field(
        None,
        description="PostgreSQL URL (postgresql://user:pass@host:port/db). Unset: the embedded "
        "PostgreSQL under $RECRANKER_HOME/pg, started by `recranker stack up`.",
    )
    s3_endpoint: str | None = Field(
        None,
        description="S3 endpoint URL. Unset: the local SeaweedFS started by `recranker stack up`, "
        "with credentials generated under $RECRANKER_HOME.",
    )
    s3_bucket: str = Field("recranker", description="Bucket holding artifacts and datasets.")
    s3_region: str = Field("us-east-1", description="S3 region name sent with requests.")
    log_level: str = Field("INFO", description="Log level of the recranker loggers.")
    ingest: IngestSettings = Field(default_factory=lambda: IngestSettings())

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    def secret_free_dict(self) -> dict[str, object]:
        """Settings as a dict with credentials in URLs masked, for logs and artifacts."""
        from recranker_core.db.connect import redact_url

        data = self.model_dump(mode="json")
        if data.get("database_url"):
            data["database_url"] = redact_url(data["database_url"])
        return data


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment, with keyword overrides taking precedence."""
    return Settings(**overrides)  # type: ignore[arg-type]


def settings_table() -> str:
    """The markdown table of every setting (environment variable, default, meaning) for the
    README; a test keeps the README in step with this."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name.upper()}__")
                continue
            default = info.get_default(call_default_factory=True)
            shown = "(unset)" if default is None else f"`{default}`"
            rows.append(f"| `{prefix}{name.upper()}` | {shown} | {info.description or ''} |")

    walk(Settings, "RECRANKER_")
    return "\n".join(rows)
