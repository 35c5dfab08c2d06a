//! `loupe history`: the audit log, newest first, filtered.

use std::path::PathBuf;
use std::process::ExitCode;

use loupe_inspect::audit::{self, AuditLog, Filter};
use loupe_inspect::{Error, Result};

#[derive(clap::Args, Debug)]
pub struct HistoryArgs {
    /// Audit database: a SQLite file or postgres://user@host/db (default: $LOUPE_DB, else the user's
    /// data folder, loupe/audit.sqlite).
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
    let path = args.db.clone().unwrap_or_else(audit::default_path);
    if !audit::is_postgres(&path) && !path.is_file() {
        return Err(Error::InvalidInput(format!(
            "no audit log at {} (run `loupe inspect` first, or give --db)",
            path.display()
        )));
    }
    let mut log = AuditLog::open(&path)?;
    let rows = log.history(&filter)?;
    for r in &rows {
        if args.json {
            println!("{}", serde_json::to_string(r).unwrap_or_default());
        } else {
            let n = r.defects.as_array().map_or(0, Vec::len);
            println!(
                "{:>6}  {}  {:<5}  {:<16}  {} ({n} defect{}){}",
                r.id,
                r.time,
                r.verdict.as_deref().unwrap_or("error"),
                r.spec,
                r.image,
                if n == 1 { "" } else { "s" },
                r.error
                    .as_deref()
                    .map(|e| format!("  {e}"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
