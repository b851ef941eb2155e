-- The journal: the truth about every file and batch. One writer (the service's main loop).
-- Bump PRAGMA user_version with every change and add a step to Journal._migrate.
CREATE TABLE IF NOT EXISTS files (
    id          INTEGER PRIMARY KEY,
    pipeline    TEXT NOT NULL,
    name        TEXT NOT NULL,              -- as dropped; never used to build an output path
    spool_name  TEXT NOT NULL UNIQUE,
    sha256      TEXT,
    size        INTEGER,
    received_at REAL NOT NULL,              -- unix time the file was claimed
    state       TEXT NOT NULL,              -- claiming|received|batched|published|quarantined|duplicate
    batch_id    TEXT,
    reason      TEXT,
    facts       TEXT,                       -- JSON the processor counted (rows, …)
    done_at     REAL,
    disposed    INTEGER NOT NULL DEFAULT 0, -- 1 once moved to archive/quarantine or deleted
    group_key   TEXT                        -- batch_by pipelines: keyed hash of the series/study
);
CREATE INDEX IF NOT EXISTS files_by_state ON files (state, pipeline);
-- By a 64-bit prefix of the hash: a hash is random, so each claim group's rows land all over
-- this index and every page they touch is written to the WAL again; short keys make it a
-- third of the pages (the full hash is compared after the look-up).
CREATE INDEX IF NOT EXISTS files_by_sha ON files (pipeline, substr(sha256, 1, 16));
CREATE INDEX IF NOT EXISTS files_by_batch ON files (batch_id);
CREATE INDEX IF NOT EXISTS files_undisposed ON files (disposed) WHERE disposed = 0;

CREATE TABLE IF NOT EXISTS batches (
    id           TEXT PRIMARY KEY,
    pipeline     TEXT NOT NULL,
    priority     INTEGER NOT NULL,
    state        TEXT NOT NULL,             -- sealed|running|published|quarantined|failed|split
    opened_at    REAL NOT NULL,             -- arrival of its first file
    sealed_at    REAL NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    started_at   REAL,
    finished_at  REAL,
    n_files      INTEGER NOT NULL,
    n_bytes      INTEGER NOT NULL,
    folder       TEXT,
    reason       TEXT
);
CREATE INDEX IF NOT EXISTS batches_by_state ON batches (state, pipeline);

CREATE TABLE IF NOT EXISTS rejected (
    pipeline TEXT NOT NULL,
    name     TEXT NOT NULL,
    inode    INTEGER NOT NULL,
    reason   TEXT NOT NULL,
    at       REAL NOT NULL,
    PRIMARY KEY (pipeline, name, inode)
);

CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
