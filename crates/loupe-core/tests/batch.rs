//! Batched decoding (`Sequence::step_batch`, what `loupe serve` runs): several answers stepped
//! together give the tokens each gives alone, on every family (batched in the Qwen2-VL decoder,
//! one after the other in the default path) and on quantized weights (the matrix-vector kernel
//! reading each weight row once for all the answers).

mod common;

use candle_core::quantized::GgmlDType;
use loupe_core::engine::LoadOptions;
use loupe_core::generate::{GenerateParams, Grammar, Prompt, SamplingParams, Sequence};
use loupe_core::Engine;
use serde_json::json;

struct Case {
    prompt: Prompt,
    params: GenerateParams,
}

fn params(max_tokens: usize, temperature: f64, seed: u64) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampling: SamplingParams {
            temperature,
            seed,
            ..SamplingParams::default()
        },
        stop_strings: vec![],
        // No end of answer: every answer runs to its own length, so the batch shrinks as they end.
        eos_token_ids: vec![],
        grammar: None,
    }
}

/// Prompts of different lengths (one with an image where the model has a tower), different
/// lengths of answer, greedy and sampled, and one under a JSON schema.
fn cases(e: &Engine, vision: bool) -> Vec<Case> {
    let images = if vision {
        Engine::load_images(&[common::fixtures().join("images/odd_97x211.png")]).unwrap()
    } else {
        vec![]
    };
    let p = |text: &str, imgs: &[loupe_core::image::ImageInput]| {
        e.prompt(None, text, imgs, &e.preprocessor).unwrap()
    };
    let schema = json!({
        "type": "object",
        "properties": {"verdict": {"enum": ["pass", "fail"]}, "note": {"type": "string", "maxLength": 12}},
        "required": ["verdict", "note"],
        "additionalProperties": false
    });
    let mut constrained = params(40, 0.8, 7);
    constrained.grammar = Some(Grammar::JsonSchema(schema));
    vec![
        Case {
            prompt: p("Describe the part.", &images),
            params: params(24, 0.0, 0),
        },
        Case {
            prompt: p("Hi", &[]),
            params: params(9, 0.0, 0),
        },
        Case {
            prompt: p(
                "A longer request, so that this answer's cache is longer than the others.",
                &[],
            ),
            params: params(17, 1.0, 3),
        },
        Case {
            prompt: p("Verdict?", &images),
            params: constrained,
        },
    ]
}

fn start<'e>(e: &'e Engine, c: &Case) -> Sequence<'e> {
    let constraint = c.params.grammar.as_ref().map(|g| e.constraint(g).unwrap());
    e.sequence(&c.prompt, &c.params, constraint, None).unwrap()
}

fn alone(e: &Engine, c: &Case) -> (Vec<u32>, String) {
    let mut s = start(e, c);
    let mut text = String::new();
    while !s.is_finished() {
        text += &s.step().unwrap();
    }
    let g = s.finish(&mut |t| text.push_str(t)).unwrap();
    (g.tokens, text)
}

fn together(e: &Engine, cases: &[Case]) -> Vec<(Vec<u32>, String)> {
    let mut seqs: Vec<Sequence> = cases.iter().map(|c| start(e, c)).collect();
    let mut texts = vec![String::new(); cases.len()];
    let mut steps = 0;
    while seqs.iter().any(|s| !s.is_finished()) {
        let mut live: Vec<(usize, &mut Sequence)> = seqs
            .iter_mut()
            .enumerate()
            .filter(|(_, s)| !s.is_finished())
            .collect();
        let idx: Vec<usize> = live.iter().map(|(i, _)| *i).collect();
        let mut batch: Vec<&mut Sequence> = live.iter_mut().map(|(_, s)| &mut **s).collect();
        for (i, r) in idx.into_iter().zip(Sequence::step_batch(&mut batch)) {
            texts[i] += &r.unwrap();
        }
        steps += 1;
        assert!(steps < 1000, "the batch never finished");
    }
    seqs.into_iter()
        .zip(texts)
        .map(|(s, mut text)| {
            let g = s.finish(&mut |t| text.push_str(t)).unwrap();
            (g.tokens, text)
        })
        .collect()
}

fn check(dir: &str, quant: Option<GgmlDType>) {
    let path = common::fixtures().join(dir);
    let opts = LoadOptions {
        quant,
        ..LoadOptions::default()
    };
    let e = Engine::load(path.to_str().unwrap(), &opts).unwrap();
    let cases = cases(
        &e,
        !dir.starts_with("qwen2_text") && !dir.starts_with("llama"),
    );
    let expected: Vec<_> = cases.iter().map(|c| alone(&e, c)).collect();
    // With no end-of-answer token, the free answers run to their own lengths (so the batch
    // shrinks as they end); the schema answer ends when its JSON closes.
    for (i, ((tokens, _), c)) in expected.iter().zip(&cases).enumerate() {
        if c.params.grammar.is_none() {
            assert_eq!(tokens.len(), c.params.max_tokens, "{dir}: answer {i}");
        } else {
            assert!(!tokens.is_empty() && tokens.len() <= c.params.max_tokens);
        }
    }
    let got = together(&e, &cases);
    for (i, (g, x)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(
            g.0, x.0,
            "{dir} {quant:?}: answer {i}'s tokens, batched vs alone"
        );
        assert_eq!(g.1, x.1, "{dir} {quant:?}: answer {i}'s text");
    }
    // The schema answer keeps to the schema in the batch too.
    let v: serde_json::Value = serde_json::from_str(&got[3].1)
        .unwrap_or_else(|err| panic!("{dir}: {err}: {:?}", got[3].1));
    assert!(
        matches!(v["verdict"].as_str(), Some("pass" | "fail")),
        "{v}"
    );
}

#[test]
fn qwen2_vl_batched_equals_alone() {
    check("qwen2_vl/gqa2_tied_published", None);
}

#[test]
fn qwen2_vl_q4k_batched_equals_alone() {
    check("qwen2_vl/gqa2_tied_published", Some(GgmlDType::Q4K));
}

#[test]
fn qwen2_5_vl_batched_equals_alone() {
    check("qwen2_5_vl/win56_gqa2_tied_v5", None);
}

#[test]
fn qwen3_vl_batched_equals_alone() {
    check("qwen3_vl/ds2_gqa2_tied_v5", None);
}

#[test]
fn qwen3_5_batched_equals_alone() {
    check("qwen3_5/hybrid_lla_l_gqa2_tied_v5", None);
}

#[test]
fn qwen2_text_gguf_batched_equals_alone() {
    check("qwen2_text/tiny.gguf", None);
}

#[test]
fn llama_batched_equals_alone() {
    check("llama/llama3", None);
    check("llama/linear", Some(GgmlDType::Q4K));
}
