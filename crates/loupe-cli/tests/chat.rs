//! `loupe chat` driven through a pseudo-terminal, as a person types: streamed answers, turns kept in
//! the cache, the slash commands, Ctrl-C that does not leave, Ctrl-D that does.

mod common;

use std::time::Duration;

use expectrl::session::OsSession as Session;
use expectrl::{Eof, Expect, Regex};

fn start(model: &str, extra: &[&str]) -> Session {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_loupe"));
    cmd.args([
        "chat",
        "--model",
        model,
        "--max-tokens",
        "6",
        "--temperature",
        "0",
    ])
    .args(extra);
    let mut s = Session::spawn(cmd).expect("spawn loupe chat in a pty");
    s.set_expect_timeout(Some(Duration::from_secs(30)));
    s.expect("/help for commands").unwrap();
    ready(&mut s);
    s
}

/// Sends a line and waits for the answer's statistics line; returns (prompt tokens, from the cache).
fn turn(s: &mut Session, line: &str) -> (usize, usize) {
    s.send_line(line).unwrap();
    let m = s
        .expect(Regex(r"prompt (\d+) tokens, (\d+) from the cache"))
        .unwrap();
    let n = |i: usize| -> usize { String::from_utf8_lossy(m.get(i).unwrap()).parse().unwrap() };
    let counts = (n(1), n(2));
    ready(s);
    counts
}

/// Waits for the line editor's prompt (keys sent before it would race the terminal's mode switch).
fn ready(s: &mut Session) {
    s.expect("> ").unwrap();
}

#[test]
fn a_conversation_in_a_terminal_keeps_its_turns_in_the_cache() {
    let model = common::fixtures().join("llama/llama3");
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("talk.json");
    let mut s = start(common::s(&model), &["--system", "You inspect parts."]);

    let (p1, c1) = turn(&mut s, "Describe the bracket.");
    assert_eq!(c1, 0, "the first turn has nothing cached");
    let (p2, c2) = turn(&mut s, "Is there a scratch?");
    assert!(
        p2 > p1 && c2 >= p1 - 1,
        "turn 2: {p2} tokens, {c2} cached (turn 1 had {p1})"
    );

    // Ctrl-C at the prompt, and right after a message: the chat goes on.
    s.send(expectrl::ControlCode::EndOfText).unwrap();
    ready(&mut s);
    s.send_line("/help").unwrap();
    s.expect("/image PATH").unwrap();
    ready(&mut s);
    s.send_line("Answer in JSON.").unwrap();
    s.send(expectrl::ControlCode::EndOfText).unwrap();
    s.expect(Regex(r"from the cache")).unwrap();
    ready(&mut s);
    let (_, c4) = turn(&mut s, "And the hole?");
    assert!(c4 > p2, "the conversation survived Ctrl-C ({c4} cached)");

    s.send_line("/image nowhere.png").unwrap();
    s.expect("takes no images").unwrap();
    ready(&mut s);
    s.send_line("/frobnicate").unwrap();
    s.expect("no command /frobnicate").unwrap();
    ready(&mut s);
    s.send_line(format!("/save {}", saved.display())).unwrap();
    s.expect("saved to").unwrap();
    ready(&mut s);

    s.send_line("/reset").unwrap();
    s.expect("new conversation").unwrap();
    ready(&mut s);
    let (_, c5) = turn(&mut s, "Describe the bracket.");
    assert!(
        c5 < p1,
        "after /reset only the system turn may be cached ({c5})"
    );

    s.send(expectrl::ControlCode::EndOfTransmission).unwrap();
    s.expect(Eof).unwrap();

    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    let messages = doc["messages"].as_array().unwrap();
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles[..5],
        ["system", "user", "assistant", "user", "assistant"]
    );
    assert_eq!(messages[1]["content"], "Describe the bracket.");
}

#[test]
fn images_attach_to_the_next_message_of_a_vision_model() {
    let model = common::fixtures().join("qwen2_vl/gqa2_tied_published");
    let image = common::fixtures().join("images/gray_120x90.png");
    let mut s = start(common::s(&model), &[]);
    s.send_line(format!("/image {}", image.display())).unwrap();
    s.expect("attached to your next message").unwrap();
    ready(&mut s);
    let (p1, _) = turn(&mut s, "Describe this part.");
    let (_, c2) = turn(&mut s, "And its edge?");
    assert!(c2 >= p1 - 1, "the image's turn stays cached ({c2} of {p1})");
    s.send_line("/image missing.png").unwrap();
    s.expect("missing.png").unwrap();
    s.send_line("/quit").unwrap();
    s.expect(Eof).unwrap();
}

/// Ctrl-C while an answer streams stops it at once (the footer says `stopped`, short of the length
/// the same answer has uninterrupted), and the chat goes on: the next prompt works.
#[test]
fn ctrl_c_stops_a_long_answer_and_the_next_prompt_works() {
    let model = common::fixtures().join("qwen2_vl/gqa2_tied_published");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_loupe"));
    cmd.args(["chat", "--model", common::s(&model), "--max-tokens", "3000"])
        .args(["--temperature", "0"]);
    let mut s = Session::spawn(cmd).expect("spawn loupe chat in a pty");
    s.set_expect_timeout(Some(Duration::from_secs(60)));
    s.expect("/help for commands").unwrap();
    ready(&mut s);
    let tokens = |s: &mut Session, stopped: bool| -> usize {
        let re = if stopped {
            r"\[(\d+) tokens, [^\]]*\| stopped\]"
        } else {
            r"\[(\d+) tokens, [^\]]*from the cache\]"
        };
        let m = s.expect(Regex(re)).expect("the answer's footer");
        String::from_utf8_lossy(m.get(1).unwrap()).parse().unwrap()
    };
    // The answer uninterrupted (greedy, so the same each time).
    s.send_line("Describe the part").unwrap();
    let whole = tokens(&mut s, false);
    assert!(whole > 100, "a long answer to interrupt: {whole} tokens");
    ready(&mut s);
    s.send_line("/reset").unwrap();
    s.expect("new conversation").unwrap();
    ready(&mut s);
    // The same answer, interrupted as soon as it streams.
    s.send_line("Describe the part").unwrap();
    s.expect("Describe the part").unwrap();
    s.expect(Regex(r"\n[^\r\n]")).unwrap();
    s.send(expectrl::ControlCode::EndOfText).unwrap();
    let n = tokens(&mut s, true);
    assert!(
        n < whole,
        "stopped after {n} tokens; uninterrupted it has {whole}"
    );
    ready(&mut s);
    // The chat goes on.
    s.send_line("/help").unwrap();
    s.expect("/image PATH").unwrap();
    ready(&mut s);
    s.send(expectrl::ControlCode::EndOfTransmission).unwrap();
    s.expect(Eof).unwrap();
}
