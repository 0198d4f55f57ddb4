-- Step results in one round trip. A group commit holding only step results runs this one
-- statement on its own (autocommit) instead of BEGIN, a fencing SELECT, the upserts and COMMIT:
-- three round trips fewer for every step whose batch has nothing else in it, which is each
-- step but the last of a flow that runs alone. Mixed batches call it inside their transaction.
--
-- Per record, in order: not_found (no such flow), lease_lost (not RUNNING under this token:
-- nothing is written) or ok (upserted), the server's WriteOutcome values. The upsert leaves
-- final entries alone and the insert trigger hands out sequences, so repeated keys behave as
-- if applied one by one.
CREATE FUNCTION ergon_record_steps(
    p_flow_ids TEXT[],
    p_tokens BIGINT[],
    p_keys TEXT[],
    p_kinds TEXT[],
    p_statuses TEXT[],
    p_results BYTEA[],
    p_errors TEXT[],
    p_attempts INTEGER[],
    p_hashes TEXT[],
    p_now BIGINT[]
) RETURNS TABLE (outcome TEXT) LANGUAGE plpgsql AS $$
DECLARE
    v_outcomes TEXT[];
BEGIN
    -- The flows rows are the one lock per flow, taken in flow_id order by every writer.
    PERFORM 1 FROM flows WHERE flow_id = ANY(p_flow_ids) ORDER BY flow_id FOR UPDATE;
    -- Step records change no flow's status or token: one read fences them all.
    v_outcomes := ARRAY(
        SELECT CASE
            WHEN f.flow_id IS NULL THEN 'not_found'
            WHEN f.status <> 'RUNNING' OR f.lease_token <> t.token THEN 'lease_lost'
            ELSE 'ok'
        END
        FROM unnest(p_flow_ids, p_tokens) WITH ORDINALITY AS t (flow_id, token, n)
        LEFT JOIN flows f ON f.flow_id = t.flow_id
        ORDER BY t.n
    );
    FOR i IN 1 .. COALESCE(array_length(p_flow_ids, 1), 0) LOOP
        IF v_outcomes[i] = 'ok' THEN
            INSERT INTO journal AS j (
                flow_id, key, sequence, kind, status, result, error, attempts, args_hash,
                recorded_at
            )
            VALUES (
                p_flow_ids[i], p_keys[i],
                (SELECT f.journal_seq + 1 FROM flows f WHERE f.flow_id = p_flow_ids[i]),
                p_kinds[i], p_statuses[i], p_results[i], p_errors[i], p_attempts[i],
                p_hashes[i], p_now[i]
            )
            ON CONFLICT ON CONSTRAINT journal_pkey DO UPDATE SET
                status = excluded.status, result = excluded.result, error = excluded.error,
                attempts = excluded.attempts, args_hash = excluded.args_hash,
                recorded_at = excluded.recorded_at
            WHERE j.status = 'RETRYING';
        END IF;
    END LOOP;
    RETURN QUERY SELECT u.o FROM unnest(v_outcomes) WITH ORDINALITY AS u (o, n) ORDER BY u.n;
END
$$;
