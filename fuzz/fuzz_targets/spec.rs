//! An inspection spec's TOML (references, classes, rules), parsed and its schema derived.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    common::hook();
    let Ok(src) = std::str::from_utf8(data) else { return };
    let dir = std::env::temp_dir();
    let _ = loupe_inspect::Spec::parse(src, &dir.join("fuzz-spec.toml"));
});
