//! A GGUF file: the bounded header walk, candle's parser, then everything Loupe reads from the
//! metadata (config, tokenizer, chat template).
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;
use loupe_core::load::gguf::GgufModel;

fuzz_target!(|data: &[u8]| {
    common::hook();
    let dir = std::env::temp_dir().join(format!("loupe-fuzz-gguf-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("model.gguf");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let Ok(g) = GgufModel::open(&path) else { return };
    if let Ok(cfg) = g.config_json(None) {
        let _ = loupe_core::load::config::Qwen2VlConfig::from_value(&path, &cfg);
    }
    if let Ok(t) = g.tokenizer_json() {
        let _ = loupe_core::tokenize::Tokenizer::from_bytes(t.as_bytes(), &path);
    }
    let _ = g.chat_template();
    let _ = g.projector();
    let _ = g.preprocessor_json();
});
