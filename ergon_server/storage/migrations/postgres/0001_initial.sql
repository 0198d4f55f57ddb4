-- Ergon's PostgreSQL schema: the SQLite schema of versions 1 and 2 in one file (nothing ran on
-- PostgreSQL before it). Times are BIGINT milliseconds since the Unix epoch, passed in by the
-- server (never NOW(), so tests drive time); payloads are opaque BYTEA; Failure, RetryPolicy and
-- labels are JSON TEXT (TEXT rather than JSONB: JSONB refuses the escaped NUL a message may
-- carry, and the server never queries inside them).
--
-- Identifiers and keys are COLLATE "C": ties are broken by (flow_id, key) in code point order,
-- as the other stores break them, whatever the database's default collation.
--
-- Concurrency: every write to a flow's rows (its journal, waits, signals) holds that flow's row
-- lock (SELECT ... FOR UPDATE on flows), so the flows row is the one lock per flow.

CREATE TABLE flows (
    -- Scheduling order: claim tie-breaker and the list cursor. An identity never hands out a
    -- number twice.
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    flow_id TEXT COLLATE "C" NOT NULL UNIQUE,
    flow_type TEXT COLLATE "C" NOT NULL,
    status TEXT NOT NULL CHECK (
        status IN ('PENDING', 'RUNNING', 'WAITING', 'COMPLETED', 'FAILED', 'CANCELLED')
    ),
    input BYTEA NOT NULL,
    result BYTEA,
    error TEXT,
    attempt INTEGER NOT NULL,
    labels TEXT NOT NULL,
    retry_policy TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    ready_at BIGINT NOT NULL,
    completed_at BIGINT,
    lease_token BIGINT NOT NULL DEFAULT 0,
    lease_owner TEXT COLLATE "C",
    lease_expires_at BIGINT,
    -- The last journal sequence handed out: a counter rather than MAX(sequence) so that a
    -- sequence is never reused after a flow retry drops its failed entries.
    journal_seq INTEGER NOT NULL DEFAULT 0,
    -- A child flow names its parent and the parent's journal key that waits for it.
    parent_flow_id TEXT COLLATE "C",
    parent_key TEXT COLLATE "C",
    -- A cancel was asked while the flow ran: it ends CANCELLED whatever it returns.
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    -- How many times the flow was parked (history mismatch) since it last completed.
    parks INTEGER NOT NULL DEFAULT 0
);

-- Claims: per type, oldest ready first, touching only PENDING rows (an ordered probe per type).
CREATE INDEX flows_pending ON flows (flow_type, ready_at, seq) WHERE status = 'PENDING';
-- Lease expiry scans only RUNNING rows, soonest first.
CREATE INDEX flows_lease_expiry ON flows (lease_expires_at) WHERE status = 'RUNNING';
-- Heartbeats renew every lease of one session.
CREATE INDEX flows_lease_owner ON flows (lease_owner) WHERE status = 'RUNNING';
-- Listings filtered by status or by type, in scheduling order.
CREATE INDEX flows_status ON flows (status, seq);
CREATE INDEX flows_type ON flows (flow_type, seq);

CREATE TABLE journal (
    flow_id TEXT COLLATE "C" NOT NULL REFERENCES flows (flow_id),
    key TEXT COLLATE "C" NOT NULL,
    sequence INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('STEP', 'TIMER', 'SIGNAL', 'CHILD', 'CANCEL')),
    status TEXT NOT NULL CHECK (status IN ('RETRYING', 'COMPLETED', 'FAILED')),
    result BYTEA,
    error TEXT,
    attempts INTEGER NOT NULL,
    args_hash TEXT NOT NULL,
    recorded_at BIGINT NOT NULL,
    PRIMARY KEY (flow_id, key)
);

-- History and claims read a journal in sequence order.
CREATE UNIQUE INDEX journal_sequence ON journal (flow_id, sequence);

-- A new entry advances its flow's counter; an upsert that updates an existing entry does not
-- fire this trigger, so a key keeps the sequence it was first given.
CREATE FUNCTION journal_next_sequence() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE flows SET journal_seq = NEW.sequence WHERE flow_id = NEW.flow_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER journal_next_sequence AFTER INSERT ON journal
    FOR EACH ROW EXECUTE FUNCTION journal_next_sequence();

CREATE TABLE request_ids (
    request_id TEXT COLLATE "C" PRIMARY KEY,
    flow_id TEXT COLLATE "C" NOT NULL REFERENCES flows (flow_id)
);

CREATE TABLE signals (
    flow_id TEXT COLLATE "C" NOT NULL REFERENCES flows (flow_id),
    name TEXT COLLATE "C" NOT NULL,
    sequence INTEGER NOT NULL,
    payload BYTEA NOT NULL,
    request_id TEXT COLLATE "C" NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL,
    consumed_at BIGINT,
    -- Which wait consumed the signal (with consumed_at).
    consumed_key TEXT COLLATE "C",
    PRIMARY KEY (flow_id, name, sequence)
);

-- A signal's request_id is deduplicated per flow.
CREATE UNIQUE INDEX signals_request_id ON signals (flow_id, request_id) WHERE request_id <> '';
-- The oldest unconsumed signal of a mailbox, without stepping over consumed ones.
CREATE INDEX signals_unconsumed ON signals (flow_id, name, sequence) WHERE consumed_at IS NULL;

CREATE TABLE flow_types (
    flow_type TEXT COLLATE "C" PRIMARY KEY,
    registered_at BIGINT NOT NULL
);

-- One row per registered wait. A wait is satisfied at most once: SATISFIED means its outcome
-- is the journal entry under the same key. Rows are never deleted.
CREATE TABLE waits (
    flow_id TEXT COLLATE "C" NOT NULL REFERENCES flows (flow_id),
    key TEXT COLLATE "C" NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('TIMER', 'SIGNAL', 'CHILD')),
    status TEXT NOT NULL CHECK (status IN ('OPEN', 'SATISFIED', 'CANCELLED')),
    -- TIMER: the fire time of the first registration, kept for good.
    fire_at BIGINT,
    -- SIGNAL: the mailbox name it consumes from.
    signal_name TEXT COLLATE "C",
    -- CHILD: the flow whose end satisfies it.
    child_flow_id TEXT COLLATE "C",
    created_at BIGINT NOT NULL,
    PRIMARY KEY (flow_id, key)
);

-- Due timers, oldest first (ties by flow and key): fire_timers and next_timer_at touch only
-- open timers.
CREATE INDEX waits_timers ON waits (fire_at, flow_id, key)
    WHERE status = 'OPEN' AND kind = 'TIMER';
-- A delivered signal finds the open waits for its name, oldest first.
CREATE INDEX waits_signals ON waits (flow_id, signal_name, created_at, key)
    WHERE status = 'OPEN' AND kind = 'SIGNAL';
-- A child's end finds the waits for it.
CREATE INDEX waits_children ON waits (child_flow_id) WHERE kind = 'CHILD';
