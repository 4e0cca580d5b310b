-- Named checkpoints of whole projects (SQLite): one row per checkpoint, and the full state of
-- every document of the project at that moment.
CREATE TABLE checkpoints (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    project    TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    author     TEXT    NOT NULL,
    -- Unix milliseconds.
    created_at BIGINT  NOT NULL
);
CREATE INDEX checkpoints_by_project ON checkpoints (project, id);

CREATE TABLE checkpoint_docs (
    checkpoint_id INTEGER NOT NULL REFERENCES checkpoints (id) ON DELETE CASCADE,
    doc           TEXT    NOT NULL,
    data          BLOB    NOT NULL,
    PRIMARY KEY (checkpoint_id, doc)
);
