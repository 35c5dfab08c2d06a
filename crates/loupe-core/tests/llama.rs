//! Llama against transformers (tools/make_llama_fixture.py, transformers 5.23.0) on two tiny random
//! checkpoints: `llama3` (GQA, `rope_type: llama3` scaling with a 32-token original context, untied
//! head) and `linear` (multi-head, tied, `linear` scaling, every bias). Stage by stage: the rendered
//! chat template, the prompt's token ids, f32 logits at every position, 20 greedy tokens. The `long`
//! prompt (83 tokens) runs past the original context.

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
    let e = engine(name);
    assert_eq!(e.model_type, "llama");
    let r = Reference::load(
        common::fixtures()
            .join("llama")
            .join(format!("{name}.safetensors")),
    );
    let prompts = r.meta["prompts"].as_object().unwrap().clone();
    assert_eq!(prompts.len(), 3);
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
            r.ids(&format!("{pname}/ids")),
            "{name}/{pname}: ids"
        );
        // f32 against f32: within 1e-3 at every position (measured below 1e-5).
        let logits = common::prompt_logits(&e, &prompt);
        let (diff, at, scale) = logit_diff(&logits, &r, &pname);
        assert!(
            diff < 1e-3,
            "{name}/{pname}: logits differ by {diff} at {at} (range {scale})"
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
            r.ids(&format!("{pname}/greedy")),
            "{name}/{pname}: greedy tokens"
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
