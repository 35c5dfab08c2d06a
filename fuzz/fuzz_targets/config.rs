//! JSON as config.json, preprocessor_config.json and generation_config.json of every family.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;
use loupe_core::load::config::{PreprocessorConfig, Qwen2VlConfig};

fuzz_target!(|data: &[u8]| {
    common::hook();
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let p = std::path::Path::new("config.json");
    let _ = Qwen2VlConfig::from_value(p, &v);
    let _ = PreprocessorConfig::from_value(p, &v);
    let _ = serde_json::from_value::<loupe_core::load::config::GenerationConfig>(v);
});
