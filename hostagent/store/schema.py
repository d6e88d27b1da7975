"""The state file's outbox tables: its application id, schema version and DDL.

`store.outbox` creates them in a new file; `store.guard` refuses a file whose application id
or schema version is not these (a foreign or newer store).
"""

SCHEMA_VERSION = 1
APP = "hostagent-state"

OUTBOX_DDL = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE baselines(instance_id TEXT PRIMARY KEY, state TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE events(
  event_id TEXT PRIMARY KEY, kind TEXT NOT NULL, instance_id TEXT NOT NULL,
  period_start_ns INTEGER NOT NULL, period_end_ns INTEGER NOT NULL,
  payload BLOB NOT NULL, created_ns INTEGER NOT NULL);
CREATE TABLE sinks(
  name TEXT PRIMARY KEY, added_ns INTEGER NOT NULL, active INTEGER NOT NULL,
  breaker_state TEXT, breaker_since_ns INTEGER, breaker_updated_ns INTEGER) WITHOUT ROWID;
CREATE TABLE deliveries(
  sink TEXT NOT NULL, event_id TEXT NOT NULL, instance_id TEXT NOT NULL,
  period_start_ns INTEGER NOT NULL, created_ns INTEGER NOT NULL,
  status TEXT NOT NULL CHECK (status IN ('pending', 'acked', 'dead')),
  claimed INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
  rejections INTEGER NOT NULL DEFAULT 0, next_attempt_ns INTEGER NOT NULL DEFAULT 0,
  last_error TEXT, done_ns INTEGER,
  PRIMARY KEY (sink, event_id)) WITHOUT ROWID;
CREATE INDEX deliveries_queue
  ON deliveries(sink, status, period_start_ns, instance_id, next_attempt_ns);
CREATE INDEX deliveries_retry ON deliveries(sink, instance_id, period_start_ns, next_attempt_ns)
  WHERE status = 'pending' AND claimed = 1;
CREATE INDEX deliveries_acked ON deliveries(done_ns) WHERE status = 'acked';
CREATE TABLE dead_letters(
  sink TEXT NOT NULL, event_id TEXT NOT NULL, reason TEXT NOT NULL, attempts INTEGER NOT NULL,
  dead_ns INTEGER NOT NULL, PRIMARY KEY (sink, event_id)) WITHOUT ROWID;
CREATE TABLE merges(
  merged_event_id TEXT NOT NULL, sink TEXT NOT NULL, source_ids TEXT NOT NULL,
  created_ns INTEGER NOT NULL, PRIMARY KEY (merged_event_id, sink)) WITHOUT ROWID;
CREATE TABLE alert_state(fingerprint TEXT PRIMARY KEY, state BLOB NOT NULL) WITHOUT ROWID;
"""
