//! The schema, as numbered migration steps. Step N (1-based) takes a database from
//! `user_version` N-1 to N. Steps are only ever appended: a released step is never edited,
//! because databases in the field have already run it.

/// Every migration step in order; `MIGRATIONS.len()` is the version this program writes.
pub(crate) const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5, V6];

/// Console users (argon2id PHC strings, never a password), API tokens for scripts and
/// sign-in sessions; tokens and session ids by SHA-256 of the secret only.
const V6: &str = r#"
CREATE TABLE users (
    name          TEXT PRIMARY KEY,
    role          TEXT NOT NULL,          -- admin, operator, restore, auditor
    password_hash TEXT NOT NULL,
    disabled      INTEGER NOT NULL DEFAULT 0,
    created       INTEGER NOT NULL,
    failed_logins INTEGER NOT NULL DEFAULT 0,
    locked_until  INTEGER
) WITHOUT ROWID;

CREATE TABLE api_tokens (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT NOT NULL,
    role       TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created    INTEGER NOT NULL,
    expires    INTEGER,
    created_by TEXT NOT NULL
);

CREATE TABLE sessions (
    id_hash   TEXT PRIMARY KEY,
    user      TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
    csrf      TEXT NOT NULL,
    created   INTEGER NOT NULL,
    expires   INTEGER NOT NULL,
    last_seen INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX sessions_user ON sessions (user);
"#;

/// Online copies: which recovery points each storage target holds. A copy outlives the
/// point on disk (long-term retention), so it keeps the point's record of its own.
const V5: &str = r#"
CREATE TABLE online_points (
    storage      TEXT NOT NULL REFERENCES storage_targets (name) ON DELETE CASCADE,
    id           TEXT NOT NULL,
    vm           TEXT NOT NULL,
    created_unix INTEGER NOT NULL,
    info         TEXT NOT NULL,           -- JSON RecoveryPointInfo, as copied
    copied       INTEGER NOT NULL,
    PRIMARY KEY (storage, id)
) WITHOUT ROWID;
CREATE INDEX online_points_id ON online_points (id);
CREATE INDEX online_points_vm ON online_points (vm, created_unix);
"#;

/// Storage targets for online copies. Where a target is (never its secret, which the
/// server keeps in a file of its own).
const V4: &str = r#"
CREATE TABLE storage_targets (
    name     TEXT PRIMARY KEY,
    kind     TEXT NOT NULL,               -- azure, s3, folder
    location TEXT NOT NULL,               -- JSON StorageLocation
    created  INTEGER NOT NULL
) WITHOUT ROWID;
"#;

/// Clusters (hosts VMs may move between on their own), VM-id claims held for an
/// administrator, the record of data-source moves, and notes on resolved alerts.
const V3: &str = r#"
CREATE TABLE clusters (
    name    TEXT PRIMARY KEY,
    created INTEGER NOT NULL
);

-- A host is in at most one cluster.
CREATE TABLE cluster_hosts (
    host    TEXT PRIMARY KEY,
    cluster TEXT NOT NULL REFERENCES clusters (name) ON DELETE CASCADE
) WITHOUT ROWID;
CREATE INDEX cluster_hosts_cluster ON cluster_hosts (cluster);

-- A VM an agent reports under a VM id another host's data source holds, when the
-- data source may not follow it: held here (not a data source) until the claim ends
-- or an administrator moves the data source.
CREATE TABLE vm_claims (
    host          TEXT NOT NULL,
    vm            TEXT NOT NULL,
    datasource_id TEXT NOT NULL REFERENCES datasources (id) ON DELETE CASCADE,
    info          TEXT NOT NULL,          -- JSON VmInfo as reported
    first_seen    INTEGER NOT NULL,
    last_seen     INTEGER NOT NULL,
    PRIMARY KEY (host, vm)
) WITHOUT ROWID;
CREATE INDEX vm_claims_ds ON vm_claims (datasource_id);

-- Every change of a data source's HOST/VM, so an old name can say where it went.
CREATE TABLE datasource_moves (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    datasource_id TEXT NOT NULL,
    old_host      TEXT NOT NULL,
    old_vm        TEXT NOT NULL,
    new_host      TEXT NOT NULL,
    new_vm        TEXT NOT NULL,
    time          INTEGER NOT NULL,
    how           TEXT NOT NULL           -- automatic, cluster NAME, administrator
);
CREATE INDEX datasource_moves_old ON datasource_moves (old_host, old_vm, id);

ALTER TABLE alerts ADD COLUMN note TEXT;
"#;

/// Item-level recovery: what the server found in each volume of a recovery point.
const V2: &str = r#"
ALTER TABLE recovery_points ADD COLUMN volumes TEXT;   -- JSON [VolumeCheck], NULL = unchecked
"#;

/// Times are Unix seconds (INTEGER) so they sort and compare; the protocol's RFC 3339
/// strings are made on the way out. JSON columns hold serde_json of protocol types.
const V1: &str = r#"
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE audit_log (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    time   INTEGER NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);

CREATE TABLE enroll_tokens (
    secret_hash TEXT PRIMARY KEY,
    host        TEXT NOT NULL,
    created     INTEGER NOT NULL,
    expires     INTEGER NOT NULL,
    used        INTEGER            -- Unix time of use; NULL while unused
) WITHOUT ROWID;

CREATE TABLE agents (
    host             TEXT PRIMARY KEY,
    cert_fingerprint TEXT NOT NULL UNIQUE,
    enrolled         INTEGER NOT NULL,
    last_seen        INTEGER,
    revoked          INTEGER NOT NULL DEFAULT 0,
    version          TEXT
);

-- Every certificate ever revoked or replaced, so it stays refused for good.
CREATE TABLE revoked_certs (
    fingerprint TEXT PRIMARY KEY,
    host        TEXT NOT NULL,
    revoked     INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE datasources (
    id            TEXT PRIMARY KEY,
    host          TEXT NOT NULL,
    vm            TEXT NOT NULL,
    vm_id         TEXT,
    provider      TEXT NOT NULL,
    disks         TEXT NOT NULL,          -- JSON [VmDisk]
    size          INTEGER NOT NULL,       -- sum of the disks' virtual sizes
    present       INTEGER NOT NULL DEFAULT 1,
    replica_state TEXT NOT NULL DEFAULT 'unprotected',
    first_seen    INTEGER NOT NULL,
    last_seen     INTEGER NOT NULL,
    UNIQUE (host, vm)
);
CREATE INDEX datasources_vm_id ON datasources (vm_id) WHERE vm_id IS NOT NULL;

CREATE TABLE groups (
    name    TEXT PRIMARY KEY,
    policy  TEXT NOT NULL,                -- JSON Policy
    created INTEGER NOT NULL
);

-- UNIQUE (datasource_id): a VM belongs to at most one protection group.
CREATE TABLE group_members (
    group_name    TEXT NOT NULL REFERENCES groups (name) ON DELETE CASCADE,
    datasource_id TEXT NOT NULL UNIQUE REFERENCES datasources (id) ON DELETE CASCADE
);
CREATE INDEX group_members_group ON group_members (group_name);

-- A mirror of the datastore's manifests (no foreign key: a rebuilt catalog may hold
-- recovery points of data sources no agent reports any more).
CREATE TABLE recovery_points (
    id            TEXT PRIMARY KEY,
    datasource_id TEXT NOT NULL,
    vm            TEXT NOT NULL,
    created       TEXT NOT NULL,
    created_unix  INTEGER NOT NULL,
    consistency   TEXT NOT NULL,
    base          TEXT,
    disks         TEXT NOT NULL,          -- JSON [VmDisk]
    stats         TEXT NOT NULL,          -- JSON Stats
    job_id        INTEGER
);
CREATE INDEX recovery_points_ds ON recovery_points (datasource_id, created_unix, id);
CREATE INDEX recovery_points_created ON recovery_points (created_unix, id);

CREATE TABLE jobs (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    kind           TEXT NOT NULL,
    state          TEXT NOT NULL,
    datasource_id  TEXT,
    vm             TEXT,                  -- HOST/VM when the job was made
    trigger        TEXT NOT NULL,
    created        INTEGER NOT NULL,
    started        INTEGER,
    finished       INTEGER,
    not_before     INTEGER,
    attempt        INTEGER NOT NULL DEFAULT 1,
    rerun_of       INTEGER,
    bytes_done     INTEGER NOT NULL DEFAULT 0,
    bytes_total    INTEGER NOT NULL DEFAULT 0,
    bytes_read     INTEGER NOT NULL DEFAULT 0,
    bytes_sent     INTEGER NOT NULL DEFAULT 0,
    recovery_point TEXT,
    error          TEXT,
    error_kind     TEXT
);
CREATE INDEX jobs_state ON jobs (state, id);
CREATE INDEX jobs_ds_state ON jobs (datasource_id, state, finished);
CREATE INDEX jobs_ds_created ON jobs (datasource_id, created, id);

CREATE TABLE job_log (
    id      INTEGER PRIMARY KEY,
    job_id  INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    time    INTEGER NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX job_log_job ON job_log (job_id, id);

CREATE TABLE alerts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    severity    TEXT NOT NULL,
    subject     TEXT NOT NULL,
    kind        TEXT NOT NULL,
    message     TEXT NOT NULL,
    raised      INTEGER NOT NULL,
    last_seen   INTEGER NOT NULL,
    resolved    INTEGER,
    occurrences INTEGER NOT NULL DEFAULT 1
);
-- At most one open alert per subject and kind: repeats update it.
CREATE UNIQUE INDEX alerts_open ON alerts (subject, kind) WHERE resolved IS NULL;

CREATE TABLE schedule_runs (
    key       TEXT PRIMARY KEY,
    last_unix INTEGER NOT NULL
) WITHOUT ROWID;
"#;
