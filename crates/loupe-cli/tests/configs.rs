//! Checkpoints as users have them: each family's weights under the published `config.json` and
//! `preprocessor_config.json` key sets, and under the same files after a transformers 5.23
//! `save_pretrained` round trip (`tests/fixtures/configs/`, made by tools/make_config_fixtures.py),
//! give the same model and the same greedy tokens as the fixture's own files, whose tokens the
//! parity tests hold to transformers'.

mod common;

use std::path::Path;

use common::{fixtures, loupe, s};

/// A copy of `weights` with `config_dir`'s config and preprocessor files in place of its own.
fn checkpoint(weights: &Path, config_dir: Option<&Path>) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(weights).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.path().join(e.file_name())).unwrap();
    }
    if let Some(c) = config_dir {
        for f in ["config.json", "preprocessor_config.json"] {
            std::fs::copy(c.join(f), d.path().join(f)).unwrap();
        }
    }
    d
}

fn greedy(model: &Path) -> (Vec<u32>, serde_json::Value) {
    let img = |n: &str| fixtures().join("images").join(n);
    let (a, b) = (img("odd_97x211.png"), img("alpha_150x100.png"));
    let out = loupe(&[
        "run",
        "--model",
        s(model),
        "--image",
        s(&a),
        "--image",
        s(&b),
        "--dtype",
        "f32",
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--json",
        "Describe these two parts.",
    ]);
    assert_eq!(out.code, 0, "{}: {}", model.display(), out.stderr);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    let tokens = serde_json::from_value(v["tokens"].clone()).unwrap();
    let info = loupe(&["info", "--model", s(model), "--json"]);
    assert_eq!(info.code, 0, "{}: {}", model.display(), info.stderr);
    let mut info: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
    info.as_object_mut().unwrap().remove("path");
    (tokens, info)
}

#[test]
fn published_and_resaved_configs_load_the_same_model() {
    let root = fixtures().join("configs");
    let weights: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&std::fs::read(root.join("weights.json")).unwrap()).unwrap();
    assert_eq!(weights.len(), 4, "one entry per family");
    for (family, name) in &weights {
        let w = fixtures().join(family).join(name.as_str().unwrap());
        let resaved = root.join(family).join("resaved");
        // The round trip is what users have: in_chans kept beside in_channels, size beside or in
        // place of min/max pixels, rope_parameters in place of rope_scaling.
        let text = std::fs::read_to_string(resaved.join("config.json")).unwrap();
        assert!(text.contains("rope_parameters"), "{family}");
        if family.starts_with("qwen2") {
            assert!(
                text.contains("\"in_chans\"") && text.contains("\"in_channels\""),
                "{family}"
            );
        }
        let own = checkpoint(&w, None);
        let (want_tokens, want_info) = greedy(own.path());
        for variant in ["published", "resaved"] {
            let d = checkpoint(&w, Some(&root.join(family).join(variant)));
            let (tokens, info) = greedy(d.path());
            assert_eq!(tokens, want_tokens, "{family} {variant}: greedy tokens");
            assert_eq!(info, want_info, "{family} {variant}: info");
        }
    }
}
