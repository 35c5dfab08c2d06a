//! The shipped demonstration model (models/loupe-parts-demo, trained by tools/train_inspection_model.py):
//! the README's command inspects the bundled samples with the verdicts of their labels, and Loupe's
//! greedy tokens equal transformers' (f32) on every sample.

mod common;

use std::path::PathBuf;

use common::{root, s};
use loupe_core::generate::{GenerateParams, SamplingParams};
use loupe_core::{Engine, LoadOptions};
use loupe_inspect::inspector::ReuseMode;
use loupe_inspect::{Inspector, Spec};
use serde_json::Value;

fn demo() -> PathBuf {
    root().join("models/loupe-parts-demo")
}

/// `labels.jsonl` of the bundled samples: image path (relative to samples/) -> class.
fn labels() -> Vec<(String, String)> {
    std::fs::read_to_string(demo().join("samples/labels.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["image"].as_str().unwrap().to_owned(),
                v["class"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn readme_command_gets_the_labelled_verdicts() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // As the README has it (`--db` inside --out), with a data folder of the test's own.
    let data = tmp.path().join("data");
    let db = out.join("audit.sqlite");
    let run = |args: &[&str]| {
        let o = common::loupe_command()
            .args(args)
            .env("XDG_DATA_HOME", &data)
            .env_remove("LOUPE_DB")
            .env("HF_HUB_CACHE", "/nonexistent-loupe-test-cache")
            .output()
            .unwrap();
        common::Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    };
    let r = run(&[
        "inspect",
        "--spec",
        s(&demo().join("spec.toml")),
        "--out",
        s(&out),
        "--db",
        s(&db),
        s(&demo().join("samples/test")),
    ]);
    // Some samples are defective: exit code 1, and no errors.
    assert_eq!(r.code, 1, "{}", r.stderr);
    let recs: Vec<Value> = std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let labels = labels();
    assert_eq!(recs.len(), labels.len());
    let mut right = 0;
    for rec in &recs {
        let image = rec["image"].as_str().unwrap();
        let (_, class) = labels
            .iter()
            .find(|(p, _)| image.ends_with(p.as_str()))
            .unwrap_or_else(|| panic!("{image} is not a labelled sample"));
        let want = if class == "good" { "pass" } else { "fail" };
        if rec["verdict"] == want {
            right += 1;
        } else {
            eprintln!("{image} ({class}): {}", rec["raw_output"]);
        }
    }
    eprintln!("{right} of {} verdicts match the labels", recs.len());
    // The model gets all 16 right (its card); any miss here is a regression.
    assert_eq!(
        right,
        recs.len(),
        "{right} of {} verdicts match the labels",
        recs.len()
    );
    assert!(out.join("report.html").is_file());
    assert!(out.join("overlays").read_dir().unwrap().count() == recs.len());
    // The model is named as written, not `models/loupe-parts-demo/.`; each overlay keeps its
    // class folder in its name.
    for rec in &recs {
        let model = rec["model"].as_str().unwrap();
        assert!(model.ends_with("models/loupe-parts-demo"), "{model}");
    }
    for class in ["good", "scratch", "dent", "crack", "missing_hole", "stain"] {
        assert!(
            out.join("overlays").read_dir().unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(&format!("-{class}-"))),
            "no overlay named for {class}"
        );
    }

    // `loupe history` without --db reads the database that inspect just wrote: a header, then one
    // row per image, the failed ones with their classes.
    let h = run(&["history", "--limit", "100"]);
    assert_eq!(h.code, 0, "{}", h.stderr);
    assert!(h.stderr.contains(s(&db)), "{}", h.stderr);
    let lines: Vec<&str> = h.stdout.lines().collect();
    assert_eq!(lines.len(), 1 + recs.len(), "{}", h.stdout);
    assert!(lines[0]
        .split_whitespace()
        .eq(["ID", "TIME", "VERDICT", "SPEC", "IMAGE", "FINDINGS"]));
    let classes = ["scratch", "dent", "crack", "missing_hole", "stain"];
    for line in &lines[1..] {
        let findings = line.rsplit("  ").next().unwrap().trim();
        if line.contains(" fail ") {
            assert!(
                findings
                    .split(", ")
                    .all(|f| classes.contains(&f.split(' ').next().unwrap())),
                "a failed part names its classes: {line}"
            );
        } else {
            assert_eq!(findings, "-", "{line}");
        }
    }
}

#[test]
fn greedy_tokens_match_transformers_on_every_sample() {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(demo().join("samples/reference.json")).unwrap(),
    )
    .unwrap();
    let engine = Engine::load(s(&demo()), &LoadOptions::default()).unwrap();
    let spec = Spec::load(&demo().join("spec.toml")).unwrap();
    let inspector = Inspector::new(&engine, spec, ReuseMode::None).unwrap();
    let mut checked = 0;
    for (image, want) in reference.as_object().unwrap() {
        let path = demo().join("samples").join(image);
        let part = Engine::load_images(&[&path]).unwrap().remove(0);
        let prompt = inspector.prompt(part).unwrap();
        assert_eq!(
            prompt.ids.len() as u64,
            want["prompt_tokens"].as_u64().unwrap(),
            "{image}"
        );
        let tokens: Vec<u32> = want["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        let params = GenerateParams {
            max_tokens: 60,
            sampling: SamplingParams::default(),
            stop_strings: vec![],
            eos_token_ids: engine.eos_token_ids(),
            grammar: None,
        };
        let out = engine.generate(&prompt, &params, &mut |_| {}).unwrap();
        assert_eq!(out.tokens, tokens, "{image}");
        assert_eq!(out.text, want["text"].as_str().unwrap(), "{image}");
        checked += 1;
    }
    assert_eq!(checked, labels().len());
}
