-- The tables of flask-durable 0.2 (schema version 2), for SQLite.
-- Generated once from the SQLAlchemy metadata of flask_durable/store/schema.py at
-- commit c3ee6b7 (CreateTable/CreateIndex compiled for this dialect); used by
-- tests/test_upgrade.py to build a database as that version left it.
-- Do not edit: this is what the old version created, not the current schema.

CREATE TABLE durable_events (
	app_id VARCHAR(255) NOT NULL, 
	id VARCHAR(128) NOT NULL, 
	name VARCHAR(255) NOT NULL, 
	data TEXT NOT NULL, 
	ts FLOAT NOT NULL, 
	PRIMARY KEY (app_id, id)
);

CREATE INDEX ix_durable_events_app_name_ts ON durable_events (app_id, name, ts);

CREATE INDEX ix_durable_events_ts ON durable_events (ts);

CREATE TABLE durable_meta (
	"key" VARCHAR(64) NOT NULL, 
	value TEXT NOT NULL, 
	PRIMARY KEY ("key")
);

CREATE TABLE durable_runs (
	id VARCHAR(32) NOT NULL, 
	app_id VARCHAR(255) NOT NULL, 
	endpoint VARCHAR(255) NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	attempt INTEGER NOT NULL, 
	version INTEGER NOT NULL, 
	created_at FLOAT NOT NULL, 
	updated_at FLOAT NOT NULL, 
	finished_at FLOAT, 
	due_at FLOAT, 
	deadline FLOAT, 
	lease_owner VARCHAR(64), 
	lease_expires_at FLOAT, 
	cancel_requested BOOLEAN NOT NULL, 
	idempotency_key VARCHAR(255), 
	request_hash VARCHAR(64), 
	idempotency_expires_at FLOAT, 
	request BLOB NOT NULL, 
	response BLOB, 
	error TEXT, 
	PRIMARY KEY (id)
);

CREATE INDEX ix_durable_runs_due ON durable_runs (due_at) WHERE due_at IS NOT NULL;

CREATE UNIQUE INDEX ux_durable_runs_idempotency_app ON durable_runs (app_id, endpoint, idempotency_key) WHERE idempotency_key IS NOT NULL;

CREATE TABLE durable_steps (
	run_id VARCHAR(32) NOT NULL, 
	step_id VARCHAR(255) NOT NULL, 
	seq INTEGER NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	output TEXT, 
	error TEXT, 
	due_at FLOAT, 
	started_at FLOAT NOT NULL, 
	finished_at FLOAT, 
	history TEXT, 
	PRIMARY KEY (run_id, step_id)
)
 WITHOUT ROWID;

CREATE TABLE durable_waits (
	run_id VARCHAR(32) NOT NULL, 
	step_id VARCHAR(255) NOT NULL, 
	app_id VARCHAR(255) NOT NULL, 
	event VARCHAR(255) NOT NULL, 
	"match" TEXT NOT NULL, 
	since FLOAT NOT NULL, 
	expires_at FLOAT NOT NULL, 
	PRIMARY KEY (run_id, step_id)
);

CREATE INDEX ix_durable_waits_app_event ON durable_waits (app_id, event);
