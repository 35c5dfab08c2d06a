//! The audit log: one row per inspected image (time, image and weights hashes, spec hash, prompt,
//! raw model output, verdict, boxes, timings), and the outbox of records still to publish to the
//! plant (MQTT), written in the same transaction so a crash never loses one or the other.
//!
//! Two stores behind one small trait: SQLite (a file; WAL mode with a busy timeout so several
//! `loupe inspect` processes can write at once without losing a row) and PostgreSQL (`--db
//! postgres://...`, the same schema and queries, for many stations or several `loupe serve`
//! replicas sharing one database).

#[cfg(feature = "postgres")]
mod postgres;
mod sqlite;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::inspector::Record;
use crate::spec::hex;

/// SHA-256 of some bytes (image and weights hashes).
pub fn sha256(bytes: &[u8]) -> Vec<u8> {
    Sha256::digest(bytes).to_vec()
}

/// Loupe's folder in the user's data folder: `$XDG_DATA_HOME/loupe`, else `~/.local/share/loupe`.
fn data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("loupe")
}

/// `$LOUPE_DB`, else `$XDG_DATA_HOME/loupe/audit.sqlite`, else `~/.local/share/loupe/audit.sqlite`.
pub fn default_path() -> PathBuf {
    if let Some(p) = std::env::var_os("LOUPE_DB") {
        return PathBuf::from(p);
    }
    data_dir().join("audit.sqlite")
}

/// The note in the data folder naming the SQLite database an inspection last wrote.
fn last_written_note() -> PathBuf {
    data_dir().join("last-audit-db")
}

/// Notes that an inspection wrote to the SQLite database at `path`, so that `loupe history` without
/// `--db` reads it. A PostgreSQL address is not noted (it may hold a password). Best effort: a
/// data folder that cannot be written only loses the note.
pub fn note_written(path: &Path) {
    if is_postgres(path) {
        return;
    }
    let Ok(path) = std::path::absolute(path) else {
        return;
    };
    let note = last_written_note();
    let Some(dir) = note.parent() else { return };
    let tmp = dir.join(format!(".last-audit-db.{}", std::process::id()));
    let written = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&tmp, path.as_os_str().as_encoded_bytes()))
        .and_then(|()| std::fs::rename(&tmp, &note));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// A path written as its bytes (any bytes on Unix; UTF-8 elsewhere).
fn path_from_bytes(b: Vec<u8>) -> Option<PathBuf> {
    #[cfg(unix)]
    return Some(PathBuf::from(
        <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(b),
    ));
    #[cfg(not(unix))]
    String::from_utf8(b).ok().map(PathBuf::from)
}

/// The database `loupe history` reads: `--db`, else `$LOUPE_DB`, else the SQLite file an
/// inspection last wrote (while it exists), else [`default_path`]; with where the choice came from.
pub fn path_to_read(db: Option<&Path>) -> (PathBuf, &'static str) {
    if let Some(p) = db {
        return (p.to_path_buf(), "--db");
    }
    if let Some(p) = std::env::var_os("LOUPE_DB") {
        return (PathBuf::from(p), "$LOUPE_DB");
    }
    let last = std::fs::read(last_written_note())
        .ok()
        .and_then(path_from_bytes)
        .filter(|p| p.is_file());
    match last {
        Some(p) => (p, "the last inspection's"),
        None => (default_path(), "the default"),
    }
}

/// Whether `--db` names a PostgreSQL database rather than a SQLite file.
pub fn is_postgres(target: &Path) -> bool {
    target
        .to_str()
        .is_some_and(|s| s.starts_with("postgres://") || s.starts_with("postgresql://"))
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
    /// The anomaly detector's score and flag, when the spec had `[anomaly]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anomaly_score: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anomalous: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anomaly_threshold: Option<f64>,
}

/// The anomaly columns, added after the table is made (so a database made before them gains them
/// too).
const ANOMALY_COLUMNS: [(&str, &str, &str); 4] = [
    // (name, SQLite type, PostgreSQL type)
    ("anomaly_score", "REAL", "DOUBLE PRECISION"),
    ("anomaly_threshold", "REAL", "DOUBLE PRECISION"),
    ("anomalous", "INTEGER", "BOOLEAN"),
    ("anomaly_regions_json", "TEXT", "TEXT"),
];

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

    fn since_ms(&self) -> Option<i64> {
        self.since.map(|t| {
            t.duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64)
        })
    }
}

/// A record still to publish: its outbox id, topic and JSON payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub id: i64,
    pub topic: String,
    pub payload: String,
}

/// What an audit database does; SQLite and PostgreSQL each implement it with the same schema.
trait Store: Send {
    /// Inserts the record; with `topic`, also its outbox row (the record's JSON with its `id`),
    /// in the same transaction. Returns the row id.
    fn append(&mut self, r: &Row, topic: Option<&str>) -> Result<i64>;
    fn done(&mut self, spec_sha256: &str) -> Result<HashSet<(String, String)>>;
    fn history(&mut self, f: &Filter) -> Result<Vec<HistoryRow>>;
    fn weight_hash(&mut self, key: &str, size: i64, mtime_ns: i64) -> Result<Option<String>>;
    fn put_weight_hash(&mut self, key: &str, size: i64, mtime_ns: i64, sha: &str) -> Result<()>;
    /// Outbox rows after `after`, oldest first.
    fn outbox(&mut self, after: i64, limit: usize) -> Result<Vec<Outgoing>>;
    /// The broker has the message: its row goes.
    fn sent(&mut self, id: i64) -> Result<()>;
}

/// A record in the columns both stores write.
struct Row<'a> {
    r: &'a Record,
    unix_ms: i64,
    image: String,
    defects: String,
    verdict: Option<&'static str>,
    model_verdict: Option<&'static str>,
    anomaly_score: Option<f64>,
    anomaly_threshold: Option<f64>,
    anomalous: Option<bool>,
    anomaly_regions: Option<String>,
}

impl<'a> Row<'a> {
    fn new(r: &'a Record) -> Result<Row<'a>> {
        Ok(Row {
            r,
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
            image: r.image.display().to_string(),
            defects: serde_json::to_string(&r.defects)
                .map_err(|e| Error::InvalidInput(format!("defects: {e}")))?,
            verdict: r.verdict.map(|v| v.as_str()),
            model_verdict: r.model_verdict.map(|v| v.as_str()),
            anomaly_score: r.anomaly.as_ref().map(|a| f64::from(a.score)),
            anomaly_threshold: r.anomaly.as_ref().map(|a| f64::from(a.threshold)),
            anomalous: r.anomaly.as_ref().map(|a| a.anomalous),
            anomaly_regions: r
                .anomaly
                .as_ref()
                .map(|a| serde_json::to_string(&a.regions).unwrap_or_default()),
        })
    }

    /// What is published: the record as `loupe inspect --json` writes it, with its audit id.
    fn payload(&self, id: i64) -> String {
        let mut v = serde_json::to_value(self.r).unwrap_or(serde_json::Value::Null);
        v["id"] = serde_json::json!(id);
        v.to_string()
    }
}

pub struct AuditLog {
    /// The file, or the database URL with its password hidden.
    name: PathBuf,
    store: Box<dyn Store>,
}

impl AuditLog {
    /// Opens (creating if need be) the audit database `target`: a SQLite file, or a PostgreSQL
    /// URL (`postgres://user@host/db`).
    pub fn open(target: &Path) -> Result<AuditLog> {
        if is_postgres(target) {
            #[cfg(feature = "postgres")]
            {
                let url = target.to_str().unwrap_or_default();
                let name = PathBuf::from(postgres::redact(url));
                let store = postgres::PgStore::connect(url, &name)?;
                Ok(AuditLog {
                    name,
                    store: Box::new(store),
                })
            }
            #[cfg(not(feature = "postgres"))]
            Err(Error::InvalidInput(
                "this build of Loupe has no PostgreSQL audit log (loupe-inspect's `postgres` \
                 feature); use a SQLite file"
                    .into(),
            ))
        } else {
            Ok(AuditLog {
                name: target.to_path_buf(),
                store: Box::new(sqlite::SqliteStore::open(target)?),
            })
        }
    }

    /// The database as messages name it.
    pub fn name(&self) -> &Path {
        &self.name
    }

    /// Appends one record (its own transaction; concurrent writers queue, they do not fail).
    pub fn append(&mut self, r: &Record) -> Result<i64> {
        self.store.append(&Row::new(r)?, None)
    }

    /// Appends one record and queues it for publishing on `topic`, atomically.
    pub fn append_and_queue(&mut self, r: &Record, topic: &str) -> Result<i64> {
        self.store.append(&Row::new(r)?, Some(topic))
    }

    /// The images already inspected under the spec with this hash, without an error: their path
    /// as recorded and their SHA-256 (`--resume` skips an image whose file still has that hash).
    pub fn done(&mut self, spec_sha256: &str) -> Result<HashSet<(String, String)>> {
        self.store.done(spec_sha256)
    }

    /// Newest first.
    pub fn history(&mut self, f: &Filter) -> Result<Vec<HistoryRow>> {
        self.store.history(f)
    }

    /// Records waiting to be published, oldest first, after outbox id `after`.
    pub fn outbox(&mut self, after: i64, limit: usize) -> Result<Vec<Outgoing>> {
        self.store.outbox(after, limit)
    }

    /// Marks an outbox row as delivered (removes it).
    pub fn sent(&mut self, id: i64) -> Result<()> {
        self.store.sent(id)
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
            let digest = match self.store.weight_hash(&key, size, mtime_ns)? {
                Some(d) => d,
                None => {
                    let d = hash_file(f)?;
                    self.store.put_weight_hash(&key, size, mtime_ns, &d)?;
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

/// Turns any database error into one naming the database.
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

#[cfg(test)]
mod anomaly_columns {
    use super::*;

    fn record(anomaly: serde_json::Value) -> Record {
        serde_json::from_value(serde_json::json!({
            "time": "2026-12-04T00:00:00Z", "image": "a.png", "image_sha256": null, "spec": "s",
            "spec_sha256": "x", "model": "m", "weights_sha256": null, "verdict": "fail",
            "model_verdict": null, "defects": [], "fail_score": null, "frame": null,
            "raw_output": "", "prompt_tokens": 0, "output_tokens": 0, "error": null,
            "timings": {}, "anomaly": anomaly
        }))
        .unwrap()
    }

    /// A database from before the anomaly columns gains them: its old rows read empty, new rows
    /// carry score, threshold, flag and regions.
    #[test]
    fn an_old_database_gains_the_anomaly_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let c = rusqlite::Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE inspections (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL,
                 unix_ms INTEGER NOT NULL, image TEXT NOT NULL, image_sha256 TEXT, model TEXT NOT NULL,
                 weights_sha256 TEXT, spec TEXT NOT NULL, spec_sha256 TEXT NOT NULL, prompt TEXT NOT NULL,
                 raw_output TEXT NOT NULL, verdict TEXT, model_verdict TEXT, defects_json TEXT NOT NULL,
                 fail_score REAL, error TEXT, vision_ms REAL, prefill_ms REAL, decode_ms REAL, total_ms REAL);
                 INSERT INTO inspections (time, unix_ms, image, model, spec, spec_sha256, prompt,
                 raw_output, verdict, defects_json) VALUES ('t', 1, 'old.png', 'm', 's', 'x', '', '',
                 'pass', '[]');",
            )
            .unwrap();
        }
        let mut log = AuditLog::open(&path).unwrap();
        let rec = record(serde_json::json!({
            "score": 7.5, "threshold": 5.0, "anomalous": true, "regions": [[1, 2, 3, 4]], "ms": 1.0
        }));
        log.append(&rec).unwrap();
        let all = Filter {
            limit: 10,
            ..Filter::default()
        };
        let rows = log.history(&all).unwrap();
        assert_eq!(
            (rows[0].anomaly_score, rows[0].anomalous),
            (Some(7.5), Some(true))
        );
        assert_eq!((rows[1].anomaly_score, rows[1].anomalous), (None, None));
        let c = rusqlite::Connection::open(&path).unwrap();
        let (t, regions): (f64, String) = c
            .query_row(
                "SELECT anomaly_threshold, anomaly_regions_json FROM inspections WHERE image = 'a.png'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((t, regions.as_str()), (5.0, "[[1,2,3,4]]"));
        // Opening it again adds nothing twice.
        drop(log);
        AuditLog::open(&path).unwrap();
    }
}
