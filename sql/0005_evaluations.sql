-- Ranker evaluations: the METHOD.md table (base, each task, hybrid; validation and test) of a
-- base model + adapter pair, with the weights used and where the HTML report was written.

CREATE TABLE recranker.ranker_evaluations (
    evaluation_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model_id      bigint      NOT NULL REFERENCES recranker.models (model_id),
    adapter_id    bigint      REFERENCES recranker.adapters (adapter_id),
    metrics       jsonb       NOT NULL,
    weights       jsonb       NOT NULL DEFAULT '{}',
    counts        jsonb       NOT NULL DEFAULT '{}',
    params        jsonb       NOT NULL DEFAULT '{}',
    report_path   text,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ranker_evaluations_created ON recranker.ranker_evaluations (created_at DESC);
