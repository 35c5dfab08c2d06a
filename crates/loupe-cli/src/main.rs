//! `loupe`: run small vision-language models on this machine.

mod bench;
mod chat;
mod eval;
mod history;
mod info;
mod inspect;
mod learn;
mod quantize;
mod run;
mod serve;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "loupe",
    version,
    about = "On-device vision-language models for visual inspection"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Raise (or lower) a bound on what a file may make Loupe read, decode or render, e.g.
    /// `--allow image-pixels=400000000`; repeatable. Names and defaults: docs/reliability.md.
    #[arg(long = "allow", global = true, value_name = "NAME=VALUE")]
    limits: Vec<String>,
}

/// Applies the `--allow` settings for the whole process.
fn set_limits(settings: &[String]) -> loupe_core::Result<()> {
    let mut limits = loupe_core::limits::Limits::default();
    for s in settings {
        limits.apply(s)?;
    }
    loupe_core::limits::set(limits);
    Ok(())
}

#[derive(Subcommand)]
enum Command {
    /// Answer one prompt, with images, streaming the text.
    Run(Box<run::RunArgs>),
    /// An interactive conversation in the terminal (/image PATH attaches an image, /help lists the
    /// commands); earlier turns stay in the model's cache.
    Chat(Box<chat::ChatArgs>),
    /// What a model is: architecture, parameters, dtype, memory needed.
    Info(info::InfoArgs),
    /// Speed and memory of a model on this machine, as JSON.
    Bench(bench::BenchArgs),
    /// Write a quantized copy of a model (one GGUF file) that loads without re-quantizing.
    Quantize(quantize::QuantizeArgs),
    /// Pass/fail verdicts with defect boxes for images, folders or a watched folder, with reports.
    /// Exit code: 0 all pass, 1 some fail, 2 an image or the run had an error.
    Inspect(Box<inspect::InspectArgs>),
    /// Learn an anomaly detector from good images only (variation model or patch-feature bank), its
    /// threshold calibrated on held-out good images.
    Learn(Box<learn::LearnArgs>),
    /// How well a spec and model inspect a labelled dataset (MVTec AD, class folders or a CSV).
    Eval(Box<eval::EvalArgs>),
    /// List and filter the audit log of past inspections.
    History(history::HistoryArgs),
    /// Serve the model: OpenAI-compatible chat API with images, inspection API, live page.
    Serve(Box<serve::ServeArgs>),
}

/// Exit code for bad input (files, flags, prompt), as documented.
const EXIT_BAD_INPUT: u8 = 2;

/// Keeps freed tensor buffers in the process instead of returning them to the kernel after every op:
/// with glibc's defaults each large activation is a fresh mmap whose pages are faulted in and zeroed
/// again, which cost a quarter of the vision tower's time on 2 cores.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    // A bug must still end in one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        // A third-party parser's panic on a malformed file, turned into an error by the engine.
        if loupe_core::error::panic_is_contained() {
            return;
        }
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("loupe: internal error{at}: {msg} (please report this)");
    }));
    // Colours only on a terminal: a service's log file gets plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("LOUPE_LOG"))
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .init();
    let cli = match parse_args(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) => return e,
    };
    if let Err(e) = set_limits(&cli.limits) {
        eprintln!("loupe: {e}");
        return ExitCode::from(EXIT_BAD_INPUT);
    }
    let ok = |r: loupe_core::Result<()>| r.map(|()| ExitCode::SUCCESS).map_err(|e| e.to_string());
    let result = match cli.command {
        Command::Run(a) => ok(run::run(*a)),
        Command::Chat(a) => ok(chat::chat(*a)),
        Command::Info(a) => ok(info::info(a)),
        Command::Bench(a) => ok(bench::bench(a)),
        Command::Quantize(a) => ok(quantize::quantize(a)),
        Command::Inspect(a) => inspect::inspect(*a).map_err(|e| e.to_string()),
        Command::Learn(a) => learn::learn(*a)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| e.to_string()),
        Command::Eval(a) => eval::eval(*a).map_err(|e| e.to_string()),
        Command::History(a) => history::history(a).map_err(|e| e.to_string()),
        Command::Serve(a) => serve::serve(*a)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loupe: {e}");
            ExitCode::from(EXIT_BAD_INPUT)
        }
    }
}

/// The command line, or the exit code after help, the version, or one `loupe:` line for a mistake.
fn parse_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Cli, ExitCode> {
    // `--max-tokens -1` must reach the number's parser (a clear "not a whole number"), not be
    // taken for an unknown flag whose tip would make `-1` the prompt.
    let command = Cli::command().mut_subcommands(|c| c.allow_negative_numbers(true));
    command
        .try_get_matches_from(args)
        .and_then(|m| Cli::from_arg_matches(&m))
        .map_err(|e| {
            use clap::error::ErrorKind;
            match e.kind() {
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    let _ = e.print();
                    ExitCode::from(if e.use_stderr() { EXIT_BAD_INPUT } else { 0 })
                }
                _ => {
                    eprintln!("loupe: {}", one_line(&e));
                    ExitCode::from(EXIT_BAD_INPUT)
                }
            }
        })
}

/// A clap error as one line: what is wrong, and a tip where clap has one, without the usage block.
fn one_line(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let text = |k| match e.get(k) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    if matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        if let (Some(arg), Some(value)) = (
            text(ContextKind::InvalidArg),
            text(ContextKind::InvalidValue),
        ) {
            // `--max-tokens <MAX_TOKENS>` reads as `--max-tokens`.
            let flag = arg.split(' ').next().unwrap_or(&arg);
            let why = std::error::Error::source(e)
                .map(|s| s.to_string())
                .unwrap_or_default();
            let wanted = if why.contains("invalid digit") || why.contains("number too large") {
                Some("a whole number, 0 or more")
            } else if why.contains("float") {
                Some("a number")
            } else {
                None
            };
            if let Some(wanted) = wanted {
                return format!("{flag}: `{value}` is not {wanted}");
            }
        }
    }
    let rendered = e.render().to_string();
    let mut parts = Vec::new();
    for line in rendered.lines() {
        let line = line.trim();
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if !line.is_empty() {
            parts.push(line.strip_prefix("error: ").unwrap_or(line));
        }
    }
    format!("{} (--help lists the options)", parts.join(" "))
}

/// Sets the number of compute threads; must run before any parallel work starts.
pub fn set_threads(threads: Option<usize>) -> loupe_core::Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            return Err(loupe_core::Error::InvalidInput(
                "--threads must be at least 1".into(),
            ));
        }
        // candle reads RAYON_NUM_THREADS for its matmuls and builds rayon's pool from it.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    Ok(())
}

/// A progress bar on stderr with `template` (indicatif's syntax), hidden when stderr is not a terminal.
pub fn progress_bar(len: u64, template: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Options shared by every command that loads a model.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A model directory (Hugging Face layout), a hub id found in the local Hugging Face cache, or a
    /// llama.cpp GGUF file.
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// The vision file (mmproj) of a llama.cpp GGUF vision model (default: the one mmproj*.gguf
    /// beside the model file).
    #[arg(long)]
    pub mmproj: Option<std::path::PathBuf>,
    /// Compute dtype: f32, bf16 or f16 (default: the checkpoint's).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Quantize the projections at load: q8_0, q6_k, q5_k, q4_k or q4_0 (computes in f32).
    #[arg(long)]
    pub quant: Option<String>,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl ModelArgs {
    pub fn load(&self) -> loupe_core::Result<loupe_core::Engine> {
        self.load_or(None)
    }

    /// Loads `--model`, else `fallback` (a spec's model).
    pub fn load_or(&self, fallback: Option<&str>) -> loupe_core::Result<loupe_core::Engine> {
        let model = self
            .model
            .as_deref()
            .or(fallback)
            .ok_or_else(|| loupe_core::Error::InvalidInput("--model is required".into()))?;
        set_threads(self.threads)?;
        let dtype = self
            .dtype
            .as_deref()
            .map(loupe_core::engine::parse_dtype)
            .transpose()?;
        let quant = self
            .quant
            .as_deref()
            .map(loupe_core::engine::parse_quant)
            .transpose()?;
        loupe_core::Engine::load(
            model,
            &loupe_core::LoadOptions {
                dtype,
                quant,
                mmproj: self.mmproj.clone(),
                ..Default::default()
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_and_argument_is_described_in_help() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        let mut missing = Vec::new();
        for sub in cli.get_subcommands() {
            for a in sub.get_arguments() {
                let described = a
                    .get_help()
                    .is_some_and(|h| !h.to_string().trim().is_empty());
                if !described && !a.is_hide_set() && a.get_id() != "help" {
                    missing.push(format!("loupe {} {}", sub.get_name(), a.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "no description: {missing:?}");
    }

    fn error_line(args: &[&str]) -> String {
        let args = std::iter::once("loupe").chain(args.iter().copied());
        let e = Cli::command()
            .mut_subcommands(|c| c.allow_negative_numbers(true))
            .try_get_matches_from(args)
            .expect_err("a parse error");
        one_line(&e)
    }

    #[test]
    fn numbers_out_of_range_read_as_one_line_naming_the_flag() {
        assert_eq!(
            error_line(&["run", "--max-tokens", "-1", "hi"]),
            "--max-tokens: `-1` is not a whole number, 0 or more"
        );
        assert_eq!(
            error_line(&["chat", "--top-p", "most"]),
            "--top-p: `most` is not a number"
        );
        let unknown = error_line(&["history", "--limt", "3"]);
        assert!(!unknown.contains('\n'), "{unknown}");
        assert!(
            unknown.contains("'--limit'"),
            "clap's tip is kept: {unknown}"
        );
        // A negative number is a value, so it reaches the command's own range checks.
        let cli =
            parse_args(["loupe", "run", "--temperature", "-1", "hi"].map(std::ffi::OsString::from));
        assert!(cli.is_ok());
    }
}
