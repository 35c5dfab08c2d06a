//! A chat template's source, rendered with a two-turn conversation with an image.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;
use loupe_core::tokenize::{ChatTemplate, Message};

fuzz_target!(|data: &[u8]| {
    common::hook();
    let Ok(src) = std::str::from_utf8(data) else { return };
    let mut limits = loupe_core::limits::Limits::default();
    limits.template_steps = 200_000;
    limits.template_bytes = 1 << 20;
    loupe_core::limits::set(limits);
    let Ok(t) = ChatTemplate::from_source(src.to_owned()) else { return };
    let msgs = [
        Message::system("You inspect parts."),
        Message::user(1, "Is this part good?"),
        Message::assistant("{\"verdict\": \"pass\"}"),
        Message::user(0, "Sure?"),
    ];
    let _ = t.render(&msgs, true);
});
