//! `loupe history`: the audit log, newest first, filtered.

use std::path::PathBuf;
use std::process::ExitCode;

use loupe_inspect::audit::{self, AuditLog, Filter};
use loupe_inspect::inspector::{anomaly_summary, class_counts};
use loupe_inspect::{Error, Result};

#[derive(clap::Args, Debug)]
pub struct HistoryArgs {
    /// Audit database: a SQLite file or postgres://user@host/db (default: $LOUPE_DB, else the SQLite
    /// file `loupe inspect` or `serve` wrote last, else the user's data folder, loupe/audit.sqlite).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Only this verdict: pass, fail or error.
    #[arg(long)]
    pub verdict: Option<String>,
    /// Only this spec (its `name`).
    #[arg(long)]
    pub spec: Option<String>,
    /// Only images whose path contains this text.
    #[arg(long)]
    pub image: Option<String>,
    /// Only records at or after this time (RFC 3339, e.g. 2026-11-24 or 2026-11-24T08:00:00Z).
    #[arg(long)]
    pub since: Option<String>,
    /// Most rows to show.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

pub fn history(args: HistoryArgs) -> Result<ExitCode> {
    let filter = Filter::parse(
        args.verdict.as_deref(),
        args.spec.as_deref(),
        args.image.as_deref(),
        args.since.as_deref(),
        args.limit,
    )
    .map_err(|e| Error::InvalidInput(format!("--{e}")))?;
    let (path, whence) = audit::path_to_read(args.db.as_deref());
    if !audit::is_postgres(&path) && !path.is_file() {
        return Err(Error::InvalidInput(format!(
            "no audit log at {} ({whence}; run `loupe inspect` first, or give --db)",
            path.display()
        )));
    }
    let mut log = AuditLog::open(&path)?;
    let rows = log.history(&filter)?;
    if args.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r).unwrap_or_default());
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.db.is_none() {
        eprintln!("audit log: {} ({whence})", path.display());
    }
    if rows.is_empty() {
        eprintln!("no inspections match");
        return Ok(ExitCode::SUCCESS);
    }
    let spec_w = rows
        .iter()
        .map(|r| r.spec.chars().count())
        .max()
        .unwrap_or(0)
        .max(4);
    let image_w = rows
        .iter()
        .map(|r| r.image.chars().count())
        .max()
        .unwrap_or(0)
        .clamp(5, 60);
    println!(
        "{:>6}  {:<25}  {:<7}  {:<spec_w$}  {:<image_w$}  FINDINGS",
        "ID", "TIME", "VERDICT", "SPEC", "IMAGE"
    );
    for r in &rows {
        println!(
            "{:>6}  {:<25}  {:<7}  {:<spec_w$}  {:<image_w$}  {}",
            r.id,
            r.time,
            r.verdict.as_deref().unwrap_or("error"),
            r.spec,
            r.image,
            findings(r)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// What was found, in a few words: the defect classes (with a count where one repeats), the
/// anomaly score against its threshold, or the error.
fn findings(r: &audit::HistoryRow) -> String {
    if let Some(e) = &r.error {
        return e.clone();
    }
    let classes = r.defects.as_array().into_iter().flatten();
    let mut parts = class_counts(classes.map(|d| d["class"].as_str().unwrap_or("?")));
    if let Some(score) = r.anomaly_score {
        parts.push(match r.anomaly_threshold {
            Some(t) => anomaly_summary(score, t, r.anomalous == Some(true)),
            None => format!("anomaly {score:.3}"),
        });
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}
