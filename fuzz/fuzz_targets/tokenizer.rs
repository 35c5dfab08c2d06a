//! tokenizer.json bytes, then an encode and a decode of a fixed text.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;
use loupe_core::tokenize::Tokenizer;

fuzz_target!(|data: &[u8]| {
    common::hook();
    let Ok(t) = Tokenizer::from_bytes(data, std::path::Path::new("tokenizer.json")) else { return };
    if let Ok(ids) = t.encode("Inspect <|image_pad|> this part: scratch, dent?") {
        let _ = t.decode(&ids);
    }
});
