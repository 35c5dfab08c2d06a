//! `loupe inspect`, `eval` and `history` as a user runs them, on the tiny random-weight fixture model
//! and the fixture parts dataset: every answer parses against the schema, records and files are all
//! there, bad input is one line with exit 2, a watched folder waits for half-written files (also
//! through a pause mid-file), and two
//! processes writing one audit log lose nothing.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{fails_clearly, loupe, root, s};
use serde_json::Value;

fn spec() -> PathBuf {
    root().join("examples/inspection.toml")
}

fn parts() -> PathBuf {
    root().join("tests/fixtures/inspection/parts")
}

fn records(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const CLASSES: [&str; 5] = ["scratch", "dent", "crack", "missing_hole", "stain"];

/// The raw answer of a record validates against the spec's schema (examples/inspection.toml).
fn check_answer(raw: &str) {
    let v: Value = serde_json::from_str(raw).unwrap_or_else(|e| panic!("{e}: {raw}"));
    let o = v.as_object().unwrap();
    assert_eq!(
        o.keys().collect::<Vec<_>>(),
        ["verdict", "defects"],
        "{raw}"
    );
    assert!(
        matches!(o["verdict"].as_str(), Some("pass" | "fail")),
        "{raw}"
    );
    let defects = o["defects"].as_array().unwrap();
    assert!(defects.len() <= 4, "{raw}");
    for d in defects {
        let d = d.as_object().unwrap();
        assert_eq!(
            d.keys().collect::<Vec<_>>(),
            ["class", "box", "note"],
            "{raw}"
        );
        assert!(CLASSES.contains(&d["class"].as_str().unwrap()), "{raw}");
        let b = d["box"].as_array().unwrap();
        assert_eq!(b.len(), 4);
        assert!(
            b.iter().all(|x| (0..=1000).contains(&x.as_i64().unwrap())),
            "{raw}"
        );
        assert!(d["note"].as_str().unwrap().chars().count() <= 60, "{raw}");
    }
}

#[test]
fn inspect_a_folder_with_a_corrupt_file_writes_every_output() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = tmp.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    for class in ["good", "scratch", "dent"] {
        let from = parts().join("test").join(class).join("000.png");
        std::fs::copy(&from, imgs.join(format!("{class}.png"))).unwrap();
    }
    std::fs::write(imgs.join("corrupt.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let rotated = root().join("tests/fixtures/images/rotated_exif6.jpg");
    let out = tmp.path().join("out");
    let db = tmp.path().join("audit.sqlite");
    let r = loupe(&[
        "inspect",
        "--spec",
        s(&spec()),
        "--out",
        s(&out),
        "--db",
        s(&db),
        "--json",
        s(&imgs),
        s(&rotated),
    ]);
    // One unreadable image: the batch goes on and the run ends with exit code 2.
    assert_eq!(r.code, 2, "{}", r.stderr);
    let recs = records(&out);
    assert_eq!(recs.len(), 5);
    let stdout_lines: Vec<Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(stdout_lines, recs);
    for rec in &recs {
        let name = rec["image"].as_str().unwrap();
        if name.ends_with("corrupt.png") {
            assert!(
                rec["error"].as_str().unwrap().contains("corrupt.png"),
                "{rec}"
            );
            assert!(rec["verdict"].is_null());
            continue;
        }
        // A cut answer (the random model can fill max_tokens) is an error record, never a bad verdict.
        if rec["error"].is_null() {
            check_answer(rec["raw_output"].as_str().unwrap());
            assert!(matches!(rec["verdict"].as_str(), Some("pass" | "fail")));
            let score = rec["fail_score"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&score));
            let frame = &rec["frame"];
            for d in rec["defects"].as_array().unwrap() {
                let b: Vec<i64> = d["box"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_i64().unwrap())
                    .collect();
                let (w, h) = (
                    frame["upright"][0].as_i64().unwrap(),
                    frame["upright"][1].as_i64().unwrap(),
                );
                assert!(
                    b[0] <= b[2] && b[1] <= b[3] && b[2] <= w && b[3] <= h,
                    "{rec}"
                );
            }
        }
        assert_eq!(rec["image_sha256"].as_str().unwrap().len(), 64);
        assert_eq!(rec["weights_sha256"].as_str().unwrap().len(), 64);
    }
    let rot = recs
        .iter()
        .find(|r| r["image"].as_str().unwrap().ends_with(".jpg"))
        .unwrap();
    assert_eq!(rot["frame"]["orientation"], 6);
    assert_eq!(rot["frame"]["stored"], serde_json::json!([640, 480]));
    assert_eq!(rot["frame"]["upright"], serde_json::json!([480, 640]));
    // Overlays for the readable images, a CSV row each, a report naming every file.
    let overlays = std::fs::read_dir(out.join("overlays")).unwrap().count();
    assert_eq!(overlays, 4);
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 6);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    for rec in &recs {
        let name = Path::new(rec["image"].as_str().unwrap())
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert!(html.contains(&name), "{name}");
    }
    assert!(html.contains("data:image/jpeg;base64,"));
    // The audit log has all five, and history filters them.
    let h = loupe(&["history", "--db", s(&db), "--json"]);
    assert_eq!(h.code, 0, "{}", h.stderr);
    assert_eq!(h.stdout.lines().count(), 5);
    let h = loupe(&["history", "--db", s(&db), "--verdict", "error", "--json"]);
    assert!(h.stdout.lines().count() >= 1);
    assert!(h.stdout.lines().all(|l| l.contains("\"verdict\":null")));
    let h = loupe(&["history", "--db", s(&db), "--image", "corrupt"]);
    let lines: Vec<&str> = h.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "a header and the one row: {}", h.stdout);
    assert!(lines[0]
        .split_whitespace()
        .eq(["ID", "TIME", "VERDICT", "SPEC", "IMAGE", "FINDINGS"]));
    assert!(lines[1].contains("corrupt.png") && lines[1].contains("error"));
}

#[test]
fn prefix_reuse_changes_no_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = parts().join("test");
    let mut raw = Vec::new();
    for mode in ["prefix", "features", "none"] {
        let out = tmp.path().join(mode);
        let r = loupe(&[
            "inspect",
            "--spec",
            s(&spec()),
            "--out",
            s(&out),
            "--no-audit",
            "--reuse",
            mode,
            s(&dir),
        ]);
        assert!(r.code == 0 || r.code == 1 || r.code == 2, "{}", r.stderr);
        raw.push(
            records(&out)
                .iter()
                .map(|r| r["raw_output"].clone())
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(raw[0].len(), 7);
    assert_eq!(raw[0], raw[1]);
    assert_eq!(raw[0], raw[2]);
}

#[test]
fn bad_specs_and_arguments_are_one_line_with_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.toml");
    let text = std::fs::read_to_string(spec())
        .unwrap()
        .replace("min_defects = 1 ", "min_defects = \"one\" ");
    std::fs::write(&bad, text).unwrap();
    let img = parts().join("test/good/000.png");
    let sp = spec();
    let no_db = tmp.path().join("none.sqlite");
    let cases: [(&[&str], &str); 6] = [
        (
            &["inspect", "--spec", s(&bad), "--no-audit", s(&img)],
            "bad.toml:65: `min_defects",
        ),
        (&["inspect", "--spec", s(&sp), "--no-audit"], "give images"),
        (
            &[
                "inspect",
                "--spec",
                s(&sp),
                "--no-audit",
                "/nonexistent/dir",
            ],
            "/nonexistent/dir",
        ),
        (
            &[
                "inspect",
                "--spec",
                s(&sp),
                "--no-audit",
                "--reuse",
                "all",
                s(&img),
            ],
            "--reuse `all`",
        ),
        (
            &["eval", "--spec", s(&sp), "--no-audit", s(tmp.path())],
            "not a dataset: expected test/good",
        ),
        (&["history", "--db", s(&no_db)], "no audit log"),
    ];
    for (args, what) in cases {
        fails_clearly(&loupe(args), what);
    }
}

#[test]
fn watch_waits_for_half_written_files() {
    let tmp = tempfile::tempdir().unwrap();
    let watched = tmp.path().join("camera");
    std::fs::create_dir_all(&watched).unwrap();
    // A file already there is not new.
    std::fs::copy(parts().join("test/good/000.png"), watched.join("old.png")).unwrap();
    let out = tmp.path().join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_loupe"))
        .args([
            "inspect",
            "--spec",
            s(&spec()),
            "--no-audit",
            "--out",
            s(&out),
            "--watch",
            s(&watched),
            "--max-images",
            "2",
            "--poll-ms",
            "100",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // A camera writes the first image in two halves, a second apart.
    let bytes = std::fs::read(parts().join("test/scratch/000.png")).unwrap();
    let target = watched.join("new1.png");
    {
        let mut f = std::fs::File::create(&target).unwrap();
        f.write_all(&bytes[..bytes.len() / 2]).unwrap();
        f.flush().unwrap();
        // Growing at every look for a while, then a pause of several looks with the end missing.
        let rest = &bytes[bytes.len() / 2..];
        for chunk in rest[..rest.len() - 40].chunks(rest.len() / 8 + 1) {
            std::thread::sleep(Duration::from_millis(30));
            f.write_all(chunk).unwrap();
            f.flush().unwrap();
        }
        std::thread::sleep(Duration::from_millis(700));
        f.write_all(&rest[rest.len() - 40..]).unwrap();
        f.flush().unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    std::fs::copy(parts().join("test/dent/000.png"), watched.join("new2.png")).unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "watch did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    let recs = records(&out);
    let names: Vec<&str> = recs.iter().map(|r| r["image"].as_str().unwrap()).collect();
    assert_eq!(recs.len(), 2, "{names:?} {stderr}");
    assert!(
        names[0].ends_with("new1.png") && names[1].ends_with("new2.png"),
        "{names:?}"
    );
    for r in &recs {
        let e = r["error"].as_str().unwrap_or("");
        assert!(!e.contains("truncated") && !e.contains("decode"), "{r}");
        assert_eq!(r["image_sha256"].as_str().unwrap().len(), 64);
    }
    assert!(out.join("report.html").is_file());
}

#[test]
fn two_inspections_at_once_lose_no_audit_row() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("shared.sqlite");
    let dir = parts().join("test");
    let spawn = |n: usize| {
        Command::new(env!("CARGO_BIN_EXE_loupe"))
            .args([
                "inspect",
                "--spec",
                s(&spec()),
                "--db",
                s(&db),
                "--reuse",
                "none",
                "--out",
                s(&tmp.path().join(format!("out{n}"))),
                s(&dir),
                s(&dir),
                s(&dir),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(1), spawn(2));
    for c in [a, b] {
        let o = c.wait_with_output().unwrap();
        assert!(
            o.status.code().unwrap() <= 2,
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            !String::from_utf8_lossy(&o.stderr).contains("audit"),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let h = loupe(&["history", "--db", s(&db), "--limit", "1000", "--json"]);
    assert_eq!(h.stdout.lines().count(), 2 * 3 * 7, "{}", h.stderr);
}

#[test]
fn eval_scores_the_fixture_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("eval");
    let r = loupe(&[
        "eval",
        "--spec",
        s(&spec()),
        "--no-audit",
        "--out",
        s(&out),
        s(&parts()),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let e: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    let m = &e["metrics"];
    assert_eq!(m["images"], 7);
    assert_eq!(m["good"], 2);
    assert_eq!(m["defective"], 5);
    // The metrics agree with the per-image rows they were computed from.
    let rows = e["images"].as_array().unwrap();
    let mut correct = 0;
    for row in rows {
        let defective = row["class"] != "good";
        let fail = match row["verdict"].as_str() {
            Some(v) => v == "fail",
            None => !defective,
        };
        if fail == defective {
            correct += 1;
        }
        if defective {
            // Truth boxes come from the masks: one region per drawn defect.
            assert!(!row["truth_boxes"].as_array().unwrap().is_empty(), "{row}");
        }
    }
    assert!((m["accuracy"].as_f64().unwrap() - correct as f64 / 7.0).abs() < 1e-9);
    assert!(out.join("eval.html").is_file() && out.join("report.html").is_file());

    // The terminal gets a table a person reads, not the JSON: counts, the accuracy as eval.json
    // has it, and a confusion row per truth class.
    assert!(
        r.stdout.starts_with("7 images: 2 good, 5 defective"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.lines().count() < 30, "{}", r.stdout);
    let accuracy = format!("{:.1}%", 100.0 * m["accuracy"].as_f64().unwrap());
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("accuracy"))
        .unwrap();
    assert!(line.contains(&accuracy), "{line} != {accuracy}");
    let confusion = m["confusion"].as_object().unwrap();
    let table: Vec<&str> = r
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("confusion"))
        .collect();
    assert_eq!(table.len(), 2 + confusion.len(), "{}", r.stdout);
    // `--json` prints the machine form: eval.json's metrics, on one line.
    let again = loupe(&[
        "eval",
        "--spec",
        s(&spec()),
        "--no-audit",
        "--json",
        "--out",
        s(&tmp.path().join("again")),
        s(&parts()),
    ]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.stdout.lines().count(), 1);
    let j: Value = serde_json::from_str(&again.stdout).unwrap();
    assert_eq!(j["metrics"]["confusion"], m["confusion"]);
}

#[test]
fn run_with_a_schema_and_boxes_maps_the_answer_to_pixels() {
    let tmp = tempfile::tempdir().unwrap();
    let schema = tmp.path().join("grounding.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "properties": {
            "label": {"enum": ["scratch", "dent"]},
            "bbox_2d": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1000},
                        "minItems": 4, "maxItems": 4}},
           "required": ["label", "bbox_2d"], "additionalProperties": false}"#,
    )
    .unwrap();
    let model = root().join("tests/fixtures/qwen2_vl/gqa2_tied_published");
    // EXIF-rotated photo: shown 480x640, stored 640x480.
    let img = root().join("tests/fixtures/images/rotated_exif6.jpg");
    for seed in ["0", "1", "2"] {
        let r = loupe(&[
            "run",
            "--model",
            s(&model),
            "--image",
            s(&img),
            "--json-schema",
            s(&schema),
            "--json",
            "--boxes",
            "--temperature",
            "1.0",
            "--seed",
            seed,
            "Where is the defect?",
        ]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let out: Value = serde_json::from_str(r.stdout.trim()).unwrap();
        let answer: Value = serde_json::from_str(out["text"].as_str().unwrap()).unwrap();
        let b = &out["boxes"][0];
        assert_eq!(b["label"], answer["label"]);
        let c: Vec<f64> = answer["bbox_2d"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let (x1, x2) = (c[0].min(c[2]) * 0.48, c[0].max(c[2]) * 0.48);
        let (y1, y2) = (c[1].min(c[3]) * 0.64, c[1].max(c[3]) * 0.64);
        let want = [x1.round(), y1.round(), x2.round(), y2.round()];
        let got: Vec<f64> = b["box"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(got, want, "{out}");
        // Stored grid of an orientation-6 file: x_stored = y_shown, y_stored = 480 - x_shown.
        let stored: Vec<f64> = b["box_stored"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(
            stored,
            vec![
                (y1).round(),
                (480.0 - x2).round(),
                (y2).round(),
                (480.0 - x1).round()
            ],
            "{out}"
        );
    }
    let grammar = tmp.path().join("g.lark");
    std::fs::write(&grammar, "start: \"OK \" /[a-z]{2,5}/\n").unwrap();
    let r = loupe(&[
        "run",
        "--model",
        s(&model),
        "--grammar",
        s(&grammar),
        "--json",
        "Say OK.",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    let text = out["text"].as_str().unwrap();
    assert!(
        text.starts_with("OK ") && (2..=5).contains(&text[3..].len()),
        "{text}"
    );
    // A broken grammar is reported against its file, before generating.
    std::fs::write(&grammar, "start: (\n").unwrap();
    fails_clearly(
        &loupe(&[
            "run",
            "--model",
            s(&model),
            "--grammar",
            s(&grammar),
            "Say OK.",
        ]),
        "g.lark",
    );
    fails_clearly(
        &loupe(&["run", "--model", s(&model), "--boxes", "No image."]),
        "--boxes needs an --image",
    );
}
