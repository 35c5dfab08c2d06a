//! A llama.cpp GGUF file loaded as users download it (tools/make_gguf_fixture.py: a tiny random Qwen2
//! language model written with llama.cpp's tensor names, metadata, tokenizer and chat template), and
//! the same model as a transformers checkpoint: both give transformers' greedy answers.

mod common;

use candle_core::DType;
use common::greedy;
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
        let messages = common::text_messages(&case["messages"]);
        assert_eq!(
            e.template.render(&messages, true).unwrap(),
            case["rendered"].as_str().unwrap()
        );
        let prompt = e
            .prompt_from_messages(&messages, &[], &e.preprocessor)
            .unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(prompt.ids, ids, "prompt ids");
        let out = e.generate(&prompt, &greedy(e, 20), &mut |_| {}).unwrap();
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
        .and_then(|p| e.generate(&p, &greedy(&e, 1), &mut |_| {}))
        .unwrap_err();
    assert!(err.to_string().contains("text-only"), "{err}");
}

#[test]
#[ignore = "needs the 491 MB Qwen2.5-Coder-0.5B GGUF: LOUPE_REAL_GGUF=path (tools/check_gguf_vs_llama_cpp.py)"]
fn real_weights_continue_like_llama_cpp() {
    // The real Qwen2.5-Coder-0.5B-Instruct Q4_K_M file, the prompts and llama.cpp's greedy
    // continuations recorded by tools/check_gguf_vs_llama_cpp.py.
    let path = std::env::var("LOUPE_REAL_GGUF").expect("set LOUPE_REAL_GGUF to the GGUF file");
    let e = Engine::load(&path, &LoadOptions::default()).unwrap();
    let cases: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("real_gguf/llama_cpp_greedy.json"))
            .unwrap(),
    )
    .unwrap();
    let mut same = 0;
    for case in &cases {
        let prompt = loupe_core::generate::Prompt {
            ids: e
                .tokenizer
                .encode(case["prompt"].as_str().unwrap())
                .unwrap(),
            pixels: Default::default(),
        };
        let max_tokens = case["max_tokens"].as_u64().unwrap() as usize;
        let out = e
            .generate(&prompt, &greedy(&e, max_tokens), &mut |_| {})
            .unwrap();
        let want = case["llama_cpp"].as_str().unwrap();
        if out.text.trim() == want.trim() {
            same += 1;
        } else {
            eprintln!("differs:\n  llama.cpp {want:?}\n  loupe     {:?}", out.text);
        }
    }
    // Measured: 4 of 4 identical here, 3 of 4 through `loupe run` (the fourth parts at a near-tie,
    // " exercise" / " activity", and Loupe itself picks " activity" when that prefix is prefilled in
    // one pass rather than decoded token by token).
    assert!(
        same + 1 >= cases.len(),
        "{same} of {} identical",
        cases.len()
    );
}
