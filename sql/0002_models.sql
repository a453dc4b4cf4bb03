-- The model registry: every trained base model, its metrics, lineage and artifact, and which
-- one is the champion that serves candidates.

CREATE TABLE recranker.models (
    model_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind            text        NOT NULL,
    status          text        NOT NULL
                    CHECK (status IN ('candidate', 'champion', 'retired', 'rejected')),
    hyperparameters jsonb       NOT NULL DEFAULT '{}',
    metrics         jsonb       NOT NULL DEFAULT '{}',
    data_watermark  timestamptz,
    lineage         jsonb       NOT NULL DEFAULT '{}',
    artifact_uri    text        NOT NULL,
    files           jsonb       NOT NULL DEFAULT '{}',
    note            text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    promoted_at     timestamptz,
    retired_at      timestamptz
);
-- At most one champion at any time; promotion swaps it inside one transaction.
CREATE UNIQUE INDEX models_one_champion ON recranker.models ((true)) WHERE status = 'champion';
CREATE INDEX models_kind_created ON recranker.models (kind, created_at DESC);
