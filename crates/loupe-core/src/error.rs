//! One error type for the whole engine. Every variant names the file, field or value at fault, so the
//! CLI can print it as a single line.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },

    #[error("{}: field `{field}`: {msg}", path.display())]
    Config {
        path: PathBuf,
        field: String,
        msg: String,
    },

    #[error("{}: unsupported model_type `{model_type}` (supported: {supported})", path.display())]
    UnsupportedModel {
        path: PathBuf,
        model_type: String,
        supported: String,
    },

    #[error("model `{model}` not found: {msg}")]
    ModelNotFound { model: String, msg: String },

    #[error("{}: {msg}", path.display())]
    Weights { path: PathBuf, msg: String },

    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?} in {}", path.display())]
    TensorShape {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("tensor `{name}` not found in the weights of {}", path.display())]
    MissingTensor { name: String, path: PathBuf },

    #[error("image {}: {msg}", path.display())]
    Image { path: PathBuf, msg: String },

    #[error("tokenizer {}: {msg}", path.display())]
    Tokenizer { path: PathBuf, msg: String },

    #[error("chat template: {0}")]
    Template(String),

    #[error("{0}")]
    InvalidInput(String),

    /// A size a file or a request controls is over its limit.
    #[error("{what}: {found}, over the limit of {limit} (raise it with --allow {name}=N)")]
    Limit {
        what: String,
        found: String,
        limit: u64,
        name: String,
    },

    #[error("grammar: {0}")]
    Grammar(String),

    #[error("tensor operation failed: {}", first_line(.0))]
    Tensor(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Config {
            path: path.into(),
            field: field.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn image(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::Image {
            path: path.into(),
            msg: msg.to_string(),
        }
    }
}

/// The first line of an error message (candle appends a backtrace to some of its errors).
pub(crate) fn first_line(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_owned()
}

/// Reads a JSON file into `T`, naming the file in every error.
/// The file may be at most the `json-bytes` limit.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let bytes = crate::limits::read_file(path, crate::limits::get().json_bytes, "json-bytes")?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

thread_local! {
    static CONTAINED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Runs a third-party parser that may panic on malformed input (libjpeg through mozjpeg,
/// `tokenizers`' decoder and normalizer readers), turning a panic into `Err(message)`. While it
/// runs, [`panic_is_contained`] is true on this thread, so the binary's panic hook stays quiet.
pub fn contain<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    CONTAINED.with(|c| c.set(c.get() + 1));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CONTAINED.with(|c| c.set(c.get() - 1));
    out.map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the parser failed".into())
    })
}

/// True while [`contain`] runs on this thread: a panic now is a malformed input, handled.
pub fn panic_is_contained() -> bool {
    CONTAINED.with(|c| c.get() > 0)
}
