//! A llama.cpp GGUF file loaded as users download it (tools/make_gguf_fixture.py: a tiny random Qwen2
//! language model written with llama.cpp's tensor names, metadata, tokenizer and chat template), and
//! the same model as a transformers checkpoint: both give transformers' greedy answers.

mod common;

use candle_core::DType;
use loupe_core::generate::{GenerateParams, SamplingParams};
use loupe_core::tokenize::Message;
use loupe_core::{Engine, LoadOptions};
use serde_json::Value;

fn dir() -> std::path::PathBuf {
    common::fixtures().join("qwen2_text")
}

fn load(path: &std::path::Path) -> Engine {
    Engine::load(
        path.to_str().unwrap(),
        &LoadOptions {
            dtype: Some(DType::F32),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn reference() -> Vec<Value> {
    serde_json::from_str(&std::fs::read_to_string(dir().join("reference.json")).unwrap()).unwrap()
}

fn answers_like_transformers(e: &Engine) {
    for case in reference() {
        let messages: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let text = m["content"].as_str().unwrap();
                match m["role"].as_str().unwrap() {
                    "system" => Message::system(text),
                    _ => Message::user(0, text),
                }
            })
            .collect();
        assert_eq!(
            e.template.render(&messages, true).unwrap(),
            case["rendered"].as_str().unwrap()
        );
        let prompt = e
            .prompt_from_messages(&messages, &[], &e.preprocessor)
            .unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(prompt.ids, ids, "prompt ids");
        let params = GenerateParams {
            max_tokens: 20,
            sampling: SamplingParams::default(),
            stop_strings: vec![],
            eos_token_ids: e.eos_token_ids(),
            grammar: None,
        };
        let out = e.generate(&prompt, &params, &mut |_| {}).unwrap();
        let want: Vec<u32> = serde_json::from_value(case["greedy"].clone()).unwrap();
        assert_eq!(out.tokens, want, "greedy tokens");
        assert_eq!(out.text, case["text"].as_str().unwrap());
    }
}

#[test]
fn a_llama_cpp_gguf_file_answers_like_transformers() {
    let e = load(&dir().join("tiny.gguf"));
    assert_eq!(e.model_type, "qwen2");
    answers_like_transformers(&e);
}

#[test]
fn the_same_model_as_a_checkpoint_answers_the_same() {
    answers_like_transformers(&load(&dir().join("tiny")));
}

#[test]
fn the_gguf_tokenizer_encodes_like_tokenizer_json() {
    let gguf = load(&dir().join("tiny.gguf"));
    let hf =
        loupe_core::tokenize::Tokenizer::from_file(&dir().join("tiny/tokenizer.json")).unwrap();
    for text in [
        "Hello, world! 1234 the scratch",
        "  spaces\tand\nnew lines\r\n",
        "<|im_start|>user\nJSON {\"verdict\": \"pass\"}<|im_end|>",
        "ünïcödé and 中文 and emoji 😀",
    ] {
        assert_eq!(
            gguf.tokenizer.encode(text).unwrap(),
            hf.encode(text).unwrap(),
            "{text:?}"
        );
    }
}

#[test]
fn a_text_only_model_refuses_images_clearly() {
    let e = load(&dir().join("tiny.gguf"));
    let img = Engine::load_images(&[common::fixtures().join("images/odd_97x211.png")]).unwrap();
    let err = e
        .prompt(None, "What is this?", &img, &e.preprocessor)
        .and_then(|p| {
            e.generate(
                &p,
                &GenerateParams {
                    max_tokens: 1,
                    sampling: SamplingParams::default(),
                    stop_strings: vec![],
                    eos_token_ids: e.eos_token_ids(),
                    grammar: None,
                },
                &mut |_| {},
            )
        })
        .unwrap_err();
    assert!(err.to_string().contains("text-only"), "{err}");
}
