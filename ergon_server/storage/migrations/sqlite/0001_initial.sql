-- Ergon's first SQLite schema. Times are INTEGER milliseconds since the Unix epoch; payloads
-- are opaque BLOBs; Failure, RetryPolicy and labels are JSON TEXT.

CREATE TABLE flows (
    -- Scheduling order: claim tie-breaker and the list cursor. AUTOINCREMENT so a number is
    -- never reused, even after the newest row is gone.
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    flow_id TEXT NOT NULL UNIQUE,
    flow_type TEXT NOT NULL,
    status TEXT NOT NULL CHECK (
        status IN ('PENDING', 'RUNNING', 'WAITING', 'COMPLETED', 'FAILED', 'CANCELLED')
    ),
    input BLOB NOT NULL,
    result BLOB,
    error TEXT,
    attempt INTEGER NOT NULL,
    labels TEXT NOT NULL,
    retry_policy TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    ready_at INTEGER NOT NULL,
    completed_at INTEGER,
    lease_token INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires_at INTEGER,
    -- The last journal sequence handed out: a counter rather than MAX(sequence) so that a
    -- sequence is never reused after a flow retry drops its failed entries.
    journal_seq INTEGER NOT NULL DEFAULT 0
);

-- Claims: per type, oldest ready first, touching only PENDING rows (O(log n) per claim).
CREATE INDEX flows_pending ON flows (flow_type, ready_at, seq) WHERE status = 'PENDING';
-- Lease expiry scans only RUNNING rows, soonest first.
CREATE INDEX flows_lease_expiry ON flows (lease_expires_at) WHERE status = 'RUNNING';
-- Heartbeats renew every lease of one session.
CREATE INDEX flows_lease_owner ON flows (lease_owner) WHERE status = 'RUNNING';
-- Listings filtered by status or by type, in scheduling order.
CREATE INDEX flows_status ON flows (status, seq);
CREATE INDEX flows_type ON flows (flow_type, seq);

CREATE TABLE journal (
    flow_id TEXT NOT NULL REFERENCES flows (flow_id),
    key TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('STEP', 'TIMER', 'SIGNAL', 'CHILD')),
    status TEXT NOT NULL CHECK (status IN ('RETRYING', 'COMPLETED', 'FAILED')),
    result BLOB,
    error TEXT,
    attempts INTEGER NOT NULL,
    args_hash TEXT NOT NULL,
    recorded_at INTEGER NOT NULL,
    PRIMARY KEY (flow_id, key)
);

-- History and claims read a journal in sequence order.
CREATE UNIQUE INDEX journal_sequence ON journal (flow_id, sequence);

-- A new entry advances its flow's counter; an upsert that updates an existing entry does not
-- fire this trigger, so a key keeps the sequence it was first given.
CREATE TRIGGER journal_next_sequence AFTER INSERT ON journal
BEGIN
    UPDATE flows SET journal_seq = NEW.sequence WHERE flow_id = NEW.flow_id;
END;

CREATE TABLE request_ids (
    request_id TEXT PRIMARY KEY,
    flow_id TEXT NOT NULL REFERENCES flows (flow_id)
) WITHOUT ROWID;

CREATE TABLE signals (
    flow_id TEXT NOT NULL REFERENCES flows (flow_id),
    name TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    payload BLOB NOT NULL,
    request_id TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL,
    consumed_at INTEGER,
    PRIMARY KEY (flow_id, name, sequence)
);

-- A signal's request_id is deduplicated per flow.
CREATE UNIQUE INDEX signals_request_id ON signals (flow_id, request_id) WHERE request_id <> '';

CREATE TABLE flow_types (
    flow_type TEXT PRIMARY KEY,
    registered_at INTEGER NOT NULL
) WITHOUT ROWID;
