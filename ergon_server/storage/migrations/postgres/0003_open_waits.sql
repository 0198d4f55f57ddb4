-- The OPEN waits of one flow, without reading every wait it ever had: a stage's state read
-- (does the flow still wait?), a suspend or an end reading or cancelling its open waits. The
-- primary key (flow_id, key) finds a flow's waits too, but then reads them all, satisfied
-- ones included, and a long-running flow keeps a row per wait for good.
--
-- IF NOT EXISTS keeps the file idempotent; the migration runner's advisory lock already makes
-- replicas starting together take turns. (Not CONCURRENTLY: a migration runs in a
-- transaction. The build holds off writes to waits while it reads the table once.)
CREATE INDEX IF NOT EXISTS waits_open ON waits (flow_id) WHERE status = 'OPEN';
