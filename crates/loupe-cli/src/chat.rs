//! `loupe chat`: an interactive conversation in the terminal, streamed, with the model's own chat
//! template. Earlier turns stay in the decoder's cache (`Conversation`), so a turn runs only its new
//! text. Ctrl-C stops the answer being written and keeps the conversation; Ctrl-D leaves.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use loupe_core::generate::{Conversation, GenerateParams};
use loupe_core::image::ImageInput;
use loupe_core::tokenize::Message;
use loupe_core::{Engine, Error, Result};
use rustyline::error::ReadlineError;

use crate::run::SamplingArgs;
use crate::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// System prompt (change it in the chat with /system).
    #[arg(long)]
    pub system: Option<String>,
    /// Thinking models (Qwen3, Qwen3.5): `on` or `off` sets the chat template's `enable_thinking`.
    #[arg(long, value_parser = ["on", "off"])]
    pub thinking: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

const HELP: &str = "\
/image PATH   attach an image to your next message (vision models)
/system TEXT  set the system prompt (no text: remove it)
/reset        start a new conversation
/save FILE    write the conversation as JSON
/help         this list
/quit         leave (or Ctrl-D); Ctrl-C stops an answer";

/// One turn as the user wrote it, kept for the template and for /save.
struct Turn {
    role: &'static str,
    text: String,
    images: Vec<PathBuf>,
}

struct Chat {
    engine: Engine,
    conversation: Conversation,
    system: Option<String>,
    turns: Vec<Turn>,
    /// Images of the turns, in order (what the prompt's placeholders stand for).
    images: Vec<ImageInput>,
    /// Attached with /image, for the next message.
    pending: Vec<(PathBuf, ImageInput)>,
    params: GenerateParams,
}

pub fn chat(args: ChatArgs) -> Result<()> {
    if args.max_tokens == 0 {
        return Err(Error::InvalidInput(
            "--max-tokens must be at least 1".into(),
        ));
    }
    let mut engine = args.model.load()?;
    engine.template.enable_thinking = args.thinking.as_deref().map(|t| t == "on");
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        sampling: args.sampling.resolve(&engine.generation_config)?,
        stop_strings: vec![],
        eos_token_ids: engine.eos_token_ids(),
        grammar: None,
    };
    keep_output_on_interrupt();
    let mut editor = rustyline::DefaultEditor::new()
        .map_err(|e| Error::InvalidInput(format!("cannot open the terminal: {e}")))?;
    // After the editor: it sets its own SIGINT handler when it opens the terminal.
    watch_interrupt()?;
    let mut chat = Chat {
        conversation: Conversation::new(&engine),
        engine,
        system: args.system,
        turns: Vec::new(),
        images: Vec::new(),
        pending: Vec::new(),
        params,
    };
    eprintln!(
        "loupe chat: {} ({}). /help for commands, Ctrl-D to leave.",
        chat.engine.model.architecture(),
        chat.engine.files.dir.display()
    );
    loop {
        let line = match editor.readline("> ") {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(Error::InvalidInput(format!("reading the terminal: {e}"))),
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line);
        let outcome = match line.strip_prefix('/') {
            Some(command) => chat.command(command),
            None => chat.say(line).map(|()| true),
        };
        match outcome {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => eprintln!("loupe: {e}"),
        }
    }
    Ok(())
}

/// Set by Ctrl-C (SIGINT) while an answer streams; cleared before each answer.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Makes SIGINT set [`INTERRUPTED`] (at the prompt the line editor reads Ctrl-C as a key, the
/// terminal being raw). Must run after the editor opens the terminal: rustyline then sets a SIGINT
/// handler of its own that only writes to its pipe, so ours would never run. Ours replaces it for
/// as long as the editor lives, with no chaining: signal-hook would call rustyline's after ours,
/// leaving a byte in its pipe that a later window resize reads as a Ctrl-C at the prompt (the line
/// being typed is lost). rustyline's `signal-hook` feature would leave SIGINT alone, but its reader
/// then waits on the terminal with keys already in its buffer: typed lines hang.
fn watch_interrupt() -> Result<()> {
    #[cfg(unix)]
    {
        extern "C" fn on_sigint(_: libc::c_int) {
            INTERRUPTED.store(true, Ordering::Relaxed);
        }
        // SAFETY: a zeroed sigaction with its handler, an empty mask and SA_RESTART set; the
        // handler only stores to an atomic (async-signal-safe).
        let failed = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigint as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut()) != 0
        };
        if failed {
            let e = std::io::Error::last_os_error();
            return Err(Error::InvalidInput(format!("cannot watch Ctrl-C: {e}")));
        }
    }
    #[cfg(not(unix))]
    // SAFETY: the action only stores to an atomic.
    unsafe {
        signal_hook::low_level::register(signal_hook::consts::SIGINT, || {
            INTERRUPTED.store(true, Ordering::Relaxed)
        })
        .map_err(|e| Error::InvalidInput(format!("cannot watch Ctrl-C: {e}")))?;
    }
    Ok(())
}

/// A Ctrl-C while an answer streams must not discard what the terminal has not shown yet: by
/// default the terminal flushes its queues on the interrupt character (`NOFLSH` clear).
fn keep_output_on_interrupt() {
    #[cfg(unix)]
    // SAFETY: tcgetattr/tcsetattr on stdin with a termios value they fill and read; failure (not a
    // terminal) leaves everything as it was.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(libc::STDIN_FILENO, &mut t) == 0 {
            t.c_lflag |= libc::NOFLSH;
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t);
        }
    }
}

impl Chat {
    /// Runs a `/command`; `false` to leave.
    fn command(&mut self, command: &str) -> Result<bool> {
        let (name, arg) = command.split_once(' ').unwrap_or((command, ""));
        let arg = arg.trim();
        match name {
            "quit" | "exit" => return Ok(false),
            "help" => eprintln!("{HELP}"),
            "reset" => {
                self.turns.clear();
                self.images.clear();
                self.pending.clear();
                self.conversation.reset(&self.engine);
                eprintln!("(new conversation)");
            }
            "system" => {
                self.system = (!arg.is_empty()).then(|| arg.to_string());
                eprintln!(
                    "(system prompt {})",
                    if arg.is_empty() { "removed" } else { "set" }
                );
            }
            "image" => {
                if arg.is_empty() {
                    return Err(Error::InvalidInput(
                        "/image needs a file: /image PATH".into(),
                    ));
                }
                if self.engine.model.vision_depth() == 0 {
                    return Err(Error::InvalidInput(format!(
                        "{} takes no images",
                        self.engine.model.architecture()
                    )));
                }
                let path = PathBuf::from(arg);
                let image = Engine::load_images(&[&path])?.remove(0);
                eprintln!("(image {} attached to your next message)", path.display());
                self.pending.push((path, image));
            }
            "save" => {
                if arg.is_empty() {
                    return Err(Error::InvalidInput("/save needs a file: /save FILE".into()));
                }
                self.save(Path::new(arg))?;
                eprintln!("(saved to {arg})");
            }
            other => {
                return Err(Error::InvalidInput(format!(
                    "no command /{other}; /help lists them"
                )))
            }
        }
        Ok(true)
    }

    fn messages(&self) -> Vec<Message> {
        let mut out: Vec<Message> = self
            .system
            .as_deref()
            .map(Message::system)
            .into_iter()
            .collect();
        out.extend(self.turns.iter().map(|t| match t.role {
            "assistant" => Message::assistant(&t.text),
            _ => Message::user(t.images.len(), &t.text),
        }));
        out
    }

    /// One user message and the model's streamed answer.
    fn say(&mut self, text: &str) -> Result<()> {
        let (paths, images): (Vec<PathBuf>, Vec<ImageInput>) = self.pending.drain(..).unzip();
        let n_images = self.images.len();
        self.images.extend(images);
        self.turns.push(Turn {
            role: "user",
            text: text.to_string(),
            images: paths,
        });
        let answer = self.answer();
        if answer.is_err() {
            // Leave the conversation as it was before this message.
            self.turns.pop();
            self.images.truncate(n_images);
        }
        answer
    }

    fn answer(&mut self) -> Result<()> {
        let e = &self.engine;
        let prompt = e.prompt_from_messages(&self.messages(), &self.images, &e.preprocessor)?;
        INTERRUPTED.store(false, Ordering::Relaxed);
        let mut stdout = std::io::stdout().lock();
        let (out, stats) =
            self.conversation
                .reply(e, &prompt, &self.params, &INTERRUPTED, &mut |piece| {
                    let _ = stdout.write_all(piece.as_bytes());
                    let _ = stdout.flush();
                })?;
        let _ = writeln!(stdout);
        drop(stdout);
        let t = &out.timings;
        let decoded = out.tokens.len().saturating_sub(1);
        eprintln!(
            "[{} tokens, {:.1} tok/s | prompt {} tokens, {} from the cache{}]",
            out.tokens.len(),
            decoded as f64 / (t.decode_ms / 1e3).max(1e-9),
            prompt.ids.len(),
            stats.reused,
            if stats.interrupted { " | stopped" } else { "" }
        );
        self.turns.push(Turn {
            role: "assistant",
            text: out.text,
            images: vec![],
        });
        Ok(())
    }

    fn save(&self, path: &Path) -> Result<()> {
        let messages: Vec<serde_json::Value> = self
            .system
            .iter()
            .map(|s| serde_json::json!({"role": "system", "content": s}))
            .chain(self.turns.iter().map(|t| {
                serde_json::json!({
                    "role": t.role,
                    "content": t.text,
                    "images": t.images.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                })
            }))
            .collect();
        let doc = serde_json::json!({
            "model": self.engine.files.dir.display().to_string(),
            "messages": messages,
        });
        let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
        std::fs::write(path, text + "\n")
            .map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))
    }
}
