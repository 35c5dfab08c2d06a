//! The audit log in a SQLite file.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OpenFlags};

use super::{db_err, Filter, HistoryRow, Outgoing, Row, Store, ANOMALY_COLUMNS};
use crate::error::{Error, Result};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS inspections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    unix_ms INTEGER NOT NULL,
    image TEXT NOT NULL,
    image_sha256 TEXT,
    model TEXT NOT NULL,
    weights_sha256 TEXT,
    spec TEXT NOT NULL,
    spec_sha256 TEXT NOT NULL,
    prompt TEXT NOT NULL,
    raw_output TEXT NOT NULL,
    verdict TEXT,
    model_verdict TEXT,
    defects_json TEXT NOT NULL,
    fail_score REAL,
    error TEXT,
    vision_ms REAL, prefill_ms REAL, decode_ms REAL, total_ms REAL
    -- and the anomaly columns (ANOMALY_COLUMNS), added after
);
CREATE INDEX IF NOT EXISTS inspections_time ON inspections(unix_ms);
CREATE TABLE IF NOT EXISTS weight_hashes (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    inspection_id INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload TEXT NOT NULL
);
";

/// How long a writer waits for another to finish before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

pub(super) struct SqliteStore {
    path: PathBuf,
    conn: Connection,
}

impl SqliteStore {
    pub(super) fn open(path: &Path) -> Result<SqliteStore> {
        let err = db_err(path);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        )
        .map_err(err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
        enable_wal(&conn).map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        add_missing_columns(&conn).map_err(err)?;
        Ok(SqliteStore {
            path: path.to_path_buf(),
            conn,
        })
    }
}

impl Store for SqliteStore {
    fn append(&mut self, row: &Row, topic: Option<&str>) -> Result<i64> {
        let r = row.r;
        let err = db_err::<rusqlite::Error>(&self.path);
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        tx.execute(
            "INSERT INTO inspections (time, unix_ms, image, image_sha256, model, weights_sha256, spec,
             spec_sha256, prompt, raw_output, verdict, model_verdict, defects_json, fail_score, error,
             vision_ms, prefill_ms, decode_ms, total_ms, anomaly_score, anomaly_threshold,
             anomalous, anomaly_regions_json)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19,
             ?20, ?21, ?22, ?23)",
            params![
                r.time,
                row.unix_ms,
                row.image,
                r.image_sha256,
                r.model,
                r.weights_sha256,
                r.spec,
                r.spec_sha256,
                r.prompt,
                r.raw_output,
                row.verdict,
                row.model_verdict,
                row.defects,
                r.fail_score,
                r.error,
                r.timings.vision_ms,
                r.timings.prefill_ms,
                r.timings.decode_ms,
                r.timings.total_ms,
                row.anomaly_score,
                row.anomaly_threshold,
                row.anomalous,
                row.anomaly_regions,
            ],
        )
        .map_err(err)?;
        let id = tx.last_insert_rowid();
        if let Some(topic) = topic {
            tx.execute(
                "INSERT INTO outbox (inspection_id, topic, payload) VALUES (?1, ?2, ?3)",
                params![id, topic, row.payload(id)],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(id)
    }

    fn done(&mut self, spec_sha256: &str) -> Result<HashSet<(String, String)>> {
        let err = db_err::<rusqlite::Error>(&self.path);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT image, image_sha256 FROM inspections
                 WHERE spec_sha256 = ?1 AND error IS NULL AND image_sha256 IS NOT NULL",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map(params![spec_sha256], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(err)
    }

    fn history(&mut self, f: &Filter) -> Result<Vec<HistoryRow>> {
        let err = db_err::<rusqlite::Error>(&self.path);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, time, image, image_sha256, spec, model, verdict, defects_json, error, total_ms,
                 anomaly_score, anomalous, anomaly_threshold
                 FROM inspections
                 WHERE (?1 IS NULL OR COALESCE(verdict, 'error') = ?1)
                   AND (?2 IS NULL OR spec = ?2)
                   AND (?3 IS NULL OR instr(image, ?3) > 0)
                   AND (?4 IS NULL OR unix_ms >= ?4)
                 ORDER BY id DESC LIMIT ?5",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map(
                params![f.verdict, f.spec, f.image, f.since_ms(), f.limit as i64],
                |row| {
                    let defects: String = row.get(7)?;
                    Ok(HistoryRow {
                        id: row.get(0)?,
                        time: row.get(1)?,
                        image: row.get(2)?,
                        image_sha256: row.get(3)?,
                        spec: row.get(4)?,
                        model: row.get(5)?,
                        verdict: row.get(6)?,
                        defects: serde_json::from_str(&defects).unwrap_or(serde_json::Value::Null),
                        error: row.get(8)?,
                        total_ms: row.get(9)?,
                        anomaly_score: row.get(10)?,
                        anomalous: row.get(11)?,
                        anomaly_threshold: row.get(12)?,
                    })
                },
            )
            .map_err(err)?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(err)
    }

    fn weight_hash(&mut self, key: &str, size: i64, mtime_ns: i64) -> Result<Option<String>> {
        match self.conn.query_row(
            "SELECT sha256 FROM weight_hashes WHERE path = ?1 AND size = ?2 AND mtime_ns = ?3",
            params![key, size, mtime_ns],
            |r| r.get(0),
        ) {
            Ok(s) => Ok(Some(s)),
            Err(rusqlite::Error::QueryReturnedNoRows) => Ok(None),
            Err(e) => Err(db_err(&self.path)(e)),
        }
    }

    fn put_weight_hash(&mut self, key: &str, size: i64, mtime_ns: i64, sha: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO weight_hashes (path, size, mtime_ns, sha256) VALUES (?1, ?2, ?3, ?4)",
                params![key, size, mtime_ns, sha],
            )
            .map_err(db_err(&self.path))?;
        Ok(())
    }

    fn outbox(&mut self, after: i64, limit: usize) -> Result<Vec<Outgoing>> {
        let err = db_err::<rusqlite::Error>(&self.path);
        let mut stmt = self
            .conn
            .prepare("SELECT id, topic, payload FROM outbox WHERE id > ?1 ORDER BY id LIMIT ?2")
            .map_err(err)?;
        let rows = stmt
            .query_map(params![after, limit as i64], |r| {
                Ok(Outgoing {
                    id: r.get(0)?,
                    topic: r.get(1)?,
                    payload: r.get(2)?,
                })
            })
            .map_err(err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(err)
    }

    fn sent(&mut self, id: i64) -> Result<()> {
        self.conn
            .execute("DELETE FROM outbox WHERE id = ?1", params![id])
            .map_err(db_err(&self.path))?;
        Ok(())
    }
}

/// The anomaly columns ([`ANOMALY_COLUMNS`], their one definition): added to a new database, and
/// to one written before they existed (empty for its old rows).
/// Under a write lock, so that writers opening one database at once add each column once.
fn add_missing_columns(conn: &Connection) -> rusqlite::Result<()> {
    let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)?;
    let have: Vec<String> = tx
        .prepare("SELECT name FROM pragma_table_info('inspections')")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for (name, ty, _) in ANOMALY_COLUMNS {
        if !have.iter().any(|h| h == name) {
            tx.execute_batch(&format!("ALTER TABLE inspections ADD COLUMN {name} {ty}"))?;
        }
    }
    tx.commit()
}

/// Switches the database to WAL (kept in the file, so only its creator really switches). While
/// another connection is creating the same file, SQLite answers "database is locked" at once,
/// without waiting on the busy timeout: retried here until that timeout.
fn enable_wal(conn: &Connection) -> rusqlite::Result<()> {
    let deadline = Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            done => return done,
        }
    }
}
