//! `loupe serve` against the committed fixtures, over real HTTP on loopback: the OpenAI API gives
//! what `loupe run` gives, `/v1/inspect` what `loupe inspect` gives, every bad request a 4xx in
//! OpenAI's error shape with the server still serving, a full queue 503 with Retry-After, a gone
//! client a cancelled answer, SIGTERM a clean stop with every audit row kept. The official `openai`
//! Python package is driven against it too (tools/serve_openai_check.py) where it is installed.

mod common;
#[path = "common/server.rs"]
mod server;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use common::{fixtures, loupe, root, s};
use serde_json::{json, Value};
use server::{Resp, Server};

const MODEL: &str = "gqa2_tied_published";

fn model_dir() -> PathBuf {
    fixtures().join("qwen2_vl").join(MODEL)
}

fn data_uri(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// Asserts an OpenAI-shaped error with this status whose message names `what`.
fn is_error(resp: &Resp, status: u16, what: &str) {
    let (st, v, _) = resp;
    assert_eq!(*st, status, "status for {what}: {v}");
    let msg = v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.message in {v}"));
    assert!(v["error"]["type"].is_string(), "error.type in {v}");
    assert!(msg.contains(what), "`{msg}` should name {what}");
    assert!(!msg.contains('\n'), "one line: {msg}");
}

fn chat(content: Value, extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 12,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[test]
fn openai_api_matches_loupe_run_and_refuses_bad_requests() {
    let image = fixtures().join("images/odd_97x211.png");
    let allowed = fixtures().join("images");
    let srv = Server::start(&[
        "--model",
        s(&model_dir()),
        "--no-audit",
        "--allow-path",
        s(&allowed),
        "--max-body-bytes",
        "400000",
        "--max-image-pixels",
        "40000",
    ]);
    let reference = loupe(&[
        "run",
        "--model",
        s(&model_dir()),
        "--image",
        s(&image),
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--json",
        "Describe this part.",
    ]);
    assert_eq!(reference.code, 0, "{}", reference.stderr);
    let reference: Value = serde_json::from_str(reference.stdout.trim()).unwrap();

    // An image and text, greedy: the same text and token counts as `loupe run`.
    let content = json!([
        {"type": "image_url", "image_url": {"url": data_uri(&image)}},
        {"type": "text", "text": "Describe this part."},
    ]);
    let r = srv.post_json("/v1/chat/completions", &chat(content.clone(), json!({})));
    assert_eq!(r.0, 200, "{}", r.1);
    let answer = &r.1["choices"][0]["message"]["content"];
    assert_eq!(answer, &reference["text"]);
    assert_eq!(r.1["usage"]["prompt_tokens"], reference["prompt_tokens"]);
    assert_eq!(
        r.1["usage"]["completion_tokens"].as_u64().unwrap() as usize,
        reference["tokens"].as_array().unwrap().len()
    );
    assert_eq!(
        r.1["choices"][0]["finish_reason"],
        reference["finish_reason"]
    );

    // The same image as a file:// path under --allow-path.
    let file = json!([
        {"type": "image_url", "image_url": {"url": format!("file://{}", image.canonicalize().unwrap().display())}},
        {"type": "text", "text": "Describe this part."},
    ]);
    let r = srv.post_json("/v1/chat/completions", &chat(file, json!({})));
    assert_eq!(
        r.1["choices"][0]["message"]["content"], reference["text"],
        "{}",
        r.1
    );

    // Streaming: the same text in pieces, a finish reason, usage last, then [DONE].
    let (st, body, headers) = srv.post_json(
        "/v1/chat/completions",
        &chat(
            content.clone(),
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
    );
    assert_eq!(st, 200);
    assert!(headers
        .iter()
        .any(|(k, v)| k == "content-type" && v.starts_with("text/event-stream")));
    let body = body.as_str().unwrap().to_owned();
    let datas: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(datas.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = datas[..datas.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"].get(0)?["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(Value::String(streamed), reference["text"]);
    assert!(chunks.iter().any(|c| c["choices"]
        .get(0)
        .is_some_and(|ch| ch["finish_reason"] == reference["finish_reason"])));
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["prompt_tokens"], reference["prompt_tokens"]);

    // A JSON schema: the answer parses and keeps to it.
    let schema = json!({
        "type": "object",
        "properties": {"verdict": {"enum": ["pass", "fail"]}, "count": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["verdict", "count"],
        "additionalProperties": false,
    });
    let r = srv.post_json(
        "/v1/chat/completions",
        &chat(json!("Inspect."), json!({"max_tokens": 40, "response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": schema}}})),
    );
    assert_eq!(r.0, 200, "{}", r.1);
    let parsed: Value =
        serde_json::from_str(r.1["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert!(
        ["pass", "fail"].contains(&parsed["verdict"].as_str().unwrap()),
        "{parsed}"
    );
    assert!(parsed["count"].as_u64().unwrap() <= 9);
    assert_eq!(r.1["choices"][0]["finish_reason"], "stop");
    // Cut by max_tokens before the schema is complete: `length`, as docs/serving.md says, so a
    // client knows not to parse it.
    let r = srv.post_json(
        "/v1/chat/completions",
        &chat(json!("Inspect."), json!({"max_tokens": 2, "response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": schema}}})),
    );
    assert_eq!(r.0, 200, "{}", r.1);
    assert_eq!(r.1["choices"][0]["finish_reason"], "length", "{}", r.1);
    let cut = r.1["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(serde_json::from_str::<Value>(cut).is_err(), "{cut}");

    // Bad requests: each a 4xx naming what is wrong; the server keeps serving.
    let tmp = tempfile::tempdir().unwrap();
    let big = tmp.path().join("big.png");
    image::RgbImage::new(300, 200).save(&big).unwrap();
    let bad: Vec<(Resp, u16, &str)> = vec![
        (srv.call("POST", "/v1/chat/completions", &[("Content-Type", "application/json")], Some(b"{\"model\": ".to_vec())), 400, "not valid JSON"),
        (srv.post_json("/v1/chat/completions", &json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})), 404, "no-such-model"),
        (srv.post_json("/v1/chat/completions", &json!({"model": MODEL})), 400, "messages"),
        (srv.post_json("/v1/chat/completions", &chat(json!([{"type": "image_url", "image_url": {"url": "http://example.com/part.png"}}]), json!({}))), 400, "never reaches the network"),
        (srv.post_json("/v1/chat/completions", &chat(json!([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]), json!({}))), 400, "outside the --allow-path"),
        (srv.post_json("/v1/chat/completions", &chat(json!([{"type": "image_url", "image_url": {"url": format!("file://{}/../../Cargo.toml", allowed.display())}}]), json!({}))), 400, "`..`"),
        (srv.post_json("/v1/chat/completions", &chat(json!([{"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]), json!({}))), 400, "not an image"),
        (srv.post_json("/v1/chat/completions", &chat(json!([{"type": "image_url", "image_url": {"url": data_uri(&big)}}]), json!({}))), 413, "pixels"),
        (srv.post_json("/v1/chat/completions", &chat(json!("x".repeat(500_000)), json!({}))), 413, "--max-body-bytes"),
        (srv.post_json("/v1/chat/completions", &chat(json!("hi"), json!({"n": 2}))), 400, "n=1"),
        (srv.post_json("/v1/chat/completions", &chat(json!("hi"), json!({"temperature": -1}))), 400, "temperature"),
        (srv.post_json("/v1/chat/completions", &chat(json!("hi"), json!({"max_tokens": 100000}))), 400, "--max-tokens"),
        (srv.post_json("/v1/chat/completions", &chat(json!("hi"), json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}}))), 400, "response_format"),
        (srv.post_json("/v1/inspect", &json!({"image": "aGVsbG8="})), 400, "spec"),
        (srv.call("GET", "/v1/nothing-here", &[], None), 404, "/v1/nothing-here"),
    ];
    for (resp, status, what) in &bad {
        is_error(resp, *status, what);
        assert!(
            srv.healthy(),
            "still serving after the request about {what}"
        );
    }

    // The official Python client, where it is installed (CI installs it).
    openai_client_check(&srv, &image, &reference);

    let (code, log) = srv.stop();
    assert_eq!(code, 0, "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// tools/serve_openai_check.py with the pinned `openai` package: the same answer through the
/// client, plain and streamed, and a json_schema answer that parses. Python is `$LOUPE_PYTHON`,
/// else `.venv/bin/python` under the repository; skipped (with a message) when neither has the
/// package, except on CI, where it must run.
fn openai_client_check(srv: &Server, image: &Path, reference: &Value) {
    let python = std::env::var_os("LOUPE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"));
    let has_openai = Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_openai {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the openai client check: {} has no `openai` package",
            python.display()
        );
        eprintln!(
            "openai client check skipped: no `openai` package for {}",
            python.display()
        );
        return;
    }
    let out = Command::new(&python)
        .arg(root().join("tools/serve_openai_check.py"))
        .args([
            "--base-url",
            &srv.url("/v1"),
            "--model",
            MODEL,
            "--image",
            s(image),
        ])
        .args(["--expect", reference["text"].as_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "serve_openai_check.py: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_full_queue_is_503_and_a_gone_client_is_cancelled() {
    let srv = Server::start(&[
        "--model",
        s(&model_dir()),
        "--no-audit",
        "--parallel",
        "1",
        "--max-queue",
        "1",
    ]);
    // A streamed answer that runs long, whose client hangs up after the first bytes.
    let body = chat(
        json!("Tell a long story."),
        json!({"max_tokens": 2000, "stream": true}),
    )
    .to_string();
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    write!(
        sock,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 64];
    sock.read_exact(&mut first).unwrap();
    // While it runs (one slot, a queue of one), a burst: some wait, the rest get 503 with Retry-After.
    let burst: Vec<Resp> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..4)
            .map(|_| {
                sc.spawn(|| {
                    srv.post_json(
                        "/v1/chat/completions",
                        &chat(json!("hi"), json!({"max_tokens": 4})),
                    )
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        // Hang up the long one: its slot frees and the waiting request runs.
        drop(sock);
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let full: Vec<_> = burst.iter().filter(|r| r.0 == 503).collect();
    assert!(
        !full.is_empty(),
        "a queue of one with one slot busy must refuse some of 4: {:?}",
        burst.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    for r in &full {
        is_error(r, 503, "queue is full");
        assert!(
            r.2.iter().any(|(k, v)| k == "retry-after" && v == "1"),
            "Retry-After on 503"
        );
    }
    assert!(
        burst.iter().all(|r| r.0 == 200 || r.0 == 503),
        "{:?}",
        burst.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    assert!(
        burst.iter().any(|r| r.0 == 200),
        "the queued request ran once the slot was free"
    );
    let (_, metrics, _) = srv.call("GET", "/metrics", &[], None);
    let metrics = metrics.as_str().unwrap().to_owned();
    assert!(
        metrics.contains("loupe_cancelled_requests_total 1"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("loupe_http_requests_total{route=\"/v1/chat/completions\",status=\"503\"}"),
        "{metrics}"
    );
}

#[test]
fn inspect_api_matches_loupe_inspect_and_keeps_every_audit_row() {
    let demo = root().join("models/loupe-parts-demo");
    let spec = demo.join("spec.toml");
    let samples: Vec<PathBuf> = ["good", "scratch", "dent", "crack"]
        .iter()
        .map(|c| {
            let mut v: Vec<_> = std::fs::read_dir(demo.join("samples/test").join(c))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            v.sort();
            v.remove(0)
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("audit.sqlite");
    let key_file = tmp.path().join("key");
    std::fs::write(&key_file, "sesame\n").unwrap();
    let srv = Server::start(&[
        "--spec",
        s(&spec),
        "--db",
        s(&db),
        "--api-key-file",
        s(&key_file),
    ]);
    let auth = [("Authorization", "Bearer sesame")];

    let mut args = vec![
        "inspect",
        "--spec",
        s(&spec),
        "--no-audit",
        "--json",
        "--out",
    ];
    let out_dir = tmp.path().join("out");
    args.push(s(&out_dir));
    let paths: Vec<String> = samples.iter().map(|p| s(p).to_owned()).collect();
    args.extend(paths.iter().map(String::as_str));
    let cli = loupe(&args);
    assert!(cli.code == 0 || cli.code == 1, "{}", cli.stderr);
    let expected: Vec<Value> = cli
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    for (i, (path, want)) in samples.iter().zip(&expected).enumerate() {
        // Alternately a multipart upload and JSON with base64.
        let resp = if i % 2 == 0 {
            let boundary = "loupe-test-boundary";
            let mut body = format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"spec\"\r\n\r\nparts-demo\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"part.png\"\r\nContent-Type: image/png\r\n\r\n"
            )
            .into_bytes();
            body.extend(std::fs::read(path).unwrap());
            body.extend(format!("\r\n--{boundary}--\r\n").into_bytes());
            let ct = format!("multipart/form-data; boundary={boundary}");
            srv.call(
                "POST",
                "/v1/inspect",
                &[auth[0], ("Content-Type", &ct)],
                Some(body),
            )
        } else {
            let b64 =
                base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap());
            srv.call(
                "POST",
                "/v1/inspect",
                &[auth[0], ("Content-Type", "application/json")],
                Some(
                    json!({"spec": "parts-demo", "image": b64})
                        .to_string()
                        .into_bytes(),
                ),
            )
        };
        assert_eq!(resp.0, 200, "{}", resp.1);
        let got = &resp.1;
        for field in [
            "verdict",
            "defects",
            "raw_output",
            "fail_score",
            "image_sha256",
            "spec_sha256",
            "prompt_tokens",
        ] {
            assert_eq!(got[field], want[field], "{field} of {}", path.display());
        }
        let (st, png, _) = srv.call("GET", got["overlay_url"].as_str().unwrap(), &auth, None);
        assert_eq!(st, 200);
        assert!(
            png.as_str().is_some_and(|p| p.starts_with("\u{fffd}PNG")),
            "a PNG"
        );
    }
    // Without the key, or with a wrong one: 401 in OpenAI's shape.
    is_error(&srv.call("GET", "/v1/history", &[], None), 401, "API key");
    is_error(
        &srv.call(
            "GET",
            "/v1/history",
            &[("Authorization", "Bearer wrong")],
            None,
        ),
        401,
        "API key",
    );
    is_error(
        &srv.call(
            "POST",
            "/v1/inspect",
            &[auth[0], ("Content-Type", "application/json")],
            Some(
                json!({"image": "bm90IGFuIGltYWdl"})
                    .to_string()
                    .into_bytes(),
            ),
        ),
        400,
        "not an image",
    );
    is_error(
        &srv.call(
            "POST",
            "/v1/inspect",
            &[auth[0], ("Content-Type", "application/json")],
            Some(
                json!({"spec": "nope", "image": "aGk="})
                    .to_string()
                    .into_bytes(),
            ),
        ),
        404,
        "nope",
    );

    let (st, hist, _) = srv.call("GET", "/v1/history?verdict=fail&limit=10", &auth, None);
    assert_eq!(st, 200, "{hist}");
    let fails = expected.iter().filter(|r| r["verdict"] == "fail").count();
    assert_eq!(hist["data"].as_array().unwrap().len(), fails);
    is_error(
        &srv.call("GET", "/v1/history?verdict=maybe", &auth, None),
        400,
        "maybe",
    );

    let (code, log) = srv.stop();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("stopped"), "{log}");
    // Every inspection answered is a row.
    let h = loupe(&["history", "--db", s(&db), "--json"]);
    assert_eq!(h.code, 0, "{}", h.stderr);
    assert_eq!(h.stdout.lines().count(), samples.len(), "{}", h.stdout);
}

/// 24 clients at once for a few seconds, chats and inspections mixed, more than the slots and the
/// queue hold (tools/load_test.py, standard library only): every answer is a 200 or a 503, none is
/// broken, every accepted inspection is in the audit log, and afterwards no slot is left taken.
#[test]
fn many_clients_at_once_get_answers_or_503_and_lose_no_audit_row() {
    let python = std::env::var_os("LOUPE_PYTHON").unwrap_or_else(|| "python3".into());
    if Command::new(&python).arg("-V").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs python3 for the load test"
        );
        eprintln!("skipped: no python3 for tools/load_test.py");
        return;
    }
    let demo = root().join("models/loupe-parts-demo");
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("audit.sqlite");
    let srv = Server::start(&[
        "--spec",
        s(&demo.join("spec.toml")),
        "--db",
        s(&db),
        "--parallel",
        "4",
        "--max-queue",
        "8",
    ]);
    let summary = tmp.path().join("load.json");
    let out = Command::new(&python)
        .arg(root().join("tools/load_test.py"))
        .args(["--url", &srv.url(""), "--image"])
        .arg(demo.join("samples/test/crack/000.png"))
        .args(["--clients", "24", "--seconds", "4", "--mix", "0.5"])
        .args(["--max-tokens", "8", "--pid", &srv.pid().to_string()])
        .arg("--json")
        .arg(&summary)
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    assert!(
        out.status.success(),
        "{report:#}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let count = |k: &str| report["statuses"][k].as_u64().unwrap_or(0);
    assert!(
        count("chat 200") > 0 && count("inspect 200") > 0,
        "{report:#}"
    );
    for (k, _) in report["statuses"].as_object().unwrap() {
        assert!(k.ends_with(" 200") || k.ends_with(" 503"), "{report:#}");
    }
    assert_eq!(report["audit_rows_missing"], 0, "{report:#}");
    assert_eq!(
        report["audit_rows_checked"].as_u64(),
        Some(count("inspect 200")),
        "{report:#}"
    );
    // The last answers' slots free just after their final bytes: give the model thread a moment.
    let idle = |m: &str| {
        ["loupe_queue_depth 0", "loupe_running_requests 0"]
            .iter()
            .all(|g| m.lines().any(|l| l == *g))
    };
    let mut metrics = String::new();
    for _ in 0..50 {
        let (_, m, _) = srv.call("GET", "/metrics", &[], None);
        metrics = m.as_str().unwrap().to_owned();
        if idle(&metrics) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(idle(&metrics), "slots left taken after the load: {metrics}");
}
