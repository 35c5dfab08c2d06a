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

use candle_core::DType;
use common::{logit_diff, Reference};
use loupe_core::generate::{GenerateParams, SamplingParams};
use loupe_core::{Engine, LoadOptions};

fn engine(name: &str) -> Engine {
    let dir = common::fixtures().join("llama").join(name);
    Engine::load(
        dir.to_str().unwrap(),
        &LoadOptions {
            dtype: Some(DType::F32),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn check(name: &str) {
    check_as(name, "", &engine(name));
}

/// `e` (the checkpoint `name` in some form) against the reference's `{prefix}{prompt}/...` entries.
fn check_as(name: &str, prefix: &str, e: &Engine) {
    assert_eq!(e.model_type, "llama");
    let r = Reference::load(
        common::fixtures()
            .join("llama")
            .join(format!("{name}.safetensors")),
    );
    let prompts = r.meta["prompts"].as_object().unwrap().clone();
    assert_eq!(prompts.len(), 4);
    for (pname, p) in prompts {
        let messages = common::text_messages(&p["messages"]);
        assert_eq!(
            e.template.render(&messages, true).unwrap(),
            p["rendered"].as_str().unwrap(),
            "{name}/{pname}: the chat template"
        );
        let prompt = e
            .prompt_from_messages(&messages, &[], &e.preprocessor)
            .unwrap();
        assert_eq!(
            prompt.ids,
            r.ids(&format!("{prefix}{pname}/ids")),
            "{name}/{prefix}{pname}: ids"
        );
        // f32 against f32: within 1e-3 at every position (measured below 1e-5).
        let logits = common::prompt_logits(e, &prompt);
        let (diff, at, scale) = logit_diff(&logits, &r, &format!("{prefix}{pname}"));
        assert!(
            diff < 1e-3,
            "{name}/{prefix}{pname}: logits differ by {diff} at {at} (range {scale})"
        );
        let params = GenerateParams {
            max_tokens: 20,
            sampling: SamplingParams::default(),
            stop_strings: vec![],
            eos_token_ids: vec![],
            grammar: None,
        };
        let out = e.generate(&prompt, &params, &mut |_| {}).unwrap();
        assert_eq!(
            out.tokens,
            r.ids(&format!("{prefix}{pname}/greedy")),
            "{name}/{prefix}{pname}: greedy tokens"
        );
    }
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
    let e = gguf("llama3-mixed.gguf");
    let r = Reference::load(common::fixtures().join("llama/llama3.safetensors"));
    let prompts = r.meta["prompts"].as_object().unwrap().clone();
    for (pname, p) in prompts {
        let messages = common::text_messages(&p["messages"]);
        let prompt = e
            .prompt_from_messages(&messages, &[], &e.preprocessor)
            .unwrap();
        // Every row at once (the weights expanded to f32), and one row at a time as decode runs
        // (the 8-bit activation products): both near transformers on the same dequantized weights.
        // Keys and values are cached in f16 under quantized weights: about 0.2% of the logits'
        // range at once (measured 0.013 of 7.9), a wrong block layout would be off by whole units.
        let all = common::prompt_logits(&e, &prompt);
        let (diff, at, scale) = logit_diff(&all, &r, &format!("mixed/{pname}"));
        assert!(
            diff < 0.01 * scale,
            "mixed/{pname}: logits differ by {diff} at {at} (range {scale})"
        );
        let mut cache = e.model.new_cache();
        let (pos, _) = e.model.prompt_positions(&prompt.ids, &[]).unwrap();
        let n = prompt.ids.len();
        let embeds = e.model.embed(&prompt.ids[..n - 8], None).unwrap();
        e.model
            .forward(&embeds, &pos[..n - 8], &mut cache, false)
            .unwrap();
        let want = r.f32s(&format!("mixed/{pname}/logits"));
        let vocab = want.len() / n;
        for (i, &id) in prompt.ids[n - 8..].iter().enumerate() {
            let step = e.model.forward_decode(&[id], &mut [&mut cache]).unwrap();
            let got = step.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let row = &want[(n - 8 + i) * vocab..(n - 7 + i) * vocab];
            let (diff, at) = common::max_abs_diff(&got, row);
            // 8-bit activations through two layers of random weights: measured up to 5% of the
            // range; a wrong block layout or scale is off by the whole range.
            assert!(
                diff < 0.1 * scale,
                "mixed/{pname}: decode step {i} differs by {diff} at {at} (range {scale})"
            );
        }
    }
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
