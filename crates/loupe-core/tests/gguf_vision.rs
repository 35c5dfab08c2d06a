//! llama.cpp's vision GGUF pair (the text model file and its `mmproj` vision file) loaded as users
//! download them: tools/make_gguf_vl_fixture.py runs llama.cpp's own converter on two tiny parity
//! checkpoints (Qwen2-VL and Qwen2.5-VL), and the pair must give transformers' logits and greedy
//! tokens recorded for those checkpoints (their reference.safetensors).

mod common;

use std::path::{Path, PathBuf};

use common::*;
use loupe_core::image::Preprocessor;
use loupe_core::{Engine, LoadOptions};

/// `(family, the checkpoint it was converted from)`.
const PAIRS: &[(&str, &str)] = &[
    ("qwen2_vl", "qwen2_vl/mha4_tied_bf16_v5"),
    ("qwen2_5_vl", "qwen2_5_vl/win112_gqa2_tied_gguf_v5"),
];

fn pair_dir(family: &str) -> PathBuf {
    fixtures().join("gguf_vl").join(family)
}

fn load(model: &Path, mmproj: Option<&Path>) -> loupe_core::Result<Engine> {
    Engine::load(
        model.to_str().unwrap(),
        &LoadOptions {
            mmproj: mmproj.map(Path::to_path_buf),
            ..Default::default()
        },
    )
}

fn reference(checkpoint: &str) -> Reference {
    Reference::load(fixtures().join(checkpoint).join("reference.safetensors"))
}

#[test]
fn a_vision_pair_gives_transformers_logits_and_greedy_tokens() {
    let px = prompt_pixels();
    for (family, checkpoint) in PAIRS {
        // The directory: its one text GGUF, and the mmproj file beside it.
        let e = load(&pair_dir(family), None).unwrap_or_else(|e| panic!("{family}: {e}"));
        assert_eq!(e.model_type, *family);
        let r = reference(checkpoint);
        for p in r.meta["prompts"].as_array().unwrap() {
            let pname = p["name"].as_str().unwrap();
            let prompt = reference_prompt(&r, &px, pname);
            let (diff, _, scale) = logit_diff(&prompt_logits(&e, &prompt), &r, pname);
            // The same bound as the checkpoints' own parity test (f32, summation order only).
            assert!(
                diff <= 3e-5 * scale.max(1.0),
                "{family}/{pname}: logit diff {diff} (range {scale})"
            );
            let out = e.generate(&prompt, &greedy(&e, 20), &mut |_| {}).unwrap();
            assert_eq!(
                out.tokens,
                r.ids(&format!("{pname}/greedy_tokens")),
                "{family}/{pname}"
            );
        }
    }
}

#[test]
fn a_vision_pair_reads_normalization_from_the_mmproj_and_answers_from_image_files() {
    for (family, checkpoint) in PAIRS {
        let dir = pair_dir(family);
        // The text file named, its vision file given explicitly.
        let e = load(
            &dir.join("model-f32.gguf"),
            Some(&dir.join("mmproj-model-f32.gguf")),
        )
        .unwrap();
        let hf = Engine::load(
            fixtures().join(checkpoint).to_str().unwrap(),
            &LoadOptions::default(),
        )
        .unwrap();
        let (g, c) = (&e.preprocessor.cfg, &hf.preprocessor.cfg);
        for i in 0..3 {
            assert!(
                (g.image_mean[i] - c.image_mean[i]).abs() < 1e-7,
                "{family} mean"
            );
            assert!(
                (g.image_std[i] - c.image_std[i]).abs() < 1e-7,
                "{family} std"
            );
        }
        assert_eq!(
            (g.patch_size, g.merge_size, g.temporal_patch_size),
            (c.patch_size, c.merge_size, c.temporal_patch_size)
        );
        // The GGUF pair states no pixel budget (transformers' default applies); the reference used
        // the checkpoint's small one, so the images are sized with that budget here.
        let pre = Preprocessor::new(loupe_core::load::config::PreprocessorConfig {
            min_pixels: c.min_pixels,
            max_pixels: c.max_pixels,
            ..g.clone()
        });
        let r = reference(checkpoint);
        for p in r.meta["prompts"].as_array().unwrap() {
            let pname = p["name"].as_str().unwrap();
            let images = image_inputs(p["images"].as_array().unwrap());
            let prompt = e.prompt_from_messages(&messages(p), &images, &pre).unwrap();
            assert_eq!(
                prompt.ids,
                r.ids(&format!("{pname}/input_ids")),
                "{family}/{pname}"
            );
            let out = e.generate(&prompt, &greedy(&e, 20), &mut |_| {}).unwrap();
            assert_eq!(
                out.tokens,
                r.ids(&format!("{pname}/greedy_tokens")),
                "{family}/{pname}"
            );
        }
    }
}

/// A scratch folder holding copies of some fixture files.
fn scratch(name: &str, files: &[(&Path, &str)]) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loupe-gguf-vision-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    for (from, to) in files {
        std::fs::copy(from, d.join(to)).unwrap();
    }
    d
}

fn load_err(model: &Path, mmproj: Option<&Path>) -> String {
    match load(model, mmproj) {
        Ok(_) => panic!("{} loaded", model.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_missing_or_mismatched_vision_file_is_a_clear_error() {
    let dir = pair_dir("qwen2_vl");
    let text = dir.join("model-f32.gguf");
    let mmproj = dir.join("mmproj-model-f32.gguf");

    let alone = scratch("alone", &[(&text, "model.gguf")]);
    let err = load_err(&alone.join("model.gguf"), None);
    assert!(
        err.contains("needs its vision file") && err.contains("--mmproj"),
        "{err}"
    );

    let err = load_err(&mmproj, None);
    assert!(err.contains("is a vision file (mmproj)"), "{err}");

    let two = scratch(
        "two",
        &[
            (&text, "model.gguf"),
            (&mmproj, "mmproj-a.gguf"),
            (&mmproj, "mmproj-b.gguf"),
        ],
    );
    let err = load_err(&two.join("model.gguf"), None);
    assert!(
        err.contains("several vision files") && err.contains("mmproj-b.gguf"),
        "{err}"
    );
    // Naming one settles it.
    load(&two.join("model.gguf"), Some(&two.join("mmproj-b.gguf"))).unwrap();

    let err = load_err(&text, Some(&dir.join("no-such-mmproj.gguf")));
    assert!(
        err.contains("no-such-mmproj.gguf") && err.contains("does not exist"),
        "{err}"
    );

    let text_only = fixtures().join("qwen2_text/tiny.gguf");
    let err = load_err(&text_only, Some(&mmproj));
    assert!(
        err.contains("text-only") && err.contains("general.architecture"),
        "{err}"
    );

    // A vision file of another model: the tower's widths do not fit the decoder's.
    let other = pair_dir("qwen2_5_vl").join("mmproj-model-f32.gguf");
    let err = load_err(&text, Some(&other));
    assert!(err.contains("mmproj-model-f32.gguf"), "{err}");

    let err = load_err(
        &fixtures().join("qwen2_vl/mha4_tied_bf16_v5"),
        Some(&mmproj),
    );
    assert!(err.contains("goes with a llama.cpp GGUF model"), "{err}");

    for d in [alone, two] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn a_vision_pair_quantizes_into_a_model_folder_that_loads_like_quantizing_at_load() {
    let q = candle_core::quantized::GgmlDType::Q8_0;
    for (family, checkpoint) in PAIRS {
        let out = std::env::temp_dir().join(format!(
            "loupe-gguf-vision-{}-quantized-{family}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&out);
        let pair = pair_dir(family);
        let report = loupe_core::load::quantize::quantize_model(
            pair.to_str().unwrap(),
            None,
            q,
            &out,
            &mut |_, _| {},
        )
        .unwrap();
        assert!(report.quantized > 0, "{family}: nothing quantized");
        for f in [
            "config.json",
            "tokenizer.json",
            "chat_template.jinja",
            "preprocessor_config.json",
        ] {
            assert!(out.join(f).is_file(), "{family}: no {f}");
        }
        let written = load(&out, None).unwrap();
        let at_load = Engine::load(
            pair.to_str().unwrap(),
            &LoadOptions {
                quant: Some(q),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(written.model_type, *family);
        // The same tensors quantized the same way: the same logits, bit for bit.
        let px = prompt_pixels();
        let r = reference(checkpoint);
        for p in r.meta["prompts"].as_array().unwrap() {
            let prompt = reference_prompt(&r, &px, p["name"].as_str().unwrap());
            let a = prompt_logits(&written, &prompt).flatten_all().unwrap();
            let b = prompt_logits(&at_load, &prompt).flatten_all().unwrap();
            assert_eq!(
                a.to_vec1::<f32>().unwrap(),
                b.to_vec1::<f32>().unwrap(),
                "{family}"
            );
        }
        let _ = std::fs::remove_dir_all(&out);
    }
}
