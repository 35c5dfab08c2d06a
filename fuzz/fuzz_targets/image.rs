//! Image bytes -> decode (header checked against the pixel limit first) -> resize, normalize,
//! patchify, under a small pixel budget so each input stays fast.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;
use loupe_core::image::{decode, ImageInput, Preprocessor};
use loupe_core::load::config::PreprocessorConfig;

fuzz_target!(|data: &[u8]| {
    common::hook();
    let mut limits = loupe_core::limits::Limits::default();
    limits.image_pixels = 4_000_000;
    loupe_core::limits::set(limits);
    let Ok(image) = decode(data) else { return };
    let pre = Preprocessor::new(PreprocessorConfig {
        max_pixels: 28 * 28 * 64,
        ..PreprocessorConfig::default()
    });
    let input = ImageInput { source: "fuzz".into(), image };
    let _ = pre.preprocess(&[input]);
});
