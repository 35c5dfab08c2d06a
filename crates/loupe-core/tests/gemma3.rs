//! Gemma 3 against transformers (tools/make_gemma3_fixture.py, transformers 5.23.0) on two tiny
//! random checkpoints with random norm weights: `gemma3` (saved by transformers 5: rope parameters
//! by layer type with the full layers' `linear` scaling, five sliding layers to one full, a window
//! of 8, tied head, GQA) and `published` (Google's config layout: `rope_local_base_freq`,
//! `sliding_window_pattern` 3, a window of 6, `query_pre_attn_scalar` 24, final logits capped at 3,
//! untied head). Stage by stage: the rendered chat template, the prompt's token ids, f32 logits at
//! every position, 20 greedy tokens. Every prompt is longer than the window, so the sliding layers
//! hide keys both in prefill and in decode.
//!
//! `gemma3` as llama.cpp's converter writes it (`gemma3.gguf`: norms stored as `1 + w`, a
//! SentencePiece vocabulary with no merges and spaces stored as spaces, no chat template), checked
//! the same way against transformers' own tokenizer for Gemma GGUFs; and `gemma3-mixed.gguf`, every
//! matrix in one of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, against transformers on the weights as dequantized.

mod common;

use candle_core::DType;
use common::Reference;
use loupe_core::{Engine, LoadOptions};

fn fixture(name: &str) -> std::path::PathBuf {
    common::fixtures().join("gemma3").join(name)
}

fn engine(name: &str) -> Engine {
    let e = Engine::load(
        fixture(name).to_str().unwrap(),
        &LoadOptions {
            dtype: Some(DType::F32),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(e.model_type, "gemma3_text");
    e
}

fn reference(name: &str) -> Reference {
    Reference::load(fixture(&format!("{name}.safetensors")))
}

#[test]
fn gemma3_as_transformers_saves_it_matches_transformers() {
    common::text::check("gemma3", &reference("gemma3"), "", &engine("gemma3"));
}

#[test]
fn gemma3_in_the_published_config_layout_with_a_final_cap_matches_transformers() {
    common::text::check(
        "published",
        &reference("published"),
        "",
        &engine("published"),
    );
}

fn gguf(file: &str) -> Engine {
    let path = fixture(file);
    let e = Engine::load(path.to_str().unwrap(), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    assert_eq!(e.model_type, "gemma3_text");
    e
}

#[test]
fn gemma3_gguf_as_llama_cpp_writes_it_matches_transformers() {
    common::text::check(
        "gemma3",
        &reference("gemma3"),
        "gguf/",
        &gguf("gemma3.gguf"),
    );
}

#[test]
fn every_32_block_format_matches_transformers_on_gemma3s_dequantized_weights() {
    common::text::check_mixed(&reference("gemma3"), &gguf("gemma3-mixed.gguf"));
}

/// The GGUF's end-of-turn token ends an answer: a GGUF has no generation config, so the stop ids
/// come from the vocabulary (`<end_of_turn>`, `<eos>`).
#[test]
fn a_gemma3_gguf_stops_at_its_end_of_turn() {
    let e = gguf("gemma3.gguf");
    let ids = e.eos_token_ids();
    for t in ["<end_of_turn>", "<eos>"] {
        let id = e.tokenizer.token_to_id(t).expect(t);
        assert!(ids.contains(&id), "{t} ({id}) not among {ids:?}");
    }
}

/// Gemma 3's own config errors name the field.
#[test]
fn bad_gemma3_fields_are_one_clear_error() {
    let src = fixture("published");
    for (n, (from, to, field)) in [
        (
            "\"sliding_window\": 6",
            "\"sliding_window\": 0",
            "sliding_window",
        ),
        (
            "\"sliding_window_pattern\": 3",
            "\"sliding_window_pattern\": 0",
            "sliding_window_pattern",
        ),
        (
            "\"query_pre_attn_scalar\": 24",
            "\"query_pre_attn_scalar\": -1",
            "query_pre_attn_scalar",
        ),
        (
            "\"final_logit_softcapping\": 3.0",
            "\"final_logit_softcapping\": 0.0",
            "final_logit_softcapping",
        ),
        (
            "\"rope_local_base_freq\": 10000.0",
            "\"rope_local_base_freq\": \"fast\"",
            "rope_local_base_freq",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let tmp = std::env::temp_dir().join(format!("loupe-gemma3-cfg-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        for f in std::fs::read_dir(&src).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, tmp.join(f.file_name().unwrap())).unwrap();
        }
        let cfg = tmp.join("config.json");
        let text = std::fs::read_to_string(&cfg).unwrap();
        assert!(text.contains(from), "{from} not in the fixture's config");
        std::fs::write(&cfg, text.replace(from, to)).unwrap();
        let e = Engine::load(tmp.to_str().unwrap(), &LoadOptions::default())
            .err()
            .unwrap_or_else(|| panic!("{to}: accepted"))
            .to_string();
        assert!(e.contains("config.json") && e.contains(field), "{to}: {e}");
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
