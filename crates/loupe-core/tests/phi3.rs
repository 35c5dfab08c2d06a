//! Phi-3 against transformers (tools/make_phi3_fixture.py, transformers 5.23.0) on two tiny random
//! checkpoints: `phi3` (saved by transformers 5: `rope_parameters` with LongRoPE over 3/4 of each
//! head, GQA, tied head) and `published` (Phi-3.5-mini's config layout: `rope_scaling` of type
//! `longrope`, a sliding window of 7, multi-head, untied). Both pretrained on 24 positions: the
//! `long` prompt (70 tokens) runs with the long factors throughout, the `short` one (17) is
//! prefilled with the short factors and crosses into the long ones while it decodes. Stage by
//! stage: the rendered chat template, the prompt's token ids, f32 logits at every position, 20
//! greedy tokens.
//!
//! `phi3` as llama.cpp's converter writes it (`phi3.gguf`: fused `attn_qkv` and `ffn_up`, the
//! LongRoPE factors as `rope_factors_long/short` tensors, a SentencePiece vocabulary with scores
//! and no merges), checked the same way against transformers' own tokenizer for Phi-3 GGUFs; and
//! `phi3-mixed.gguf`, every matrix in one of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, against transformers on
//! the weights as dequantized.

mod common;

use common::Reference;
use loupe_core::{Engine, LoadOptions};

fn fixture(name: &str) -> std::path::PathBuf {
    common::text::fixture("phi3", name)
}

fn engine(name: &str) -> Engine {
    common::text::engine("phi3", name, "phi3")
}

fn reference(name: &str) -> Reference {
    common::text::reference("phi3", name)
}

#[test]
fn phi3_with_longrope_and_partial_rotary_matches_transformers() {
    common::text::check("phi3", &reference("phi3"), "", &engine("phi3"));
}

#[test]
fn phi3_in_the_published_config_layout_with_a_window_matches_transformers() {
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
    assert_eq!(e.model_type, "phi3");
    e
}

#[test]
fn phi3_gguf_as_llama_cpp_writes_it_matches_transformers() {
    common::text::check("phi3", &reference("phi3"), "gguf/", &gguf("phi3.gguf"));
}

#[test]
fn every_32_block_format_matches_transformers_on_phi3s_dequantized_weights() {
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("phi3/config.json")).unwrap()).unwrap();
    let original = cfg["original_max_position_embeddings"]
        .as_u64()
        .map(|o| o as usize);
    assert_eq!(original, Some(24));
    common::text::check_mixed_longrope(&reference("phi3"), &gguf("phi3-mixed.gguf"), original);
}

/// A GGUF has no generation config: the stop ids come from the vocabulary (`<|end|>` ends a
/// turn, `<|endoftext|>` the text).
#[test]
fn a_phi3_gguf_stops_at_its_end_of_turn() {
    let e = gguf("phi3.gguf");
    let ids = e.eos_token_ids();
    for t in ["<|end|>", "<|endoftext|>"] {
        let id = e.tokenizer.token_to_id(t).expect(t);
        assert!(ids.contains(&id), "{t} ({id}) not among {ids:?}");
    }
}

/// LongRoPE needs both factor tables: a GGUF with only the long one (the short tensor renamed in
/// place) is one clear error naming the missing tensor, not a model with half its scaling.
#[test]
fn a_phi3_gguf_missing_a_rope_factor_table_is_one_clear_error() {
    let mut bytes = std::fs::read(fixture("phi3.gguf")).unwrap();
    let from = b"rope_factors_short.weight";
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("the fixture has rope_factors_short");
    bytes[at..at + from.len()].copy_from_slice(b"rope_factors_xxxxx.weight");
    let path =
        std::env::temp_dir().join(format!("loupe-phi3-one-factor-{}.gguf", std::process::id()));
    std::fs::write(&path, &bytes).unwrap();
    let e = Engine::load(path.to_str().unwrap(), &LoadOptions::default())
        .err()
        .expect("accepted a GGUF with one LongRoPE table")
        .to_string();
    std::fs::remove_file(&path).unwrap();
    assert!(e.contains("rope_factors_short"), "{e}");
}

/// The fused projections' quantized parts (Q8_0 at load) still answer as the whole would: the
/// short prompt's logits within 10% of the f32 model's range (Q8_0 weights, and 8-bit activations
/// where the 32-value tiles run: a part cut at the wrong row would be off by whole units). Greedy
/// tokens are not compared: this random model's best logits are near-ties that 8-bit activations
/// reorder.
#[test]
fn quantized_fused_projections_load_and_run() {
    let e = Engine::load(
        fixture("phi3").to_str().unwrap(),
        &LoadOptions {
            quant: Some(candle_core::quantized::GgmlDType::Q8_0),
            ..Default::default()
        },
    )
    .unwrap();
    let r = reference("phi3");
    let p = &r.meta["prompts"]["short"];
    let messages = common::text_messages(&p["messages"]);
    let prompt = e
        .prompt_from_messages(&messages, &[], &e.preprocessor)
        .unwrap();
    let (diff, at, scale) = common::logit_diff(&common::prompt_logits(&e, &prompt), &r, "short");
    assert!(
        diff < 0.1 * scale,
        "logits differ by {diff} at {at} (range {scale})"
    );
}

/// Phi-3's own config errors name the field.
#[test]
fn bad_phi3_fields_are_one_clear_error() {
    let src = fixture("published");
    let cfg_text = std::fs::read_to_string(src.join("config.json")).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
    type Change = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Change)> = vec![
        (
            "rope_scaling.short_factor",
            Box::new(|c| {
                c["rope_scaling"]["short_factor"]
                    .as_array_mut()
                    .unwrap()
                    .pop();
            }),
        ),
        (
            "rope_scaling.long_factor",
            Box::new(|c| c["rope_scaling"]["long_factor"][0] = (-1.0).into()),
        ),
        (
            "original_max_position_embeddings",
            Box::new(|c| {
                c.as_object_mut()
                    .unwrap()
                    .remove("original_max_position_embeddings");
            }),
        ),
        (
            "rope_scaling.rope_type",
            Box::new(|c| c["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0})),
        ),
        (
            "sliding_window",
            Box::new(|c| c["sliding_window"] = 0.into()),
        ),
    ];
    for (n, (field, change)) in cases.into_iter().enumerate() {
        let tmp = std::env::temp_dir().join(format!("loupe-phi3-cfg-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        for f in std::fs::read_dir(&src).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, tmp.join(f.file_name().unwrap())).unwrap();
        }
        let mut c = cfg.clone();
        change(&mut c);
        std::fs::write(tmp.join("config.json"), c.to_string()).unwrap();
        let e = Engine::load(tmp.to_str().unwrap(), &LoadOptions::default())
            .err()
            .unwrap_or_else(|| panic!("{field}: accepted"))
            .to_string();
        assert!(
            e.contains("config.json") && e.contains(field),
            "{field}: {e}"
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}

/// Random weights pick byte-fallback tokens that are not UTF-8 together (`<0x49><0x6B>` shows
/// "Ik", then `<0xFA>` makes the run three U+FFFD): the stream must not panic on text it already
/// showed changing, and ends on exactly the tokenizer's decode, as transformers prints it.
#[test]
fn streaming_byte_fallback_runs_that_turn_invalid_ends_on_the_full_decode() {
    use loupe_core::tokenize::TextStream;
    let e = gguf("phi3.gguf");
    let r = reference("phi3");
    for p in ["long", "short", "system"] {
        let ids = r.ids(&format!("gguf/{p}/greedy"));
        let mut s = TextStream::new(&e.tokenizer, Vec::new());
        let mut shown = String::new();
        for &id in &ids {
            shown += &s.push(id).unwrap();
        }
        shown += &s.finish().unwrap();
        let full = e.tokenizer.decode(&ids).unwrap();
        assert_eq!(s.text(), full, "{p}");
        assert!(!shown.is_empty(), "{p}: nothing shown");
    }
}

/// A stop string that a byte-fallback token completes (a newline is `<0x0A>` in this vocabulary)
/// stops the stream at once and is never shown, whether the answer goes on or ends right after it.
#[test]
fn a_stop_string_inside_a_byte_run_stops_the_stream() {
    use loupe_core::tokenize::TextStream;
    let e = gguf("phi3.gguf");
    let newline = e
        .tokenizer
        .token_to_id("<0x0A>")
        .expect("a byte token for \\n");
    let hello = e.tokenizer.encode_rendered("Hello").unwrap();
    for then_more in [false, true] {
        let mut ids = hello.clone();
        ids.push(newline);
        if then_more {
            ids.extend(&hello);
        }
        let mut s = TextStream::new(&e.tokenizer, vec!["\n".into()]);
        let mut shown = String::new();
        for &id in &ids {
            shown += &s.push(id).unwrap();
            if s.stopped() {
                break;
            }
        }
        shown += &s.finish().unwrap();
        assert!(s.stopped(), "then_more {then_more}");
        assert_eq!(shown, s.text());
        assert!(
            !shown.contains('\n') && shown.ends_with("Hello"),
            "{shown:?}"
        );
    }
}
