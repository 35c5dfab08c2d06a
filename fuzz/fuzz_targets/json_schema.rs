//! A `--json-schema` file (and a spec-derived schema's shape) compiled into a token constraint on
//! the committed Qwen2 test tokenizer, then a few tokens masked.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;
use loupe_core::generate::{ConstraintFactory, Grammar};
use loupe_core::tokenize::Tokenizer;

fn factory() -> &'static ConstraintFactory {
    static F: OnceLock<ConstraintFactory> = OnceLock::new();
    F.get_or_init(|| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/qwen2_vl/gqa2_tied_published");
        let t = Tokenizer::from_file(&std::path::Path::new(dir).join("tokenizer.json")).unwrap();
        ConstraintFactory::new(&t, &[422]).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    common::hook();
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let _ = factory().constraint(&Grammar::JsonSchema(v));
});
