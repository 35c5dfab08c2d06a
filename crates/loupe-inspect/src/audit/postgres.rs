//! The audit log in PostgreSQL: the same tables and queries as the SQLite file, through the
//! `postgres` crate (the synchronous face of `tokio-postgres`), so several stations or `loupe serve`
//! replicas write one database and stay stateless themselves.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use postgres::{Client, NoTls};

use super::{db_err, Filter, HistoryRow, Outgoing, Row, Store, ANOMALY_COLUMNS};
use crate::error::Result;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS inspections (
    id BIGSERIAL PRIMARY KEY,
    time TEXT NOT NULL,
    unix_ms BIGINT NOT NULL,
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
    fail_score DOUBLE PRECISION,
    error TEXT,
    vision_ms DOUBLE PRECISION, prefill_ms DOUBLE PRECISION, decode_ms DOUBLE PRECISION,
    total_ms DOUBLE PRECISION
    -- and the anomaly columns (ANOMALY_COLUMNS), added after
);
CREATE INDEX IF NOT EXISTS inspections_time ON inspections(unix_ms);
CREATE TABLE IF NOT EXISTS weight_hashes (
    path TEXT PRIMARY KEY, size BIGINT NOT NULL, mtime_ns BIGINT NOT NULL, sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id BIGSERIAL PRIMARY KEY,
    inspection_id BIGINT NOT NULL,
    topic TEXT NOT NULL,
    payload TEXT NOT NULL
);
";

/// The URL with any password replaced by `***`, for messages.
pub(super) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((user, host)) if user.contains(':') => {
            let name = user.split(':').next().unwrap_or("");
            format!("{scheme}://{name}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

pub(super) struct PgStore {
    name: PathBuf,
    client: Client,
}

impl PgStore {
    pub(super) fn connect(url: &str, name: &Path) -> Result<PgStore> {
        let err = db_err(name);
        let mut client = Client::connect(url, NoTls).map_err(err)?;
        // Two servers starting at once both create the tables: one waits for the other.
        let mut tx = client.transaction().map_err(err)?;
        tx.execute("SELECT pg_advisory_xact_lock(7110070)", &[])
            .map_err(err)?;
        tx.batch_execute(SCHEMA).map_err(err)?;
        // The anomaly columns, in a new database and in one made before they existed.
        for (name, _, ty) in ANOMALY_COLUMNS {
            tx.batch_execute(&format!(
                "ALTER TABLE inspections ADD COLUMN IF NOT EXISTS {name} {ty}"
            ))
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(PgStore {
            name: name.to_path_buf(),
            client,
        })
    }
}

impl Store for PgStore {
    fn append(&mut self, row: &Row, topic: Option<&str>) -> Result<i64> {
        let r = row.r;
        let err = db_err::<postgres::Error>(&self.name);
        let mut tx = self.client.transaction().map_err(err)?;
        let inserted = tx
            .query_one(
                "INSERT INTO inspections (time, unix_ms, image, image_sha256, model, weights_sha256, spec,
                 spec_sha256, prompt, raw_output, verdict, model_verdict, defects_json, fail_score, error,
                 vision_ms, prefill_ms, decode_ms, total_ms, anomaly_score, anomaly_threshold,
             anomalous, anomaly_regions_json)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19,
                 $20, $21, $22, $23)
                 RETURNING id",
                &[
                    &r.time,
                    &row.unix_ms,
                    &row.image,
                    &r.image_sha256,
                    &r.model,
                    &r.weights_sha256,
                    &r.spec,
                    &r.spec_sha256,
                    &r.prompt,
                    &r.raw_output,
                    &row.verdict,
                    &row.model_verdict,
                    &row.defects,
                    &r.fail_score,
                    &r.error,
                    &r.timings.vision_ms,
                    &r.timings.prefill_ms,
                    &r.timings.decode_ms,
                    &r.timings.total_ms,
                    &row.anomaly_score,
                    &row.anomaly_threshold,
                    &row.anomalous,
                    &row.anomaly_regions,
                ],
            )
            .map_err(err)?;
        let id: i64 = inserted.get(0);
        if let Some(topic) = topic {
            tx.execute(
                "INSERT INTO outbox (inspection_id, topic, payload) VALUES ($1, $2, $3)",
                &[&id, &topic, &row.payload(id)],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(id)
    }

    fn done(&mut self, spec_sha256: &str) -> Result<HashSet<(String, String)>> {
        let rows = self
            .client
            .query(
                "SELECT image, image_sha256 FROM inspections
                 WHERE spec_sha256 = $1 AND error IS NULL AND image_sha256 IS NOT NULL",
                &[&spec_sha256],
            )
            .map_err(db_err(&self.name))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    fn history(&mut self, f: &Filter) -> Result<Vec<HistoryRow>> {
        let rows = self
            .client
            .query(
                "SELECT id, time, image, image_sha256, spec, model, verdict, defects_json, error, total_ms,
                 anomaly_score, anomalous, anomaly_threshold
                 FROM inspections
                 WHERE ($1::TEXT IS NULL OR COALESCE(verdict, 'error') = $1)
                   AND ($2::TEXT IS NULL OR spec = $2)
                   AND ($3::TEXT IS NULL OR strpos(image, $3) > 0)
                   AND ($4::BIGINT IS NULL OR unix_ms >= $4)
                 ORDER BY id DESC LIMIT $5",
                &[&f.verdict, &f.spec, &f.image, &f.since_ms(), &(f.limit as i64)],
            )
            .map_err(db_err(&self.name))?;
        Ok(rows
            .iter()
            .map(|row| {
                let defects: String = row.get(7);
                HistoryRow {
                    id: row.get(0),
                    time: row.get(1),
                    image: row.get(2),
                    image_sha256: row.get(3),
                    spec: row.get(4),
                    model: row.get(5),
                    verdict: row.get(6),
                    defects: serde_json::from_str(&defects).unwrap_or(serde_json::Value::Null),
                    error: row.get(8),
                    total_ms: row.get(9),
                    anomaly_score: row.get(10),
                    anomalous: row.get(11),
                    anomaly_threshold: row.get(12),
                }
            })
            .collect())
    }

    fn weight_hash(&mut self, key: &str, size: i64, mtime_ns: i64) -> Result<Option<String>> {
        let row = self
            .client
            .query_opt(
                "SELECT sha256 FROM weight_hashes WHERE path = $1 AND size = $2 AND mtime_ns = $3",
                &[&key, &size, &mtime_ns],
            )
            .map_err(db_err(&self.name))?;
        Ok(row.map(|r| r.get(0)))
    }

    fn put_weight_hash(&mut self, key: &str, size: i64, mtime_ns: i64, sha: &str) -> Result<()> {
        self.client
            .execute(
                "INSERT INTO weight_hashes (path, size, mtime_ns, sha256) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (path) DO UPDATE SET size = $2, mtime_ns = $3, sha256 = $4",
                &[&key, &size, &mtime_ns, &sha],
            )
            .map_err(db_err(&self.name))?;
        Ok(())
    }

    fn outbox(&mut self, after: i64, limit: usize) -> Result<Vec<Outgoing>> {
        let rows = self
            .client
            .query(
                "SELECT id, topic, payload FROM outbox WHERE id > $1 ORDER BY id LIMIT $2",
                &[&after, &(limit as i64)],
            )
            .map_err(db_err(&self.name))?;
        Ok(rows
            .iter()
            .map(|r| Outgoing {
                id: r.get(0),
                topic: r.get(1),
                payload: r.get(2),
            })
            .collect())
    }

    fn sent(&mut self, id: i64) -> Result<()> {
        self.client
            .execute("DELETE FROM outbox WHERE id = $1", &[&id])
            .map_err(db_err(&self.name))?;
        Ok(())
    }
}
