//! `loupe inspect`: verdicts for files, folders, or a watched folder; overlays, JSON Lines, CSV, an
//! HTML report, and a row per image in the audit log.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use indicatif::ProgressBar;
use loupe_inspect::audit::{self, AuditLog};
use loupe_inspect::inspector::{collect_images, is_image_name, ReuseMode};
use loupe_inspect::report::RunOutputs;
use loupe_inspect::verdict::Outcome;
use loupe_inspect::{overlay, Error, Inspector, Record, Result, Spec};

use crate::{progress_bar, ModelArgs};

/// Options shared by `inspect` and `eval`.
#[derive(clap::Args, Debug)]
pub struct SessionArgs {
    /// The inspection spec (TOML; see examples/inspection.toml).
    #[arg(long)]
    pub spec: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Folder for overlays, results.jsonl, results.csv and report.html.
    #[arg(long, default_value = "loupe-out")]
    pub out: PathBuf,
    /// Audit database: a SQLite file or postgres://user@host/db (default: $LOUPE_DB, else the user's
    /// data folder, loupe/audit.sqlite). `loupe history` reads the SQLite file written last.
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Do not write the audit log.
    #[arg(long, conflicts_with = "db")]
    pub no_audit: bool,
    /// What to reuse between images: prefix (KV state of the shared prompt), features (reference
    /// images' vision features only) or none.
    #[arg(long, default_value = "prefix")]
    pub reuse: String,
}

/// A loaded spec and model with its outputs and audit log.
pub struct Session {
    pub engine: loupe_core::Engine,
    pub spec: Spec,
    pub audit: Option<AuditLog>,
    pub reuse: ReuseMode,
    /// SHA-256 of the weights (with the audit log, which caches it).
    pub weights_sha256: Option<String>,
}

impl SessionArgs {
    pub fn open(&self) -> Result<Session> {
        let reuse = ReuseMode::parse(&self.reuse).map_err(Error::InvalidInput)?;
        let spec = Spec::load(&self.spec)?;
        let mut audit = if self.no_audit {
            None
        } else {
            let path = self.db.clone().unwrap_or_else(audit::default_path);
            let log = AuditLog::open(&path)?;
            audit::note_written(&path);
            Some(log)
        };
        let engine = self.model.load_or(spec.model.as_deref())?;
        // Hashed once per weights file; later runs read the digest from the database.
        let weights_sha256 = match audit.as_mut() {
            Some(a) => Some(a.weights_sha256(&engine.files.weights)?),
            None => None,
        };
        Ok(Session {
            engine,
            spec,
            audit,
            reuse,
            weights_sha256,
        })
    }
}

impl Session {
    pub fn inspector(&self) -> Result<Inspector<'_>> {
        let mut i = Inspector::new(&self.engine, self.spec.clone(), self.reuse)?;
        i.weights_sha256 = self.weights_sha256.clone();
        Ok(i)
    }
}

/// Records a finished image everywhere it goes: outputs (with overlays), audit log.
pub fn record(
    outputs: &mut RunOutputs,
    audit: Option<&mut AuditLog>,
    spec: &Spec,
    rec: &Record,
    upright: Option<&loupe_core::image::RgbImage>,
) -> Result<()> {
    let classes: Vec<String> = spec.defects.iter().map(|d| d.name.clone()).collect();
    let draw = |img, heat| overlay::draw(img, rec, heat, &classes, &spec.name);
    let ov = upright.map(|img| draw(img, false));
    // With an anomaly map, a second overlay with the heatmap (the report toggles between them).
    let heat = upright
        .filter(|_| rec.anomaly.as_ref().is_some_and(|a| a.map.is_some()))
        .map(|img| draw(img, true));
    outputs.add(rec, ov.as_ref(), heat.as_ref())?;
    if let Some(a) = audit {
        a.append(rec)?;
    }
    Ok(())
}

/// One line per image for the terminal.
pub fn summary_line(rec: &Record) -> String {
    let what = match (&rec.error, rec.verdict) {
        (Some(e), _) => format!("ERROR {e}"),
        (None, Some(v)) => {
            let boxes: Vec<String> = rec
                .defects
                .iter()
                .map(|d| format!("{} {:?}", d.class, d.box_px))
                .collect();
            let mut why = rec.reason();
            if !boxes.is_empty() {
                // The classes with their boxes, and the anomaly score where it counted.
                why = boxes.join(", ");
                if let Some(a) = rec.anomaly.as_ref().filter(|a| a.anomalous) {
                    why = format!("{why}, {}", a.summary());
                }
            }
            format!("{} {why}", v.as_str().to_uppercase())
        }
        (None, None) => "ERROR".into(),
    };
    format!(
        "{}  {}  ({:.0} ms)",
        rec.image.display(),
        what.trim_end(),
        rec.timings.total_ms
    )
}

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    pub session: SessionArgs,
    /// Watch this folder and inspect each new image once it is completely written.
    #[arg(long)]
    pub watch: Option<PathBuf>,
    /// With --watch: stop after this many images (default: run until interrupted).
    #[arg(long)]
    pub max_images: Option<usize>,
    /// With --watch: how often to look for new files, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub poll_ms: u64,
    /// Print each record as a JSON line on stdout instead of a summary line.
    #[arg(long)]
    pub json: bool,
    /// Continue an interrupted run: keep the records already in --out, and skip every image that
    /// the audit log (or results.jsonl) holds for this spec without an error and whose file is
    /// unchanged (same SHA-256).
    #[arg(long)]
    pub resume: bool,
    /// Images and folders to inspect.
    pub paths: Vec<PathBuf>,
}

#[derive(Default)]
struct Tally {
    pass: usize,
    fail: usize,
    error: usize,
}

impl Tally {
    fn add(&mut self, r: &Record) {
        match (&r.error, r.verdict) {
            (None, Some(Outcome::Pass)) => self.pass += 1,
            (None, Some(Outcome::Fail)) => self.fail += 1,
            _ => self.error += 1,
        }
    }

    fn exit_code(&self) -> ExitCode {
        if self.error > 0 {
            ExitCode::from(2)
        } else if self.fail > 0 {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        }
    }

    fn message(&self) -> String {
        format!(
            "{} pass, {} fail, {} error",
            self.pass, self.fail, self.error
        )
    }
}

pub fn inspect(args: InspectArgs) -> Result<ExitCode> {
    if args.paths.is_empty() && args.watch.is_none() {
        return Err(Error::InvalidInput(
            "give images or folders to inspect, or --watch DIR".into(),
        ));
    }
    if let Some(w) = &args.watch {
        if !w.is_dir() {
            return Err(Error::InvalidInput(format!(
                "--watch {}: not a folder",
                w.display()
            )));
        }
    }
    let files = collect_images(&args.paths)?;
    if args.watch.is_none() && files.is_empty() {
        return Err(Error::InvalidInput(
            "no image files found in the given paths".into(),
        ));
    }
    let mut session = args.session.open()?;
    let spec = session.spec.clone();
    let mut audit = session.audit.take();
    let prior = if args.resume {
        RunOutputs::read_records(&args.session.out)?
    } else {
        Vec::new()
    };
    let (files, skipped) = if args.resume {
        // What is done: the audit log says (a record in results.jsonl may lack its audit row when
        // the run died between the two); without an audit log, results.jsonl.
        let done: HashSet<(String, String)> = match &mut audit {
            Some(a) => a.done(&spec.sha256)?,
            None => prior
                .iter()
                .filter(|r| r.error.is_none() && r.spec_sha256 == spec.sha256)
                .filter_map(|r| Some((r.image.display().to_string(), r.image_sha256.clone()?)))
                .collect(),
        };
        let before = files.len();
        let rest: Vec<PathBuf> = files
            .into_iter()
            .filter(|f| {
                let Ok(bytes) = std::fs::read(f) else {
                    return true;
                };
                let sha = loupe_inspect::spec::hex(&audit::sha256(&bytes));
                !done.contains(&(f.display().to_string(), sha))
            })
            .collect();
        let skipped = before - rest.len();
        (rest, skipped)
    } else {
        (files, 0)
    };
    let outputs = if args.resume {
        // Records of images about to be inspected again are replaced by their new ones.
        let again: HashSet<&Path> = files.iter().map(PathBuf::as_path).collect();
        let kept = prior
            .into_iter()
            .filter(|r| !again.contains(r.image.as_path()))
            .collect();
        RunOutputs::resume(&args.session.out, kept)?
    } else {
        RunOutputs::create(&args.session.out)?
    };
    let mut inspector = session.inspector()?;

    let mut run = Run {
        outputs,
        audit,
        spec,
        json: args.json,
        tally: Tally::default(),
    };
    if !files.is_empty() {
        let pb = progress_bar(
            files.len() as u64,
            "{bar:30} {pos}/{len} images {msg} [{elapsed}, eta {eta}]",
        );
        for f in &files {
            run.one(&mut inspector, f, &pb)?;
        }
        pb.finish_and_clear();
    }
    if let Some(dir) = &args.watch {
        let pb = ProgressBar::new_spinner();
        pb.set_message(format!(
            "watching {} ({})",
            dir.display(),
            run.tally.message()
        ));
        let mut watcher = Watcher::new(dir)?;
        let mut done = 0;
        while args.max_images.is_none_or(|m| done < m) {
            match watcher.poll()? {
                Some(path) => {
                    run.one(&mut inspector, &path, &pb)?;
                    done += 1;
                    // Keep the report current: a watch runs until interrupted.
                    run.outputs.write_report(&run.spec.name)?;
                }
                None => {
                    pb.tick();
                    std::thread::sleep(Duration::from_millis(args.poll_ms));
                }
            }
        }
        pb.finish_and_clear();
    }
    let (encoded, reused) = inspector.feature_cache_stats();
    drop(inspector);
    let report = run.outputs.finish(&run.spec.name)?;
    let resumed = if args.resume {
        format!(" | {skipped} already inspected, skipped")
    } else {
        String::new()
    };
    eprintln!(
        "{}{resumed} | report {} | images through the vision tower {encoded}, cached features reused {reused}",
        run.tally.message(),
        report.display()
    );
    Ok(run.tally.exit_code())
}

/// Where each finished image goes.
struct Run {
    outputs: RunOutputs,
    audit: Option<AuditLog>,
    spec: Spec,
    json: bool,
    tally: Tally,
}

impl Run {
    fn one(&mut self, inspector: &mut Inspector, path: &Path, pb: &ProgressBar) -> Result<()> {
        let (rec, upright) = inspector.inspect(path);
        self.tally.add(&rec);
        record(
            &mut self.outputs,
            self.audit.as_mut(),
            &self.spec,
            &rec,
            upright.as_ref(),
        )?;
        let line = if self.json {
            serde_json::to_string(&rec).unwrap_or_default()
        } else {
            summary_line(&rec)
        };
        // Results go to stdout (pipeable); the bar lives on stderr.
        pb.suspend(|| println!("{line}"));
        pb.set_message(self.tally.message());
        pb.inc(1);
        Ok(())
    }
}

/// Finds new image files in a folder and hands each out once it is completely written: its size and
/// modification time unchanged across two looks, and not empty. Files present at the start are not
/// new.
struct Watcher {
    dir: PathBuf,
    seen: HashSet<PathBuf>,
    pending: HashMap<PathBuf, (u64, Option<SystemTime>)>,
}

impl Watcher {
    fn new(dir: &Path) -> Result<Watcher> {
        let seen = Self::list(dir)?.into_iter().collect();
        Ok(Watcher {
            dir: dir.to_path_buf(),
            seen,
            pending: HashMap::new(),
        })
    }

    fn list(dir: &Path) -> Result<Vec<PathBuf>> {
        let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        let mut v: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && is_image_name(p)
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        v.sort();
        Ok(v)
    }

    /// The next file that is ready, if any.
    fn poll(&mut self) -> Result<Option<PathBuf>> {
        let mut ready = None;
        for p in Self::list(&self.dir)? {
            if self.seen.contains(&p) {
                continue;
            }
            let Ok(md) = std::fs::metadata(&p) else {
                continue;
            };
            let now = (md.len(), md.modified().ok());
            match self.pending.insert(p.clone(), now) {
                Some(before) if before == now && now.0 > 0 && ready.is_none() => {
                    // A writer that pauses mid-file: wait for the format's end marker, up to a
                    // while after the last write (then the inspection reports the broken file).
                    let recent = now
                        .1
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age < Duration::from_secs(10));
                    if looks_complete(&p) || !recent {
                        ready = Some(p);
                    }
                }
                _ => {}
            }
        }
        if let Some(p) = &ready {
            self.pending.remove(p);
            self.seen.insert(p.clone());
        }
        Ok(ready)
    }
}

/// Whether a PNG or JPEG file ends with its format's end marker (other formats: assumed complete).
fn looks_complete(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let tail_len = 12;
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let mut tail = Vec::new();
    let ok = f.seek(SeekFrom::End(-(tail_len as i64))).is_ok() && f.read_to_end(&mut tail).is_ok();
    match ext.as_deref() {
        Some("png") => ok && tail.len() == tail_len && &tail[4..8] == b"IEND",
        Some("jpg" | "jpeg") => ok && tail.windows(2).any(|w| w == [0xFF, 0xD9]),
        _ => true,
    }
}
