//! Loupe's engine: from bytes on disk to generated tokens.
//!
//! The data flow is the module layout: [`load`] (files, configs, weights) → [`tokenize`] and [`image`]
//! (tokens and pixels) → [`models`] (logits) → [`generate`] (tokens, text). [`engine::Engine`] holds
//! one loaded model with everything around it.

pub mod engine;
pub mod error;
pub mod generate;
pub mod image;
pub mod kernels;
pub mod limits;
pub mod load;
pub mod models;
pub mod tokenize;

pub use engine::{Engine, LoadOptions};
pub use error::{Error, Result};
