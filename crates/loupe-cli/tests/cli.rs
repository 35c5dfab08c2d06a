//! The `loupe` binary as a user runs it: greedy tokens equal to transformers', and one clear line with
//! exit code 2 for every kind of bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fails_clearly, fixtures, loupe, s, Out};

fn model(name: &str) -> PathBuf {
    fixtures().join("qwen2_vl").join(name)
}

fn image(name: &str) -> PathBuf {
    fixtures().join("images").join(name)
}

/// Reference greedy tokens from the fixture (written by transformers).
fn reference_tokens(name: &str, prompt: &str) -> Vec<u32> {
    let bytes = std::fs::read(model(name).join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(&format!("{prompt}/greedy_tokens")).unwrap();
    t.data()
        .chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect()
}

/// `loupe run --json`, greedy in f32, on the fixtures' two-image prompt (20 tokens).
fn run_two_images(model_args: &[&str]) -> Out {
    let (a, b) = (image("odd_97x211.png"), image("alpha_150x100.png"));
    let mut args = vec!["run"];
    args.extend_from_slice(model_args);
    args.extend_from_slice(&[
        "--image",
        s(&a),
        "--image",
        s(&b),
        "--dtype",
        "f32",
        "--temperature",
        "0",
        "--max-tokens",
        "20",
        "--json",
        "Describe these two parts.",
    ]);
    loupe(&args)
}

#[test]
fn run_json_gives_the_reference_greedy_tokens() {
    for name in [
        "gqa2_tied_published",
        "mqa6_untied_bf16_v5",
        "mha4_tied_bf16_v5",
    ] {
        let out = run_two_images(&["--model", s(&model(name))]);
        assert_eq!(out.code, 0, "{name}: {}", out.stderr);
        let v: serde_json::Value =
            serde_json::from_str(out.stdout.trim()).expect("one JSON object on stdout");
        let tokens: Vec<u32> = serde_json::from_value(v["tokens"].clone()).unwrap();
        assert_eq!(tokens, reference_tokens(name, "two_images"), "{name}");
        assert_eq!(v["prompt_tokens"], 99);
        for k in ["load_ms", "vision_ms", "prefill_ms", "decode_ms"] {
            assert!(v["timings"][k].as_f64().unwrap() >= 0.0, "{k}");
        }
        assert!(v["finish_reason"] == "length" || v["finish_reason"] == "stop");
        // The summary line goes to stderr.
        assert!(
            out.stderr.contains("prefill") && out.stderr.contains("tok/s"),
            "{}",
            out.stderr
        );
    }
}

#[test]
fn run_reads_llama_cpp_gguf_pairs_with_mmproj() {
    // llama.cpp's converter's output for the mha4 checkpoint (tools/make_gguf_vl_fixture.py).
    let pair = fixtures().join("gguf_vl").join("qwen2_vl");
    let (text, mmproj) = (
        pair.join("model-f32.gguf"),
        pair.join("mmproj-model-f32.gguf"),
    );
    for model_args in [
        vec!["--model", s(&text), "--mmproj", s(&mmproj)],
        vec!["--model", s(&text)],
        vec!["--model", s(&pair)],
    ] {
        let out = run_two_images(&model_args);
        assert_eq!(out.code, 0, "{model_args:?}: {}", out.stderr);
        let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
        let tokens: Vec<u32> = serde_json::from_value(v["tokens"].clone()).unwrap();
        assert_eq!(
            tokens,
            reference_tokens("mha4_tied_bf16_v5", "two_images"),
            "{model_args:?}"
        );
    }
    let missing = pair.join("mmproj-missing.gguf");
    fails_clearly(
        &run_two_images(&["--model", s(&text), "--mmproj", s(&missing)]),
        "mmproj-missing.gguf",
    );
    fails_clearly(
        &run_two_images(&["--model", s(&mmproj)]),
        "is a vision file (mmproj)",
    );
}

#[test]
fn run_streams_text_and_sampling_is_reproducible() {
    let m = model("gqa2_tied_published");
    let args = [
        "run",
        "--model",
        s(&m),
        "--temperature",
        "0.9",
        "--top-p",
        "0.95",
        "--top-k",
        "50",
        "--seed",
        "42",
        "--max-tokens",
        "12",
        "--json",
        "Is there a defect?",
    ];
    let (a, b) = (loupe(&args), loupe(&args));
    assert_eq!(a.code, 0, "{}", a.stderr);
    let (va, vb): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&a.stdout).unwrap(),
        serde_json::from_str(&b.stdout).unwrap(),
    );
    assert_eq!(va["tokens"], vb["tokens"], "same seed, same tokens");
    assert_eq!(va["text"], vb["text"]);
    let greedy = loupe(&[
        "run",
        "--model",
        s(&m),
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--json",
        "Is there a defect?",
    ]);
    let vg: serde_json::Value = serde_json::from_str(&greedy.stdout).unwrap();
    assert_ne!(
        va["tokens"], vg["tokens"],
        "sampling at T=0.9 should differ from greedy"
    );
    let text = loupe(&["run", "--model", s(&m), "--max-tokens", "5", "hello"]);
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert!(
        !text.stdout.trim_start().starts_with('{'),
        "plain run streams text, not JSON"
    );
}

#[test]
fn info_names_the_architecture_and_sizes() {
    let out = loupe(&[
        "info",
        "--model",
        s(&model("mqa6_untied_bf16_v5")),
        "--json",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["model_type"], "qwen2_vl");
    assert_eq!(v["stored_dtype"], "bf16");
    assert_eq!(v["kv_heads"], 1);
    assert!(v["params_vision"].as_u64().unwrap() > 0 && v["params_text"].as_u64().unwrap() > 0);
}

/// A copy of a fixture checkpoint that a test may break.
fn scratch_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(model("gqa2_tied_published")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    dir
}

fn run_on(m: &Path, extra: &[&str]) -> Out {
    let mut args = vec!["run", "--model", s(m), "--max-tokens", "2"];
    args.extend_from_slice(extra);
    loupe(&args)
}

#[test]
fn bad_models_fail_clearly() {
    fails_clearly(
        &run_on(Path::new("/no/such/model"), &["hi"]),
        "/no/such/model",
    );
    fails_clearly(
        &run_on(Path::new("nobody/no-such-model"), &["hi"]),
        "nobody/no-such-model",
    );

    let d = scratch_model();
    std::fs::remove_file(d.path().join("tokenizer.json")).unwrap();
    fails_clearly(&run_on(d.path(), &["hi"]), "tokenizer.json");

    let d = scratch_model();
    std::fs::write(d.path().join("config.json"), "{ not json").unwrap();
    fails_clearly(&run_on(d.path(), &["hi"]), "config.json");

    let d = scratch_model();
    let cfg = std::fs::read_to_string(d.path().join("config.json")).unwrap();
    std::fs::write(
        d.path().join("config.json"),
        cfg.replace("\"qwen2_vl\"", "\"llava_next\""),
    )
    .unwrap();
    fails_clearly(&run_on(d.path(), &["hi"]), "llava_next");

    let d = scratch_model();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("config.json")).unwrap())
            .unwrap();
    let mut cfg = cfg;
    cfg["intermediate_size"] = serde_json::json!(100);
    std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
    fails_clearly(&run_on(d.path(), &["hi"]), "mlp.gate_proj.weight");

    let d = scratch_model();
    let mut cfg2 = cfg.clone();
    cfg2["intermediate_size"] = serde_json::json!(128);
    cfg2.as_object_mut().unwrap().remove("num_attention_heads");
    std::fs::write(d.path().join("config.json"), cfg2.to_string()).unwrap();
    fails_clearly(&run_on(d.path(), &["hi"]), "num_attention_heads");

    let d = scratch_model();
    let w = std::fs::read(d.path().join("model.safetensors")).unwrap();
    std::fs::write(d.path().join("model.safetensors"), &w[..w.len() / 2]).unwrap();
    fails_clearly(&run_on(d.path(), &["hi"]), "model.safetensors");

    let d = scratch_model();
    std::fs::write(d.path().join("model.safetensors"), b"").unwrap();
    fails_clearly(&run_on(d.path(), &["hi"]), "model.safetensors");
}

#[test]
fn bad_images_and_prompts_fail_clearly() {
    let m = model("gqa2_tied_published");
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);

    fails_clearly(
        &run_on(&m, &["--image", "/no/such/image.png", "hi"]),
        "/no/such/image.png",
    );

    let png = std::fs::read(image("odd_97x211.png")).unwrap();
    std::fs::write(p("truncated.png"), &png[..png.len() / 2]).unwrap();
    fails_clearly(
        &run_on(&m, &["--image", s(&p("truncated.png")), "hi"]),
        "truncated.png",
    );

    let jpg = std::fs::read(image("rotated_exif6.jpg")).unwrap();
    std::fs::write(p("truncated.jpg"), &jpg[..jpg.len() * 2 / 3]).unwrap();
    fails_clearly(
        &run_on(&m, &["--image", s(&p("truncated.jpg")), "hi"]),
        "truncated.jpg",
    );

    std::fs::write(p("text.png"), b"this is not an image at all").unwrap();
    fails_clearly(
        &run_on(&m, &["--image", s(&p("text.png")), "hi"]),
        "text.png",
    );

    std::fs::write(p("empty.jpg"), b"").unwrap();
    fails_clearly(
        &run_on(&m, &["--image", s(&p("empty.jpg")), "hi"]),
        "empty.jpg",
    );

    // A PNG whose header claims 0 x 10 pixels, and one that claims 20000 x 20000 (over the limit).
    std::fs::write(p("zero.png"), png_header(0, 10)).unwrap();
    fails_clearly(
        &run_on(&m, &["--image", s(&p("zero.png")), "hi"]),
        "zero.png",
    );
    std::fs::write(p("huge.png"), png_header(20000, 20000)).unwrap();
    fails_clearly(
        &run_on(&m, &["--image", s(&p("huge.png")), "hi"]),
        "huge.png",
    );

    // Aspect ratio over 200.
    let img = image::RgbImage::from_pixel(402, 2, image::Rgb([10, 20, 30]));
    img.save(p("sliver.png")).unwrap();
    let out = run_on(&m, &["--image", s(&p("sliver.png")), "hi"]);
    fails_clearly(&out, "sliver.png");
    assert!(out.stderr.contains("aspect ratio"));

    fails_clearly(&run_on(&m, &[""]), "prompt is empty");
    fails_clearly(&run_on(&m, &["--dtype", "f64", "hi"]), "--dtype");
    fails_clearly(
        &run_on(&m, &["--top-p", "1.5", "--temperature", "1", "hi"]),
        "--top-p",
    );
    fails_clearly(
        &run_on(&m, &["--min-pixels", "90000", "--max-pixels", "1000", "hi"]),
        "--min-pixels",
    );
}

/// A PNG signature and IHDR chunk declaring `w x h` RGB, with no image data after it.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut v = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    v.extend_from_slice(&13u32.to_be_bytes());
    v.extend_from_slice(&ihdr);
    v.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    v
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[test]
fn hub_ids_resolve_offline_in_the_hf_cache() {
    // <cache>/models--org--name/refs/main holds the commit; snapshots/<commit>/ holds the files.
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--loupe-test--tiny-qwen2-vl");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for e in std::fs::read_dir(model("gqa2_tied_published")).unwrap() {
        let e = e.unwrap();
        std::os::unix::fs::symlink(e.path(), snap.join(e.file_name())).unwrap();
    }
    let run = |env: (&str, &Path), id: &str| {
        Command::new(env!("CARGO_BIN_EXE_loupe"))
            .args(["info", "--model", id, "--json"])
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_HOME")
            .env(env.0, env.1)
            .output()
            .unwrap()
    };
    let o = run(("HF_HUB_CACHE", cache.path()), "loupe-test/tiny-qwen2-vl");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["path"].as_str().unwrap().ends_with(commit));
    // HF_HOME/hub, and a revision given by commit.
    let home = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(cache.path(), home.path().join("hub")).unwrap();
    let o = run(
        ("HF_HOME", home.path()),
        &format!("loupe-test/tiny-qwen2-vl@{commit}"),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // An unknown revision names what is missing.
    let o = run(
        ("HF_HUB_CACHE", cache.path()),
        "loupe-test/tiny-qwen2-vl@v9",
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("v9"));
}

#[test]
fn bench_reports_and_applies_quantization() {
    let m = model("gqa2_tied_published");
    let out = loupe(&[
        "bench",
        "--model",
        s(&m),
        "--quant",
        "q8_0",
        "--image-sizes",
        "56",
        "--prefill-tokens",
        "8",
        "--decode-tokens",
        "4",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["quant"], "q8_0");
    assert_eq!(v["dtype"], "f32");
    assert!(v["decode_tok_s"].as_f64().unwrap() > 0.0);
    fails_clearly(
        &loupe(&["bench", "--model", s(&m), "--quant", "q3"]),
        "--quant",
    );
}

#[test]
fn quantize_writes_a_model_that_loads_without_requantizing() {
    let m = model("gqa2_tied_published");
    let out = tempfile::tempdir().unwrap();
    let q = out.path().join("q8");
    let r = loupe(&[
        "quantize",
        "--model",
        s(&m),
        "--quant",
        "q8_0",
        "--out",
        s(&q),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(q.join("model.gguf").is_file() && q.join("tokenizer.json").is_file());
    // The quantized directory gives exactly what quantizing at load gives.
    let args = |model: &Path, extra: &[&str]| {
        let mut a = vec![
            "run",
            "--model",
            s(model),
            "--image",
            s(&image("odd_97x211.png")).to_string().leak(),
            "--temperature",
            "0",
            "--max-tokens",
            "12",
            "--json",
            "Describe this part.",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let run = |a: Vec<String>| {
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let o = loupe(&refs);
        assert_eq!(o.code, 0, "{}", o.stderr);
        let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        v["tokens"].clone()
    };
    assert_eq!(run(args(&q, &[])), run(args(&m, &["--quant", "q8_0"])));
    let info = loupe(&["info", "--model", s(&q), "--json"]);
    assert_eq!(info.code, 0, "{}", info.stderr);
    // Refuses to overwrite, and refuses to quantize twice.
    fails_clearly(
        &loupe(&[
            "quantize",
            "--model",
            s(&m),
            "--quant",
            "q8_0",
            "--out",
            s(&q),
        ]),
        "already holds a model",
    );
    let q2 = out.path().join("again");
    fails_clearly(
        &loupe(&[
            "quantize",
            "--model",
            s(&q),
            "--quant",
            "q4_0",
            "--out",
            s(&q2),
        ]),
        "already quantized",
    );
    // A corrupt GGUF names the file.
    let bad = out.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    for e in std::fs::read_dir(&q).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), bad.join(e.file_name())).unwrap();
    }
    let g = std::fs::read(q.join("model.gguf")).unwrap();
    std::fs::write(bad.join("model.gguf"), &g[..g.len() / 3]).unwrap();
    fails_clearly(&loupe(&["run", "--model", s(&bad), "hi"]), "model.gguf");
}

/// The `__metadata__.meta` JSON of a fixture's reference.safetensors (the header is JSON after its
/// 8-byte length).
fn reference_meta(dir: &std::path::Path) -> serde_json::Value {
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    serde_json::from_str(header["__metadata__"]["meta"].as_str().unwrap()).unwrap()
}

#[test]
fn every_family_answers_greedily_as_transformers_from_the_command_line() {
    // What a user (or a checker) runs: `loupe run --dtype f32 --temperature 0 --json` with the image
    // files; the text must be transformers' greedy continuation of the same prompt.
    for m in [
        "qwen2_vl/gqa2_tied_published",
        "qwen2_5_vl/win56_gqa2_tied_v5",
        "qwen2_5_vl/win112_mqa4_untied_bf16_published",
        "qwen3_vl/ds2_gqa2_tied_v5",
        "qwen3_vl/ds1_mqa4_hd32_untied_bf16_published",
        "qwen3_5/hybrid_lla_l_gqa2_tied_v5",
        "qwen3_5/hybrid_interval4_mqa_untied_bf16_published",
    ] {
        let dir = fixtures().join(m);
        let meta = reference_meta(&dir);
        let p = &meta["prompts"][0];
        assert_eq!(p["name"], "two_images");
        let mut args = vec![
            "run".to_string(),
            "--model".into(),
            s(&dir).into(),
            "--dtype".into(),
            "f32".into(),
            "--temperature".into(),
            "0".into(),
            "--max-tokens".into(),
            "20".into(),
            "--json".into(),
        ];
        for img in p["images"].as_array().unwrap() {
            args.push("--image".into());
            args.push(s(&fixtures().join("images").join(img.as_str().unwrap())).into());
        }
        args.push(p["text"].as_str().unwrap().into());
        let out = loupe(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(out.code, 0, "{m}: {}", out.stderr);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["text"], p["greedy_text"], "{m}");
    }
}

/// The dataset tool without numpy and Pillow (`python3 -S`: no site-packages) says what to install
/// and where the pins are, instead of a traceback; the pins file exists and the README names it.
#[test]
fn the_dataset_tool_names_its_requirements_when_they_are_missing() {
    let root = common::root();
    let Ok(out) = Command::new("python3")
        .args(["-S", "tools/make_inspection_dataset.py", "--help"])
        .current_dir(&root)
        .output()
    else {
        assert!(std::env::var_os("CI").is_none(), "python3 is part of CI");
        return;
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("tools/requirements-dataset.txt") && !stderr.contains("Traceback"),
        "{stderr}"
    );
    let pins = std::fs::read_to_string(root.join("tools/requirements-dataset.txt")).unwrap();
    for pkg in ["numpy==", "pillow=="] {
        assert!(pins.contains(pkg), "{pkg} pinned");
    }
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(readme.contains("tools/requirements-dataset.txt"));
}
