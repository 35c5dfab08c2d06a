//! A safetensors file: header, offsets, then every tensor read at its stored shape.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;
use candle_core::{DType, Device};
use loupe_core::load::weights::Weights;

fuzz_target!(|data: &[u8]| {
    common::hook();
    let dir = std::env::temp_dir().join(format!("loupe-fuzz-st-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("model.safetensors");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let Ok(w) = Weights::open(&[path], DType::F32, &Device::Cpu, |n| n.to_owned()) else {
        return;
    };
    for name in w.names() {
        if let Some(shape) = w.shape(&name) {
            let _ = w.get(&name, &shape);
        }
    }
});

