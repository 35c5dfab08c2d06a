//! The audit log: one SQLite row per inspected image (time, image and weights hashes, spec hash,
//! prompt, raw model output, verdict, boxes, timings), in WAL mode with a busy timeout so that several
//! `loupe inspect` processes can write at once without losing a row.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OpenFlags};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::inspector::Record;
use crate::spec::hex;

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
);
CREATE INDEX IF NOT EXISTS inspections_time ON inspections(unix_ms);
CREATE TABLE IF NOT EXISTS weight_hashes (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL
);
";

pub struct AuditLog {
    path: PathBuf,
    conn: Connection,
}

/// SHA-256 of some bytes (image and weights hashes).
pub fn sha256(bytes: &[u8]) -> Vec<u8> {
    Sha256::digest(bytes).to_vec()
}

/// `$LOUPE_DB`, else `$XDG_DATA_HOME/loupe/audit.sqlite`, else `~/.local/share/loupe/audit.sqlite`.
pub fn default_path() -> PathBuf {
    if let Some(p) = std::env::var_os("LOUPE_DB") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("loupe").join("audit.sqlite")
}

/// A row as `loupe history` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryRow {
    pub id: i64,
    pub time: String,
    pub image: String,
    pub image_sha256: Option<String>,
    pub spec: String,
    pub model: String,
    pub verdict: Option<String>,
    pub defects: serde_json::Value,
    pub error: Option<String>,
    pub total_ms: Option<f64>,
}

/// Filters for `loupe history`.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub verdict: Option<String>,
    pub spec: Option<String>,
    /// Substring of the image path.
    pub image: Option<String>,
    /// Only rows at or after this time.
    pub since: Option<SystemTime>,
    pub limit: usize,
}

impl Filter {
    /// A filter from its text form (the `loupe history` flags, the `/v1/history` query): `verdict`
    /// one of pass, fail, error; `since` an RFC 3339 time or a date (`2026-11-24`).
    pub fn parse(
        verdict: Option<&str>,
        spec: Option<&str>,
        image: Option<&str>,
        since: Option<&str>,
        limit: usize,
    ) -> Result<Filter> {
        if let Some(v) = verdict {
            if !matches!(v, "pass" | "fail" | "error") {
                return Err(Error::InvalidInput(format!(
                    "verdict `{v}` is not one of pass, fail, error"
                )));
            }
        }
        let since = since
            .map(|s| {
                let full = if s.len() == 10 {
                    format!("{s}T00:00:00Z")
                } else {
                    s.to_owned()
                };
                humantime::parse_rfc3339_weak(&full)
                    .map_err(|e| Error::InvalidInput(format!("since `{s}`: {e}")))
            })
            .transpose()?;
        Ok(Filter {
            verdict: verdict.map(str::to_owned),
            spec: spec.map(str::to_owned),
            image: image.map(str::to_owned),
            since,
            limit,
        })
    }
}

impl AuditLog {
    pub fn open(path: &Path) -> Result<AuditLog> {
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
        Ok(AuditLog {
            path: path.to_path_buf(),
            conn,
        })
    }

    /// Appends one record (its own transaction, taken immediately so writers queue, not fail).
    pub fn append(&mut self, r: &Record) -> Result<i64> {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let defects = serde_json::to_string(&r.defects).map_err(db_err(&self.path))?;
        let err = db_err::<rusqlite::Error>(&self.path);
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        tx.execute(
            "INSERT INTO inspections (time, unix_ms, image, image_sha256, model, weights_sha256, spec,
             spec_sha256, prompt, raw_output, verdict, model_verdict, defects_json, fail_score, error,
             vision_ms, prefill_ms, decode_ms, total_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)",
            params![
                r.time,
                unix_ms,
                r.image.display().to_string(),
                r.image_sha256,
                r.model,
                r.weights_sha256,
                r.spec,
                r.spec_sha256,
                r.prompt,
                r.raw_output,
                r.verdict.map(|v| v.as_str()),
                r.model_verdict.map(|v| v.as_str()),
                defects,
                r.fail_score,
                r.error,
                r.timings.vision_ms,
                r.timings.prefill_ms,
                r.timings.decode_ms,
                r.timings.total_ms,
            ],
        )
        .map_err(err)?;
        let id = tx.last_insert_rowid();
        tx.commit().map_err(err)?;
        Ok(id)
    }

    /// The images already inspected under the spec with this hash, without an error: their path
    /// as recorded and their SHA-256 (`--resume` skips an image whose file still has that hash).
    pub fn done(&self, spec_sha256: &str) -> Result<std::collections::HashSet<(String, String)>> {
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
        rows.collect::<rusqlite::Result<_>>()
            .map_err(db_err(&self.path))
    }

    /// Newest first.
    pub fn history(&self, f: &Filter) -> Result<Vec<HistoryRow>> {
        let since_ms = f.since.map(|t| {
            t.duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64)
        });
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, time, image, image_sha256, spec, model, verdict, defects_json, error, total_ms
                 FROM inspections
                 WHERE (?1 IS NULL OR COALESCE(verdict, 'error') = ?1)
                   AND (?2 IS NULL OR spec = ?2)
                   AND (?3 IS NULL OR instr(image, ?3) > 0)
                   AND (?4 IS NULL OR unix_ms >= ?4)
                 ORDER BY id DESC LIMIT ?5",
            )
            .map_err(db_err(&self.path))?;
        let rows = stmt
            .query_map(
                params![f.verdict, f.spec, f.image, since_ms, f.limit as i64],
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
                    })
                },
            )
            .map_err(db_err(&self.path))?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(db_err(&self.path))
    }

    /// SHA-256 of a model's weight files (in order, one digest over all), cached in the database by
    /// path, size and modification time so that multi-GB weights are hashed once, not every run.
    pub fn weights_sha256(&mut self, files: &[PathBuf]) -> Result<String> {
        let mut all = Sha256::new();
        let mut digests = Vec::with_capacity(files.len());
        for f in files {
            let md = std::fs::metadata(f).map_err(|e| Error::io(f, e))?;
            let size = md.len() as i64;
            let mtime_ns = md
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as i64);
            let key = f
                .canonicalize()
                .unwrap_or_else(|_| f.clone())
                .display()
                .to_string();
            let cached: Option<String> = self
                .conn
                .query_row(
                    "SELECT sha256 FROM weight_hashes WHERE path = ?1 AND size = ?2 AND mtime_ns = ?3",
                    params![key, size, mtime_ns],
                    |r| r.get(0),
                )
                .ok();
            let digest = match cached {
                Some(d) => d,
                None => {
                    let d = hash_file(f)?;
                    self.conn
                        .execute(
                            "INSERT OR REPLACE INTO weight_hashes (path, size, mtime_ns, sha256) VALUES (?1, ?2, ?3, ?4)",
                            params![key, size, mtime_ns, d],
                        )
                        .map_err(db_err(&self.path))?;
                    d
                }
            };
            all.update(digest.as_bytes());
            digests.push(digest);
        }
        Ok(match digests.as_slice() {
            // One file: its own digest, comparable with `sha256sum`.
            [one] => one.clone(),
            _ => hex(&all.finalize()),
        })
    }
}

/// How long a writer waits for another to finish before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

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

/// Turns any database error into one naming the database file.
fn db_err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> Error + Copy + '_ {
    move |e| Error::Audit {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

fn hash_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Several writers creating the same new database at once all open it (SQLite answers the
    /// first switch to WAL with "database is locked", busy timeout or not, while another connection
    /// is creating the file).
    #[test]
    fn writers_creating_one_database_at_once_all_open_it() {
        let dir = std::env::temp_dir().join(format!("loupe-audit-race-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for round in 0..40 {
            let path = dir.join(format!("{round}.sqlite"));
            let start = std::sync::Barrier::new(4);
            let opened: Vec<Result<AuditLog>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4)
                    .map(|_| {
                        s.spawn(|| {
                            start.wait();
                            AuditLog::open(&path)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for r in opened {
                if let Err(e) = r {
                    panic!("round {round}: {e}");
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
