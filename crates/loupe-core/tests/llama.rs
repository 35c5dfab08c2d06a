//! Llama against transformers (tools/make_llama_fixture.py, transformers 5.23.0) on two tiny random
//! checkpoints: `llama3` (GQA, `rope_type: llama3` scaling with a 32-token original context, untied
//! head) and `linear` (multi-head, tied, `linear` scaling, every bias). Stage by stage: the rendered
//! chat template, the prompt's token ids, f32 logits at every position, 20 greedy tokens. The `long`
//! prompt (83 tokens) runs past the original context.
//!
//! The same checkpoints as llama.cpp's converter writes them (`<name>.gguf`: q/k rows interleaved,
//! llama3 scaling as `rope_freqs.weight`, the `llama-bpe` and `smollm` pre-tokenizers), checked the
//! same way; and `llama3-mixed.gguf`, every matrix in one of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, against
//! transformers on the weights as dequantized.

mod common;

use common::Reference;
use loupe_core::{Engine, LoadOptions};

fn engine(name: &str) -> Engine {
    common::text::engine("llama", name, "llama")
}

fn reference(name: &str) -> Reference {
    common::text::reference("llama", name)
}

fn check(name: &str) {
    check_as(name, "", &engine(name));
}

/// `e` (the checkpoint `name` in some form) against the reference's `{prefix}{prompt}/...` entries.
fn check_as(name: &str, prefix: &str, e: &Engine) {
    assert_eq!(e.model_type, "llama");
    common::text::check(name, &reference(name), prefix, e);
}

#[test]
fn llama3_scaled_rope_gqa_untied_matches_transformers() {
    check("llama3");
}

#[test]
fn linear_scaled_rope_tied_with_biases_matches_transformers() {
    check("linear");
}

fn gguf(file: &str) -> Engine {
    let path = common::fixtures().join("llama").join(file);
    Engine::load(path.to_str().unwrap(), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{file}: {e}"))
}

#[test]
fn llama3_gguf_as_llama_cpp_writes_it_matches_transformers() {
    check_as("llama3", "gguf/", &gguf("llama3.gguf"));
}

#[test]
fn linear_gguf_with_biases_and_smollm_tokenizer_matches_transformers() {
    check_as("linear", "gguf/", &gguf("linear.gguf"));
}

#[test]
fn every_32_block_format_matches_transformers_on_its_dequantized_weights() {
    common::text::check_mixed(&reference("llama3"), &gguf("llama3-mixed.gguf"));
}

#[test]
fn an_unsupported_rope_scaling_is_one_clear_error() {
    let tmp = std::env::temp_dir().join(format!("loupe-llama-rope-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let src = common::fixtures().join("llama/llama3");
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, tmp.join(f.file_name().unwrap())).unwrap();
    }
    let cfg = tmp.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"llama3\"", "\"dynamic\"");
    std::fs::write(&cfg, text).unwrap();
    let e = Engine::load(tmp.to_str().unwrap(), &LoadOptions::default())
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("config.json") && e.contains("rope_type") && e.contains("`dynamic`"),
        "{e}"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}
