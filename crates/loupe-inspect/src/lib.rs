//! The inspection domain on top of the engine: a spec says what a good part is and which defects to
//! look for; the model answers under a JSON schema derived from it; boxes are mapped from the model's
//! coordinate convention to the pixels of the original image; every answer becomes a verdict, an
//! overlay, a report row and an audit record; `eval` measures a spec and model on a labelled dataset.
//!
//! Data flow: `spec` -> `schema` -> engine (constrained) -> `verdict` (+ `boxes`) -> `overlay`,
//! `report`, `audit`; `eval` runs the same path over a dataset and scores it.

pub mod anomaly;
pub mod audit;
pub mod boxes;
pub mod error;
pub mod eval;
pub mod inspector;
pub mod overlay;
pub mod report;
pub mod schema;
pub mod spec;
pub mod verdict;

pub use error::{Error, Result};
pub use inspector::{Inspector, Record};
pub use spec::Spec;
