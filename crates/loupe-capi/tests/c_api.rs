//! libloupe from C: `tests/c/check.c` is compiled against `include/loupe.h` and the static library
//! (and, on the build machine, the shared one), run, and what it prints is compared with the Rust
//! engine's own answers and records on the same model and image: the C API gives the engine's
//! tokens and verdicts, streams what it returns, stops and cancels, and turns every bad input into
//! a status and a message.
//!
//! `LOUPE_TEST_CC` names the C compiler (default `cc`), `LOUPE_TEST_CFLAGS` adds flags (`-static`
//! for aarch64 under qemu), `LOUPE_TEST_RUNNER` a command that runs the program (qemu);
//! tools/aarch64.sh sets them.

use std::path::{Path, PathBuf};
use std::process::Command;

use loupe_core::generate::{FinishReason, GenerateParams, SamplingParams};
use loupe_core::image::ImageInput;
use loupe_core::{Engine, LoadOptions};
use loupe_inspect::inspector::ReuseMode;
use loupe_inspect::{Inspector, Spec};
use serde_json::Value;

const PROMPT: &str = "Inspect the machined part.";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The folder with `libloupe.a` and `libloupe.so` that cargo built for this test.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for dir in [deps, deps.parent().unwrap()] {
        if dir.join("libloupe.a").is_file() {
            return dir.to_path_buf();
        }
    }
    panic!("libloupe.a not found beside {}", exe.display());
}

fn env_words(name: &str) -> Vec<String> {
    std::env::var(name)
        .map(|v| v.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Compiles check.c with `link` (the library and what it needs) into `out`.
fn compile(out: &Path, link: &[String]) {
    let cc = std::env::var("LOUPE_TEST_CC").unwrap_or_else(|_| "cc".into());
    let o = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1"])
        .arg("-I")
        .arg(crate_dir().join("include"))
        .arg(crate_dir().join("tests/c/check.c"))
        .args(link)
        .args(env_words("LOUPE_TEST_CFLAGS"))
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(out)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e}"));
    assert!(
        o.status.success(),
        "{cc} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs the compiled program (under the runner, if any): its `key\tvalue` lines.
fn run(program: &Path, args: &[&Path]) -> Vec<(String, String)> {
    let mut runner = env_words("LOUPE_TEST_RUNNER");
    let mut cmd = if runner.is_empty() {
        Command::new(program)
    } else {
        let mut c = Command::new(runner.remove(0));
        c.args(runner).arg(program);
        c
    };
    let o = cmd
        .args(args)
        .env("HF_HUB_CACHE", "/nonexistent-loupe-test-cache")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "check failed ({}):\n{stdout}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
        .lines()
        .map(|l| {
            let (k, v) = l.split_once('\t').unwrap_or((l, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn value(lines: &[(String, String)], key: &str) -> Value {
    let (_, v) = lines
        .iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("no `{key}` line in {lines:?}"));
    serde_json::from_str(v).unwrap_or_else(|e| panic!("`{key}`: {e}: {v}"))
}

/// `bad` lines: name -> (status, message).
fn failures(lines: &[(String, String)]) -> Vec<(String, i64, String)> {
    lines
        .iter()
        .filter(|(k, _)| k == "bad")
        .map(|(_, v)| {
            let mut parts = v.splitn(3, '\t');
            let name = parts.next().unwrap().to_owned();
            let status = parts.next().unwrap().parse().unwrap();
            let msg: String = serde_json::from_str(parts.next().unwrap()).unwrap();
            (name, status, msg)
        })
        .collect()
}

/// The bad inputs check.c tries, with the status (loupe.h's numbers) and words each must give.
const EXPECTED_FAILURES: &[(&str, i64, &str)] = &[
    ("load_null_path", 1, "model is NULL"),
    ("load_null_out", 1, "out is NULL"),
    ("load_missing", 2, "/nonexistent/model"),
    ("load_bad_quant", 1, "q3_x"),
    ("load_not_utf8", 1, "options.dtype is not UTF-8"),
    ("generate_null_model", 1, "model is NULL"),
    ("generate_null_prompt", 1, "prompt is NULL"),
    ("generate_not_utf8", 1, "prompt is not UTF-8"),
    ("generate_empty", 1, "the prompt is empty"),
    (
        "generate_null_images",
        1,
        "images is NULL with image_count 2",
    ),
    (
        "generate_not_an_image",
        3,
        "images[0]: not a recognised image format",
    ),
    ("generate_null_data", 1, "images[0].data is NULL"),
    ("generate_short_pixels", 3, "images[0] holds"),
    ("generate_narrow_stride", 3, "images[0].stride"),
    ("generate_one_side", 3, "give both sizes"),
    ("generate_huge_pixels", 5, "over the limit"),
    (
        "generate_zero_tokens",
        1,
        "options.max_tokens must be at least 1",
    ),
    ("generate_nan", 1, "NaN"),
    ("generate_top_p", 1, "options.top_p"),
    (
        "generate_schema_not_json",
        1,
        "options.json_schema is not JSON",
    ),
    ("generate_schema_invalid", 7, "grammar"),
    (
        "generate_null_stop",
        1,
        "options.stop is NULL with stop_count 3",
    ),
    ("open_missing_spec", 4, "/nonexistent/spec.toml"),
    ("open_null_model", 1, "model is NULL"),
    ("inspect_null_image", 1, "image is NULL"),
    ("inspect_null_out", 1, "record_json is NULL"),
    ("inspect_short_pixels", 3, "image holds"),
    ("inspect_not_an_image", 6, "not a recognised image format"),
];

#[test]
fn c_program_gets_the_engines_answers_and_records() {
    let demo = root().join("models/loupe-parts-demo");
    let spec_path = demo.join("spec.toml");
    let image_path = demo.join("samples/test/scratch/000.png");
    let tmp = tempfile::tempdir().unwrap();

    // The Rust engine's own answer and record.
    let engine = Engine::load(demo.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let image = loupe_core::image::load(&image_path).unwrap();
    let pixels_path = tmp.path().join("part.rgb");
    std::fs::write(&pixels_path, &image.data).unwrap();
    let (w, h) = (image.width.to_string(), image.height.to_string());
    let input = ImageInput {
        source: image_path.clone(),
        image,
    };
    let prompt = engine
        .prompt(None, PROMPT, &[input], &engine.preprocessor)
        .unwrap();
    let params = GenerateParams {
        max_tokens: 24,
        sampling: SamplingParams::default(),
        stop_strings: vec![],
        eos_token_ids: engine.eos_token_ids(),
        grammar: None,
    };
    let want = engine.generate(&prompt, &params, &mut |_| {}).unwrap();
    let want_finish = match want.finish_reason {
        FinishReason::Stop => 0,
        FinishReason::Length => 1,
    };
    let spec = Spec::load(&spec_path).unwrap();
    let mut inspector = Inspector::new(&engine, spec, ReuseMode::Prefix).unwrap();
    let (want_rec, _) = inspector.inspect(&image_path);
    let want_rec = serde_json::to_value(&want_rec).unwrap();

    let program = tmp.path().join("check");
    compile(
        &program,
        &[lib_dir().join("libloupe.a").display().to_string()],
    );
    let lines = run(
        &program,
        &[
            &demo,
            &spec_path,
            &image_path,
            &pixels_path,
            Path::new(&w),
            Path::new(&h),
        ],
    );
    assert_eq!(value(&lines, "version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(value(&lines, "done"), true);

    // Greedy: the engine's text and token count, from the encoded image and from its pixels.
    for key in ["answer", "answer_pixels"] {
        let a = value(&lines, key);
        assert_eq!(a["text"], want.text.as_str(), "{key}");
        assert_eq!(a["finish"], want_finish, "{key}");
        assert_eq!(a["answer_tokens"], want.tokens.len(), "{key}");
        assert_eq!(a["prompt_tokens"], want.prompt_tokens, "{key}");
    }
    assert!(
        want.tokens.len() > 3,
        "the answer is too short to stop: {want:?}"
    );
    // Stopped by the callback at its second piece, and by another thread at the first: each a
    // start of the whole answer, ending `cancelled`.
    for (key, pieces) in [("answer_stopped", 2), ("answer_cancelled", 1)] {
        let a = value(&lines, key);
        assert_eq!(a["finish"], 2, "{key}: {a}");
        assert_eq!(a["pieces"], pieces, "{key}: {a}");
        let text = a["text"].as_str().unwrap();
        assert!(
            !text.is_empty() && want.text.starts_with(text) && text.len() < want.text.len(),
            "{key}: {text:?} is not a start of {:?}",
            want.text
        );
    }

    // Records: the engine's verdict, boxes and answer, from bytes and from pixels, and after the
    // model was freed (the inspector holds it).
    for key in ["record", "record_pixels", "record_again"] {
        let r = value(&lines, key);
        for field in [
            "verdict",
            "model_verdict",
            "defects",
            "raw_output",
            "frame",
            "error",
        ] {
            assert_eq!(r[field], want_rec[field], "{key}.{field}");
        }
    }
    assert_eq!(value(&lines, "record")["image"], "part.png");
    assert_eq!(
        value(&lines, "record")["image_sha256"],
        want_rec["image_sha256"]
    );
    let broken = value(&lines, "record_broken");
    assert!(broken["verdict"].is_null(), "{broken}");
    assert!(broken["error"]
        .as_str()
        .is_some_and(|e| e.contains("not a recognised image format")));

    // Every bad input: its status and a message that names what is wrong.
    let got = failures(&lines);
    for (name, status, words) in EXPECTED_FAILURES {
        let (_, s, msg) = got
            .iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("check.c did not try {name}"));
        assert_eq!(s, status, "{name}: {msg}");
        assert!(msg.contains(words), "{name}: {msg:?} lacks {words:?}");
    }
    assert_eq!(got.len(), EXPECTED_FAILURES.len(), "{got:?}");
}

/// The shared library links and loads a model too (on the build machine; under qemu the
/// programs are static).
#[test]
fn c_program_links_the_shared_library() {
    if std::env::var_os("LOUPE_TEST_RUNNER").is_some() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let program = tmp.path().join("check_shared");
    let dir = lib_dir();
    compile(
        &program,
        &[
            format!("-L{}", dir.display()),
            "-lloupe".into(),
            format!("-Wl,-rpath,{}", dir.display()),
        ],
    );
    let lines = run(&program, &[&root().join("models/loupe-parts-demo")]);
    assert_eq!(value(&lines, "loaded"), true);
    let ldd = Command::new("ldd").arg(&program).output();
    if let Ok(o) = ldd {
        let deps = String::from_utf8_lossy(&o.stdout);
        assert!(
            deps.contains("libloupe.so"),
            "not linked to libloupe.so:\n{deps}"
        );
    }
}

/// The header also compiles as C++ (what an iOS or Android app's C++ layer includes).
#[test]
fn header_compiles_as_cpp() {
    if std::env::var_os("LOUPE_TEST_RUNNER").is_some() {
        return;
    }
    let Ok(o) = Command::new("c++")
        .args(["-fsyntax-only", "-Wall", "-Werror", "-x", "c++"])
        .arg(crate_dir().join("include/loupe.h"))
        .output()
    else {
        eprintln!("no c++ compiler here; skipped");
        return;
    };
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
