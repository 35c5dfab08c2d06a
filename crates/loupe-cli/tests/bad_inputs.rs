//! The bad-input suite: every case of `tests/bad_inputs/cases.json` runs the `loupe` binary on an
//! input made bad in one way (a fixture model copied and edited, or a hostile file under
//! `tests/bad_inputs/files/`) and checks the exit code and a substring of the message. A failure
//! (exit 2) must be one line on stderr with no panic; an accepted input (exit 0) must show the
//! substring in its output.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::{fixtures, root};
use serde_json::Value;

/// Sets `dotted.key` in a JSON object, creating objects on the way.
fn set_path(v: &mut Value, key: &str, value: Value) {
    let mut cur = v;
    let parts: Vec<&str> = key.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        cur = cur
            .as_object_mut()
            .expect("an object")
            .entry(p.to_string())
            .or_insert_with(|| Value::Object(Default::default()));
    }
    cur.as_object_mut()
        .expect("an object")
        .insert(parts[parts.len() - 1].to_string(), value);
}

/// Rewrites `model.safetensors` with `edit` applied to its tensor table (name -> (dtype, shape,
/// bytes)).
fn rewrite_tensors(
    path: &Path,
    edit: impl FnOnce(&mut BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut table: BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
        .collect();
    edit(&mut table);
    let views: Vec<(String, safetensors::tensor::TensorView)> = table
        .iter()
        .map(|(n, (d, s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn prepare(case: &Value, dir: &Path) {
    let Some(model) = case["model"].as_str() else {
        return;
    };
    let src = fixtures().join(model);
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    if let Some(edits) = case["edit"].as_object() {
        for (file, sets) in edits {
            let p = dir.join(file);
            let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            for (k, x) in sets.as_object().unwrap() {
                set_path(&mut v, k, x.clone());
            }
            std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
        }
    }
    if let Some(copies) = case["copy"].as_object() {
        for (file, from) in copies {
            let src = root()
                .join("tests/bad_inputs/files")
                .join(from.as_str().unwrap());
            std::fs::copy(src, dir.join(file)).unwrap();
        }
    }
    if let Some(writes) = case["write"].as_object() {
        for (file, text) in writes {
            std::fs::write(dir.join(file), text.as_str().unwrap()).unwrap();
        }
    }
    if let Some(pads) = case["pad"].as_object() {
        for (file, n) in pads {
            let p = dir.join(file);
            let mut b = std::fs::read(&p).unwrap();
            b.extend(std::iter::repeat_n(b' ', n.as_u64().unwrap() as usize));
            std::fs::write(&p, b).unwrap();
        }
    }
    if let Some(cuts) = case["truncate"].as_object() {
        for (file, n) in cuts {
            let p = dir.join(file);
            let b = std::fs::read(&p).unwrap();
            std::fs::write(&p, &b[..n.as_u64().unwrap() as usize]).unwrap();
        }
    }
    let weights = dir.join("model.safetensors");
    if let Some(shapes) = case["tensor_shape"].as_object() {
        rewrite_tensors(&weights, |t| {
            for (name, shape) in shapes {
                let shape: Vec<usize> = serde_json::from_value(shape.clone()).unwrap();
                let entry = t.get_mut(name).expect("a tensor of the fixture");
                assert_eq!(
                    entry.1.iter().product::<usize>(),
                    shape.iter().product::<usize>(),
                    "a reshape keeps the bytes"
                );
                entry.1 = shape;
            }
        });
    }
    if let Some(name) = case["drop_tensor"].as_str() {
        rewrite_tensors(&weights, |t| {
            t.remove(name).expect("a tensor of the fixture");
        });
    }
    if let Some(name) = case["add_tensor"].as_str() {
        rewrite_tensors(&weights, |t| {
            t.insert(name.into(), (safetensors::Dtype::F32, vec![4], vec![0; 16]));
        });
    }
}

#[test]
fn every_bad_input_case_ends_as_the_table_says() {
    let table = root().join("tests/bad_inputs/cases.json");
    let cases: Vec<Value> = serde_json::from_slice(&std::fs::read(&table).unwrap()).unwrap();
    assert!(cases.len() >= 30, "the table lost cases");
    let mut failures = Vec::new();
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let dir = tempfile::tempdir().unwrap();
        prepare(case, dir.path());
        let sub = |a: &str| {
            a.replace("$MODEL", dir.path().to_str().unwrap())
                .replace("$FIXTURES", fixtures().to_str().unwrap())
                .replace(
                    "$FILES",
                    root().join("tests/bad_inputs/files").to_str().unwrap(),
                )
                .replace("$ROOT", root().to_str().unwrap())
        };
        let args: Vec<String> = case["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| sub(a.as_str().unwrap()))
            .collect();
        let out = Command::new(env!("CARGO_BIN_EXE_loupe"))
            .args(&args)
            .env("HF_HUB_CACHE", "/nonexistent-loupe-test-cache")
            .env_remove("LOUPE_LOG")
            .output()
            .expect("run loupe");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        let want_code = case["exit"].as_i64().unwrap() as i32;
        let want = case["message"].as_str().unwrap();
        let code = out.status.code().unwrap_or(-1);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let problem = if code != want_code {
            Some(format!("exit {code}, wanted {want_code}"))
        } else if stderr.contains("panicked") || stderr.contains("internal error") {
            Some("a panic".into())
        } else if want_code == 2 && lines.len() != 1 {
            Some(format!("{} lines on stderr, wanted one", lines.len()))
        } else if want_code == 2 && !lines[0].contains(want) {
            Some(format!("the message does not contain `{want}`"))
        } else if want_code != 2 && !stdout.contains(want) && !stderr.contains(want) {
            Some(format!("the output does not contain `{want}`"))
        } else {
            None
        };
        if let Some(p) = problem {
            failures.push(format!(
                "{name}: {p}\n  stderr: {}\n  stdout: {}",
                stderr.trim(),
                stdout.chars().take(300).collect::<String>()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
