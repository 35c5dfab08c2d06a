//! A conversation kept in the decoder's cache between turns answers exactly as a fresh run over the
//! whole conversation does, while running only the new part of each prompt: text (Llama) and images
//! (Qwen2-VL, where two different images of one size have equal placeholders).

mod common;

use std::sync::atomic::AtomicBool;

use candle_core::DType;
use loupe_core::generate::Conversation;
use loupe_core::tokenize::Message;
use loupe_core::{Engine, LoadOptions};

fn load(path: &str) -> Engine {
    let p = common::fixtures().join(path);
    let opts = LoadOptions {
        dtype: Some(DType::F32),
        ..Default::default()
    };
    Engine::load(p.to_str().unwrap(), &opts).unwrap()
}

/// Runs `turns` (user text, image files) through one conversation; each answer is checked against
/// a fresh greedy run on the whole conversation so far. Returns each turn's reused token count.
fn converse(e: &Engine, turns: &[(&str, &[&str])]) -> Vec<usize> {
    let params = common::greedy(e, 12);
    let mut conv = Conversation::new(e);
    let mut messages: Vec<Message> = vec![Message::system("You inspect parts.")];
    let mut images = Vec::new();
    let mut reused = Vec::new();
    let stop = AtomicBool::new(false);
    for (text, files) in turns {
        messages.push(Message::user(files.len(), text));
        let names: Vec<serde_json::Value> = files.iter().map(|f| (*f).into()).collect();
        images.extend(common::image_inputs(&names));
        let prompt = e
            .prompt_from_messages(&messages, &images, &e.preprocessor)
            .unwrap();
        let fresh = e.generate(&prompt, &params, &mut |_| {}).unwrap();
        let (out, stats) = conv.reply(e, &prompt, &params, &stop, &mut |_| {}).unwrap();
        assert_eq!(
            out.tokens, fresh.tokens,
            "turn {text:?}: the cached conversation"
        );
        assert_eq!(stats.reused + stats.prefilled, prompt.ids.len());
        reused.push(stats.reused);
        messages.push(Message::assistant(&out.text));
    }
    reused
}

#[test]
fn a_text_conversation_reuses_its_earlier_turns() {
    let e = load("llama/llama3");
    let reused = converse(
        &e,
        &[
            ("Describe the bracket.", &[]),
            ("Is there a scratch?", &[]),
            ("Answer in JSON.", &[]),
        ],
    );
    assert_eq!(reused[0], 0);
    // Each later turn reuses at least the earlier prompt (the answer may re-tokenize differently).
    assert!(reused[1] > 20 && reused[2] > reused[1], "{reused:?}");
}

#[test]
fn images_in_turns_are_reused_and_a_new_image_of_the_same_size_is_not_taken_for_the_cached_one() {
    let e = load("qwen2_vl/gqa2_tied_published");
    let reused = converse(
        &e,
        &[
            ("Describe this part.", &["gray_120x90.png"]),
            ("And this one?", &["alpha_150x100.png"]),
        ],
    );
    assert!(reused[1] > 0, "{reused:?}");

    // The first turn again with another image of the same size: equal placeholder ids, so only
    // the images tell them apart, and nothing from that image on may come from the cache.
    let gray = common::fixtures().join("images/gray_120x90.png");
    let other = std::env::temp_dir().join(format!("loupe-conv-{}.png", std::process::id()));
    let mut img = image::open(&gray).unwrap().to_rgb8();
    img.pixels_mut()
        .for_each(|p| p.0 = [255 - p.0[0], p.0[1], 7]);
    img.save(&other).unwrap();
    let mut conv = Conversation::new(&e);
    let stop = AtomicBool::new(false);
    let params = common::greedy(&e, 12);
    let messages = vec![Message::user(1, "Describe this part.")];
    let mut runs = Vec::new();
    for path in [&gray, &other] {
        let images = Engine::load_images(&[path]).unwrap();
        let prompt = e
            .prompt_from_messages(&messages, &images, &e.preprocessor)
            .unwrap();
        let fresh = e.generate(&prompt, &params, &mut |_| {}).unwrap();
        let (out, stats) = conv
            .reply(&e, &prompt, &params, &stop, &mut |_| {})
            .unwrap();
        assert_eq!(out.tokens, fresh.tokens);
        runs.push((prompt, stats));
    }
    let (first, second) = (&runs[0].0, &runs[1].1);
    assert_eq!(first.ids, runs[1].0.ids, "equal placeholders");
    let image_at = first
        .ids
        .iter()
        .position(|&t| t == e.model.image_token_id())
        .unwrap();
    assert_eq!(
        second.reused, image_at,
        "reused up to the image that differs"
    );
    std::fs::remove_file(&other).unwrap();
}

#[test]
fn an_interrupted_answer_stops_and_the_conversation_goes_on() {
    let e = load("llama/llama3");
    let mut conv = Conversation::new(&e);
    let messages = vec![Message::user(0, "Describe the bracket.")];
    let prompt = e
        .prompt_from_messages(&messages, &[], &e.preprocessor)
        .unwrap();
    let stop = AtomicBool::new(true);
    let (out, stats) = conv
        .reply(&e, &prompt, &common::greedy(&e, 12), &stop, &mut |_| {})
        .unwrap();
    assert!(
        stats.interrupted && out.tokens.len() <= 1,
        "{:?}",
        out.tokens
    );
    assert!(conv.cached_tokens() >= prompt.ids.len());
}
