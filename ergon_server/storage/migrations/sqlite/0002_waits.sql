-- Waits (timers, signals, child flows), cancellation requests, parks and parent links.

-- A child flow names its parent and the parent's journal key that waits for it.
ALTER TABLE flows ADD COLUMN parent_flow_id TEXT;
ALTER TABLE flows ADD COLUMN parent_key TEXT;
-- A cancel was asked while the flow ran: it ends CANCELLED whatever it returns.
ALTER TABLE flows ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
-- How many times the flow was parked (history mismatch) since it last completed.
ALTER TABLE flows ADD COLUMN parks INTEGER NOT NULL DEFAULT 0;

-- The journal gains the CANCEL kind. SQLite cannot alter a CHECK constraint, so the table is
-- rebuilt, with its index and trigger; rows keep their sequences.
CREATE TABLE journal_v2 (
    flow_id TEXT NOT NULL REFERENCES flows (flow_id),
    key TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('STEP', 'TIMER', 'SIGNAL', 'CHILD', 'CANCEL')),
    status TEXT NOT NULL CHECK (status IN ('RETRYING', 'COMPLETED', 'FAILED')),
    result BLOB,
    error TEXT,
    attempts INTEGER NOT NULL,
    args_hash TEXT NOT NULL,
    recorded_at INTEGER NOT NULL,
    PRIMARY KEY (flow_id, key)
);

INSERT INTO journal_v2 (flow_id, key, sequence, kind, status, result, error, attempts,
    args_hash, recorded_at)
SELECT flow_id, key, sequence, kind, status, result, error, attempts, args_hash, recorded_at
FROM journal;

DROP TABLE journal;

ALTER TABLE journal_v2 RENAME TO journal;

CREATE UNIQUE INDEX journal_sequence ON journal (flow_id, sequence);

CREATE TRIGGER journal_next_sequence AFTER INSERT ON journal
BEGIN
    UPDATE flows SET journal_seq = NEW.sequence WHERE flow_id = NEW.flow_id;
END;

-- One row per registered wait. A wait is satisfied at most once: SATISFIED means its outcome
-- is the journal entry under the same key. Rows are never deleted.
CREATE TABLE waits (
    flow_id TEXT NOT NULL REFERENCES flows (flow_id),
    key TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('TIMER', 'SIGNAL', 'CHILD')),
    status TEXT NOT NULL CHECK (status IN ('OPEN', 'SATISFIED', 'CANCELLED')),
    -- TIMER: the fire time of the first registration, kept for good.
    fire_at INTEGER,
    -- SIGNAL: the mailbox name it consumes from.
    signal_name TEXT,
    -- CHILD: the flow whose end satisfies it.
    child_flow_id TEXT,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (flow_id, key)
);

-- Due timers, oldest first (ties by flow and key): fire_timers and next_timer_at touch only
-- open timers, O(log n).
CREATE INDEX waits_timers ON waits (fire_at, flow_id, key)
    WHERE status = 'OPEN' AND kind = 'TIMER';
-- A delivered signal finds the open waits for its name, oldest first.
CREATE INDEX waits_signals ON waits (flow_id, signal_name, created_at, key)
    WHERE status = 'OPEN' AND kind = 'SIGNAL';
-- A child's end finds the waits for it.
CREATE INDEX waits_children ON waits (child_flow_id) WHERE kind = 'CHILD';

-- Which wait consumed the signal (with consumed_at).
ALTER TABLE signals ADD COLUMN consumed_key TEXT;

-- The oldest unconsumed signal of a mailbox, without stepping over consumed ones.
CREATE INDEX signals_unconsumed ON signals (flow_id, name, sequence) WHERE consumed_at IS NULL;
