//! Nothing lost on a crash: `loupe inspect` over a folder, killed with SIGKILL at several points,
//! leaves an audit database that passes `PRAGMA integrity_check` and holds every image whose record
//! was printed; `--resume` then inspects only what is missing.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use common::{root, s};

fn audit_images(db: &Path) -> (String, HashSet<String>) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    let mut stmt = conn
        .prepare("SELECT image FROM inspections WHERE error IS NULL")
        .unwrap();
    let images = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    (check, images)
}

/// Starts `loupe inspect --json` and kills it (SIGKILL) once `after` records are printed; returns
/// the images of the printed records.
fn inspect_killed(dir: &Path, db: &Path, out: &Path, resume: bool, after: usize) -> Vec<String> {
    let mut args = vec![
        "inspect".to_string(),
        "--spec".into(),
        s(&root().join("examples/inspection.toml")).into(),
        "--db".into(),
        s(db).into(),
        "--out".into(),
        s(out).into(),
        "--reuse".into(),
        "none".into(),
        "--json".into(),
    ];
    if resume {
        args.push("--resume".into());
    }
    args.push(s(dir).into());
    let mut child = Command::new(env!("CARGO_BIN_EXE_loupe"))
        .args(&args)
        .env("HF_HUB_CACHE", "/nonexistent-loupe-test-cache")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut printed = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        printed.push(v["image"].as_str().unwrap().to_owned());
        if printed.len() == after {
            // SIGKILL: no destructor, no flush, no handler runs.
            child.kill().unwrap();
            break;
        }
    }
    child.wait().unwrap();
    printed
}

#[test]
fn a_killed_inspection_loses_nothing_and_resumes_where_it_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("parts");
    std::fs::create_dir(&dir).unwrap();
    // Twelve images (the fixture parts, flattened, repeated under new names).
    let src = root().join("tests/fixtures/inspection/parts/test");
    let mut parts = Vec::new();
    for class in std::fs::read_dir(&src).unwrap() {
        for img in std::fs::read_dir(class.unwrap().path()).unwrap() {
            parts.push(img.unwrap().path());
        }
    }
    parts.sort();
    for n in 0..12 {
        std::fs::copy(&parts[n % parts.len()], dir.join(format!("part{n:02}.png"))).unwrap();
    }
    let (db, out) = (tmp.path().join("audit.sqlite"), tmp.path().join("out"));
    let mut printed_all = HashSet::new();
    // Killed after 2, then (resumed) after 3 and 1 more records: the kill points move through the
    // folder, each at a different place of the write sequence.
    for (round, after) in [2usize, 3, 1].into_iter().enumerate() {
        let printed = inspect_killed(&dir, &db, &out, round > 0, after);
        assert_eq!(printed.len(), after, "round {round}");
        for p in &printed {
            assert!(
                printed_all.insert(p.clone()),
                "{p} inspected twice: resume redid it"
            );
        }
        let (check, in_db) = audit_images(&db);
        assert_eq!(check, "ok", "round {round}");
        for p in &printed_all {
            assert!(
                in_db.contains(p),
                "round {round}: {p} was printed but is not in the audit log"
            );
        }
    }
    // The last resume finishes the folder, inspecting only what is missing.
    let (_, before) = audit_images(&db);
    let rest = inspect_killed(&dir, &db, &out, true, usize::MAX);
    let rest_set: HashSet<String> = rest.iter().cloned().collect();
    assert_eq!(rest.len(), rest_set.len());
    assert!(
        rest_set.is_disjoint(&before),
        "resume re-inspected a done image"
    );
    let (check, after) = audit_images(&db);
    assert_eq!(check, "ok");
    assert_eq!(after.len(), 12, "every image is in the audit log once done");
    assert_eq!(before.len() + rest.len(), 12);
    // results.jsonl holds each image once.
    let jsonl = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let images: Vec<String> = jsonl
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["image"].as_str().unwrap().to_owned()
        })
        .collect();
    let unique: HashSet<&String> = images.iter().collect();
    assert_eq!(images.len(), 12, "{jsonl}");
    assert_eq!(unique.len(), 12);
    // The report shows every image's overlay, those of the killed runs too.
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert_eq!(html.matches("<img class=\"plain\"").count(), 12);
}
