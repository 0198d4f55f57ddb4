-- The OPEN waits of one flow, without reading every wait it ever had: a stage's state read
-- (does the flow still wait?), a suspend or an end reading or cancelling its open waits. The
-- primary key (flow_id, key) finds a flow's waits too, but then reads them all, satisfied
-- ones included, and a long-running flow keeps a row per wait for good.
CREATE INDEX IF NOT EXISTS waits_open ON waits (flow_id) WHERE status = 'OPEN';
