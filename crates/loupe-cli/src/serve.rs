//! `loupe serve`: the model behind an OpenAI-compatible API, the inspection API and the live
//! inspection page (docs/serving.md).

use std::path::PathBuf;

use loupe_inspect::audit;
use loupe_inspect::inspector::ReuseMode;
use loupe_inspect::{Error, Result, Spec};

use crate::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// An inspection spec to serve on /v1/inspect (repeatable; chosen by its `name`).
    #[arg(long = "spec")]
    pub specs: Vec<PathBuf>,
    /// Address to listen on; anything but loopback without an API key prints a warning.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free one; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* and /metrics.
    #[arg(long, conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// Read the API key from this file (first line).
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Answers generated at once; each decode step runs them as one batch.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Run the decode steps of the answers one after the other instead of as one batch (for
    /// measuring what batching gains).
    #[arg(long)]
    pub no_batch: bool,
    /// Requests that may wait for the model; more are answered 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// A folder whose images `file://` URLs may name (repeatable); none by default.
    #[arg(long = "allow-path")]
    pub allow_paths: Vec<PathBuf>,
    /// Largest request body in bytes (base64 images included).
    #[arg(long, default_value_t = 32 << 20)]
    pub max_body_bytes: usize,
    /// Most tokens one answer may ask for, and the default when it asks nothing.
    #[arg(long, default_value_t = 2048)]
    pub max_tokens: usize,
    /// Largest decoded image in pixels (width x height) a request may send.
    #[arg(long, default_value_t = 50_000_000)]
    pub max_image_pixels: u64,
    /// The model's id in /v1/models (default: the model folder's or file's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Audit database for inspections: a SQLite file or postgres://user@host/db (default: $LOUPE_DB,
    /// else the user's data folder).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Keep no audit log.
    #[arg(long, conflicts_with_all = ["db", "mqtt"])]
    pub no_audit: bool,
    /// Publish every verdict (its JSON record, QoS 1) to mqtt://host[:port]/topic; kept in the audit
    /// database while the broker is away.
    #[arg(long)]
    pub mqtt: Option<String>,
    /// What inspections reuse between images: prefix, features or none.
    #[arg(long, default_value = "prefix")]
    pub reuse: String,
}

pub fn serve(args: ServeArgs) -> Result<()> {
    let reuse = ReuseMode::parse(&args.reuse).map_err(Error::InvalidInput)?;
    let mqtt = args
        .mqtt
        .as_deref()
        .map(loupe_server::mqtt::Target::parse)
        .transpose()
        .map_err(Error::InvalidInput)?;
    if args.parallel == 0 || args.max_queue == 0 || args.max_tokens == 0 {
        return Err(Error::InvalidInput(
            "--parallel, --max-queue and --max-tokens must be at least 1".into(),
        ));
    }
    let api_key = match &args.api_key_file {
        Some(f) => {
            let text = std::fs::read_to_string(f).map_err(|e| Error::io(f, e))?;
            let key = text.lines().next().unwrap_or("").trim().to_owned();
            if key.is_empty() {
                return Err(Error::InvalidInput(format!(
                    "--api-key-file {}: the file is empty",
                    f.display()
                )));
            }
            Some(key)
        }
        None => args.api_key.clone(),
    };
    if api_key.as_deref().is_some_and(str::is_empty) {
        return Err(Error::InvalidInput("--api-key is empty".into()));
    }
    let specs = args
        .specs
        .iter()
        .map(|p| Spec::load(p))
        .collect::<Result<Vec<_>>>()?;
    let mut names = std::collections::HashSet::new();
    for s in &specs {
        if !names.insert(s.name.clone()) {
            return Err(Error::InvalidInput(format!(
                "two specs are named `{}`; requests choose a spec by name",
                s.name
            )));
        }
    }
    // The model: --model, else the one every spec names.
    let spec_model = specs.first().and_then(|s| s.model.clone());
    let model_arg = args
        .model
        .model
        .clone()
        .or(spec_model)
        .ok_or_else(|| Error::InvalidInput("--model is required".into()))?;
    let mut lim = loupe_core::limits::get();
    lim.image_pixels = lim.image_pixels.min(args.max_image_pixels);
    loupe_core::limits::set(lim);
    let engine = args.model.load_or(Some(&model_arg))?;
    let name = args.name.clone().unwrap_or_else(|| {
        let p = std::path::Path::new(&model_arg);
        if p.exists() {
            p.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| model_arg.clone())
        } else {
            model_arg.clone()
        }
    });
    let db = if args.no_audit {
        None
    } else {
        let path = args.db.clone().unwrap_or_else(audit::default_path);
        audit::note_written(&path);
        Some(path)
    };
    let opts = loupe_server::Options {
        host: args.host.clone(),
        port: args.port,
        api_key,
        parallel: args.parallel,
        batch: !args.no_batch,
        max_queue: args.max_queue,
        allow_paths: args.allow_paths.clone(),
        max_body_bytes: args.max_body_bytes,
        max_tokens: args.max_tokens,
        model_name: name,
        model_aliases: vec![model_arg],
        db,
        reuse,
        mqtt,
    };
    loupe_server::serve(engine, specs, opts).map_err(Error::InvalidInput)
}
