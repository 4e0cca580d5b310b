-- Update log and snapshots for CRDT documents (PostgreSQL).
-- `data` holds opaque Yjs v1 update bytes; doc-store never interprets them.

-- Every update appended to a document, in log order. A row with seq <= the
-- document's snapshot upto_seq is covered by the snapshot and is deleted by compaction.
CREATE TABLE doc_updates (
    doc  TEXT   NOT NULL,
    seq  BIGINT NOT NULL,
    data BYTEA  NOT NULL,
    PRIMARY KEY (doc, seq)
);

-- The merged state of a document's log up to and including upto_seq.
CREATE TABLE doc_snapshots (
    doc        TEXT        NOT NULL PRIMARY KEY,
    data       BYTEA       NOT NULL,
    upto_seq   BIGINT      NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
