//! Errors of the inspection layer; each names the file, line, field or value at fault.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}:{line}: {msg}", path.display())]
    Spec {
        path: PathBuf,
        line: usize,
        msg: String,
    },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("audit database {}: {msg}", path.display())]
    Audit { path: PathBuf, msg: String },

    #[error("dataset {}: {msg}", path.display())]
    Dataset { path: PathBuf, msg: String },

    #[error("{}: {msg}", path.display())]
    Output { path: PathBuf, msg: String },

    #[error("{0}")]
    InvalidInput(String),

    #[error(transparent)]
    Engine(#[from] loupe_core::Error),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn output(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::Output {
            path: path.into(),
            msg: msg.to_string(),
        }
    }
}
