//! Constrained decoding and prefix/feature reuse on the tiny fixture model: outputs always match the
//! schema or grammar, and reuse changes nothing in the answer.

mod common;

use loupe_core::engine::LoadOptions;
use loupe_core::generate::{FastForward, GenerateParams, Grammar, Reuse, SamplingParams};
use loupe_core::tokenize::Message;
use loupe_core::Engine;
use serde_json::{json, Value};

fn engine() -> Engine {
    let dir = common::fixtures().join("qwen2_vl/gqa2_tied_published");
    Engine::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap()
}

/// The fixture model `model` computing in f32.
fn f32_engine(model: &str) -> Engine {
    Engine::load(
        common::fixtures().join(model).to_str().unwrap(),
        &LoadOptions {
            dtype: Some(candle_core::DType::F32),
            ..Default::default()
        },
    )
    .unwrap()
}

/// One answer stepped to its end under `grammar`, forced tokens run as `mode` says; a failing step
/// panics with `at` and the tokens so far.
fn answer(
    e: &Engine,
    prompt: &loupe_core::generate::Prompt,
    p: &GenerateParams,
    grammar: &Grammar,
    mode: FastForward,
    at: &str,
) -> loupe_core::generate::Generation {
    let c = e.constraint(grammar).unwrap().with_fast_forward(mode);
    let mut seq = e.sequence(prompt, p, Some(c), None).unwrap();
    while !seq.is_finished() {
        if let Err(err) = seq.step() {
            panic!("{at}: {err} after {:?}", seq.tokens());
        }
    }
    seq.finish(&mut |_| {}).unwrap()
}

fn params(e: &Engine, temperature: f64, seed: u64, grammar: Option<Grammar>) -> GenerateParams {
    GenerateParams {
        max_tokens: 200,
        sampling: SamplingParams {
            temperature,
            seed,
            ..SamplingParams::default()
        },
        stop_strings: vec![],
        eos_token_ids: e.eos_token_ids(),
        grammar,
    }
}

fn verdict_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "verdict": {"enum": ["pass", "fail"]},
            "defects": {
                "type": "array",
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "class": {"enum": ["scratch", "dent"]},
                        "box": {
                            "type": "array",
                            "items": {"type": "integer", "minimum": 0, "maximum": 1000},
                            "minItems": 4,
                            "maxItems": 4
                        }
                    },
                    "required": ["class", "box"],
                    "additionalProperties": false
                }
            }
        },
        "required": ["verdict", "defects"],
        "additionalProperties": false
    })
}

/// Checks a value against `verdict_schema` by hand (the property the constraint guarantees).
fn check_verdict(v: &Value) {
    let obj = v.as_object().expect("an object");
    assert_eq!(obj.len(), 2, "{v}");
    assert!(
        matches!(obj["verdict"].as_str(), Some("pass" | "fail")),
        "{v}"
    );
    let defects = obj["defects"].as_array().expect("defects array");
    assert!(defects.len() <= 3, "{v}");
    for d in defects {
        let d = d.as_object().expect("defect object");
        assert_eq!(d.len(), 2, "{v}");
        assert!(
            matches!(d["class"].as_str(), Some("scratch" | "dent")),
            "{v}"
        );
        let b = d["box"].as_array().expect("box");
        assert_eq!(b.len(), 4, "{v}");
        for x in b {
            let x = x.as_i64().expect("integer coordinate");
            assert!((0..=1000).contains(&x), "{v}");
        }
    }
}

#[test]
fn json_schema_output_always_parses_and_validates() {
    let e = engine();
    let images = Engine::load_images(&[common::fixtures().join("images/odd_97x211.png")]).unwrap();
    let prompt = e
        .prompt(None, "Inspect the part.", &images, &e.preprocessor)
        .unwrap();
    let grammar = Grammar::JsonSchema(verdict_schema());
    // Greedy plus hot sampling: a random-weight model left alone writes no JSON at all. With the
    // forced tokens run for it (the default) and with every token sampled under the mask, where
    // this model's choices of how to spell the forced text make the answers vary.
    let mut distinct = std::collections::HashSet::new();
    for (t, seed) in [(0.0, 0), (1.0, 1), (1.5, 2), (2.0, 3), (1.0, 4), (3.0, 5)] {
        let p = params(&e, t, seed, Some(grammar.clone()));
        let out = e.generate(&prompt, &p, &mut |_| {}).unwrap();
        let sampled = answer(
            &e,
            &prompt,
            &p,
            &grammar,
            FastForward::Off,
            "the schema test",
        );
        for out in [out, sampled] {
            let v: Value = serde_json::from_str(&out.text)
                .unwrap_or_else(|err| panic!("seed {seed}: {err}: {:?}", out.text));
            check_verdict(&v);
            distinct.insert(out.text.clone());
        }
    }
    assert!(distinct.len() > 1, "sampling should vary within the schema");
    // Without the constraint the same model does not write valid JSON.
    let free = e
        .generate(&prompt, &params(&e, 0.0, 0, None), &mut |_| {})
        .unwrap();
    assert!(serde_json::from_str::<Value>(&free.text).is_err());
}

#[test]
fn lark_grammar_output_matches() {
    let e = engine();
    let prompt = e.prompt(None, "Count.", &[], &e.preprocessor).unwrap();
    let g = Grammar::Lark(r#"start: "count=" /[0-9]{1,3}/ ";""#.into());
    for seed in 0..4 {
        let out = e
            .generate(
                &prompt,
                &params(&e, 1.5, seed, Some(g.clone())),
                &mut |_| {},
            )
            .unwrap();
        let t = &out.text;
        let digits = t
            .strip_prefix("count=")
            .and_then(|r| r.strip_suffix(';'))
            .unwrap_or_else(|| panic!("{t:?}"));
        assert!((1..=3).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()));
    }
}

#[test]
fn a_bad_grammar_is_an_error_before_generation() {
    let e = engine();
    let err = e
        .constraint(&Grammar::Lark("start: (".into()))
        .err()
        .expect("must fail");
    assert!(err.to_string().starts_with("grammar:"), "{err}");
    let err = e
        .constraint(&Grammar::JsonSchema(json!({"type": "no-such-type"})))
        .err()
        .expect("must fail");
    assert!(err.to_string().starts_with("grammar:"), "{err}");
}

#[test]
fn prefix_and_feature_reuse_give_the_same_answers() {
    // Qwen2-VL; Qwen3-VL (DeepStack features travel with the cached image features); Qwen3.5 (the
    // recurrent DeltaNet states are restored, not truncated, when the prefix is rewound).
    for model in [
        "qwen2_vl/gqa2_tied_published",
        "qwen3_vl/ds2_gqa2_tied_v5",
        "qwen3_5/hybrid_lla_l_gqa2_tied_v5",
    ] {
        reuse_gives_the_same_answers(model);
    }
}

fn reuse_gives_the_same_answers(model: &str) {
    let e = f32_engine(model);
    let dir = common::fixtures().join("images");
    let refs =
        Engine::load_images(&[dir.join("odd_97x211.png"), dir.join("gray_120x90.png")]).unwrap();
    let parts = [
        dir.join("alpha_150x100.png"),
        dir.join("tiny_13x9.png"),
        dir.join("odd_97x211.png"),
    ];
    let messages = |with_part: bool| {
        let mut m = vec![Message::system("You inspect parts.")];
        let mut user = Message::user(2, "These are good parts.");
        if with_part {
            user = Message::user(3, "These are good parts.");
        }
        m.push(user);
        m
    };
    let prefix_prompt = e
        .prompt_from_messages(&messages(false), &refs, &e.preprocessor)
        .unwrap();
    let mut reuse = Reuse::default();
    // The prefix is the rendered prompt cut before the part's image.
    let full0 = {
        let mut imgs = refs.clone();
        imgs.extend(Engine::load_images(&parts[..1]).unwrap());
        e.prompt_from_messages(&messages(true), &imgs, &e.preprocessor)
            .unwrap()
    };
    let vision_start = e.tokenizer.token_to_id("<|vision_start|>").unwrap();
    let cut = full0
        .ids
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == vision_start)
        .nth(2)
        .map(|(i, _)| i)
        .unwrap();
    let mut prefix = prefix_prompt.clone();
    prefix.ids = full0.ids[..cut].to_vec();
    prefix.pixels = full0.pixels.images(0..2);
    e.prefill_prefix(&prefix, &mut reuse).unwrap();
    for part in &parts {
        let mut imgs = refs.clone();
        imgs.extend(Engine::load_images(std::slice::from_ref(part)).unwrap());
        let prompt = e
            .prompt_from_messages(&messages(true), &imgs, &e.preprocessor)
            .unwrap();
        assert!(reuse.prefix.as_ref().unwrap().matches(&prompt));
        let p = params(&e, 0.0, 0, None);
        let plain = e.generate(&prompt, &p, &mut |_| {}).unwrap();
        let reused = e
            .generate_with(&prompt, &p, Some(&mut reuse), &mut |_| {})
            .unwrap();
        assert_eq!(plain.tokens, reused.tokens, "{model}: {}", part.display());
        assert_eq!(plain.prompt_tokens, reused.prompt_tokens);
    }
    // The reference images were encoded once (the prefix), each part once, the repeated part not at all.
    assert_eq!(reuse.features.misses, 2 + 2);
    assert_eq!(reuse.features.hits, 1);
}

/// A verdict without arrays, for the fixture tokenizers whose tiny vocabularies have no `[`.
fn flat_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "verdict": {"enum": ["pass", "fail"]},
            "class": {"enum": ["scratch", "dent", "none"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 99}
        },
        "required": ["verdict", "class", "count"],
        "additionalProperties": false
    })
}

/// Forced tokens (the grammar's fast-forward: keys, quotes, braces, the rest of an enum value) run
/// as one batched forward give the same answer as the same tokens run one decode step each, on
/// every family, greedy and sampled; forcing happens (a good share of a verdict's tokens), and
/// without it the answer still parses.
#[test]
fn forced_tokens_batched_equal_stepwise_on_every_family() {
    // The fixtures' tiny vocabularies: Gemma 3's has no `[`. Phi-3's fixture is left out: its
    // byte tokens were trained in as special added tokens, so under any grammar it can spell no
    // free text at all (a published Phi-3's are plain vocabulary); its decoder is Llama's, and a
    // LongRoPE Phi-3 samples every token (`Sequence::sample`).
    enum Kind {
        Arrays,
        Flat,
    }
    for (model, kind) in [
        ("qwen2_vl/gqa2_tied_published", Kind::Arrays),
        ("qwen2_5_vl/win56_gqa2_tied_v5", Kind::Arrays),
        ("qwen3_vl/ds2_gqa2_tied_v5", Kind::Arrays),
        ("qwen3_5/hybrid_lla_l_gqa2_tied_v5", Kind::Arrays),
        ("qwen2_text/tiny", Kind::Arrays),
        ("llama/llama3", Kind::Arrays),
        ("gemma3/gemma3", Kind::Flat),
    ] {
        let e = f32_engine(model);
        let prompt = e
            .prompt(None, "Inspect the part.", &[], &e.preprocessor)
            .unwrap();
        let grammar = match kind {
            Kind::Arrays => Grammar::JsonSchema(verdict_schema()),
            Kind::Flat => Grammar::JsonSchema(flat_schema()),
        };
        let check = |text: &str, at: &str| {
            let v: Value = serde_json::from_str(text).unwrap_or_else(|err| panic!("{at}: {err}"));
            if let Kind::Arrays = kind {
                check_verdict(&v);
            } else {
                let o = v.as_object().unwrap();
                assert_eq!(o.len(), 3, "{at}");
                assert!(
                    matches!(o["verdict"].as_str(), Some("pass" | "fail")),
                    "{at}"
                );
                assert!((0..=99).contains(&o["count"].as_i64().unwrap()), "{at}");
            }
        };
        for (temperature, seed) in [(0.0, 0), (1.0, 3)] {
            let p = params(&e, temperature, seed, Some(grammar.clone()));
            let run = |mode: FastForward| {
                let at = format!("{model} {mode:?} t={temperature}");
                answer(&e, &prompt, &p, &grammar, mode, &at)
            };
            let (batched, stepwise, off) = (
                run(FastForward::Batched),
                run(FastForward::Stepwise),
                run(FastForward::Off),
            );
            let at = format!("{model} t={temperature}: {:?}", batched.text);
            assert_eq!(batched.tokens, stepwise.tokens, "{at}");
            assert_eq!(batched.text, stepwise.text, "{at}");
            assert_eq!(batched.forced_tokens, stepwise.forced_tokens, "{at}");
            for (a, b) in batched.logprobs.iter().zip(&stepwise.logprobs) {
                assert!((a - b).abs() < 1e-3, "{at}: {a} vs {b}");
            }
            // The keys at least are forced.
            assert!(
                batched.forced_tokens >= 2,
                "{at}: {}",
                batched.forced_tokens
            );
            assert!(batched.forced_tokens < batched.tokens.len(), "{at}");
            check(&batched.text, &at);
            assert_eq!(off.forced_tokens, 0);
            check(&off.text, &at);
        }
    }
}
