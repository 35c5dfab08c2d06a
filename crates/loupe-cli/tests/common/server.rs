//! A `loupe serve` child process for the tests that drive it over HTTP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Status, body (JSON, or the text when it is not JSON), headers.
pub type Resp = (u16, Value, Vec<(String, String)>);

pub struct Server {
    child: Child,
    pub port: u16,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    pub fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_loupe"))
            .arg("serve")
            .args(["--port", "0"])
            .args(args)
            .env("HF_HUB_CACHE", "/nonexistent-loupe-test-cache")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start loupe serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let pipe = child.stderr.take().unwrap();
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://127.0.0.1:").nth(1) {
                    let port: u16 = rest
                        .split(|c: char| !c.is_ascii_digit())
                        .next()
                        .unwrap()
                        .parse()
                        .unwrap();
                    let _ = tx.send(port);
                }
                log.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let port = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(p) => p,
            Err(_) => {
                let _ = child.kill();
                panic!("loupe serve did not start: {}", stderr.lock().unwrap());
            }
        };
        Server {
            child,
            port,
            stderr,
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `(status, body as JSON or as a string, headers)` of one request.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Resp {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(300)))
            .build()
            .into();
        let url = self.url(path);
        let mut resp = match (method, body) {
            ("GET", _) => {
                let mut r = agent.get(&url);
                for (k, v) in headers {
                    r = r.header(*k, *v);
                }
                r.call()
            }
            (_, b) => {
                let mut r = agent.post(&url);
                for (k, v) in headers {
                    r = r.header(*k, *v);
                }
                r.send(b.unwrap_or_default())
            }
        }
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let hs = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let mut bytes = Vec::new();
        resp.body_mut().as_reader().read_to_end(&mut bytes).unwrap();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v, hs)
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Resp {
        self.call(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            Some(body.to_string().into_bytes()),
        )
    }

    pub fn healthy(&self) -> bool {
        self.call("GET", "/health", &[], None).0 == 200
    }

    /// SIGTERM, then the exit status and everything it wrote on stderr.
    pub fn stop(mut self) -> (i32, String) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                return (st.code().unwrap_or(-1), self.stderr.lock().unwrap().clone());
            }
            assert!(
                Instant::now() < deadline,
                "loupe serve did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
