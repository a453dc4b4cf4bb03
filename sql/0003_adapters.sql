-- The adapter registry: every tuned LoRA adapter of the LLM ranker, what it was built from
-- (backbone, prompt template, objective, base model, data watermark), its metrics and stored
-- files, and which one is the champion that batch ranking uses.

CREATE TABLE recranker.adapters (
    adapter_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    objective        text        NOT NULL,
    status           text        NOT NULL
                     CHECK (status IN ('candidate', 'champion', 'retired', 'rejected')),
    backbone_id      text        NOT NULL,
    backbone_hash    text        NOT NULL,
    template_version text        NOT NULL,
    base_model_id    bigint      REFERENCES recranker.models (model_id),
    hyperparameters  jsonb       NOT NULL DEFAULT '{}',
    metrics          jsonb       NOT NULL DEFAULT '{}',
    data_watermark   timestamptz,
    lineage          jsonb       NOT NULL DEFAULT '{}',
    artifact_uri     text        NOT NULL,
    files            jsonb       NOT NULL DEFAULT '{}',
    note             text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    promoted_at      timestamptz,
    retired_at       timestamptz
);
CREATE UNIQUE INDEX adapters_one_champion ON recranker.adapters ((true)) WHERE status = 'champion';
CREATE INDEX adapters_created ON recranker.adapters (created_at DESC);
