//! The live inspection page in a real browser: headless Chromium (Debian's `chromium`) with a fake
//! camera playing a video made here from a demo sample, against `loupe serve` with the demo model.
//! The page must show the verdict the server gave and draw each defect box where the frame's box
//! lands on screen, which this test works out on its own from the video element's place and size
//! and checks in a screenshot. Driven over the DevTools protocol; skipped with a message where no
//! Chromium is installed, except on CI, where it must run.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{root, s};
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            let out = Command::new("sh")
                .args(["-c", &format!("command -v {name}")])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        })
}

/// A 4:2:0 YUV4MPEG2 video (what Chromium's fake camera plays) of `frames` copies of an image.
fn write_y4m(image: &Path, out: &Path, frames: usize) -> (u32, u32) {
    let img = image::open(image).unwrap().to_rgb8();
    let (w, h) = (img.width() & !1, img.height() & !1);
    let mut f = std::io::BufWriter::new(std::fs::File::create(out).unwrap());
    writeln!(f, "YUV4MPEG2 W{w} H{h} F10:1 Ip A1:1 C420jpeg").unwrap();
    let px = |x: u32, y: u32| {
        let p = img.get_pixel(x, y);
        (f64::from(p[0]), f64::from(p[1]), f64::from(p[2]))
    };
    let clamp = |v: f64| v.round().clamp(0.0, 255.0) as u8;
    let mut yp = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let (r, g, b) = px(x, y);
            yp.push(clamp(0.299 * r + 0.587 * g + 0.114 * b));
        }
    }
    let (mut up, mut vp) = (Vec::new(), Vec::new());
    for y in (0..h).step_by(2) {
        for x in (0..w).step_by(2) {
            let mut acc = (0.0, 0.0, 0.0);
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                let (r, g, b) = px(x + dx, y + dy);
                acc = (acc.0 + r / 4.0, acc.1 + g / 4.0, acc.2 + b / 4.0);
            }
            let (r, g, b) = acc;
            up.push(clamp(128.0 - 0.168736 * r - 0.331264 * g + 0.5 * b));
            vp.push(clamp(128.0 + 0.5 * r - 0.418688 * g - 0.081312 * b));
        }
    }
    for _ in 0..frames {
        f.write_all(b"FRAME\n").unwrap();
        f.write_all(&yp).unwrap();
        f.write_all(&up).unwrap();
        f.write_all(&vp).unwrap();
    }
    (w, h)
}

struct Browser {
    child: Child,
    ws: WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    next: u64,
}

impl Browser {
    fn start(exe: &Path, video: &Path, profile: &Path, width: u32, height: u32) -> Browser {
        let mut child = Command::new(exe)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                &format!("--use-file-for-fake-video-capture={}", video.display()),
                &format!("--user-data-dir={}", profile.display()),
                &format!("--window-size={width},{height}"),
                "--force-device-scale-factor=1",
                "about:blank",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let browser_url = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("chromium's DevTools address");
        let port = browser_url
            .split(':')
            .nth(2)
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        // The page target of about:blank.
        let deadline = Instant::now() + Duration::from_secs(30);
        let page_ws = loop {
            let list: Value = ureq::get(&format!("http://127.0.0.1:{port}/json/list"))
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_json().ok())
                .unwrap_or(json!([]));
            if let Some(u) = list
                .as_array()
                .and_then(|a| a.iter().find(|t| t["type"] == "page"))
                .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            {
                break u.to_owned();
            }
            assert!(Instant::now() < deadline, "no page target in chromium");
            std::thread::sleep(Duration::from_millis(100));
        };
        let (ws, _) = tungstenite::connect(page_ws).expect("connect to the page");
        Browser { child, ws, next: 0 }
    }

    /// One DevTools command; its `result`.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws.send(Message::text(msg)).unwrap();
        loop {
            let m = self.ws.read().expect("DevTools reply");
            if let Message::Text(t) = m {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["id"] == id {
                    assert!(v.get("error").is_none(), "{method}: {v}");
                    return v["result"].clone();
                }
            }
        }
    }

    fn eval(&mut self, js: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": js, "returnByValue": true}),
        );
        r["result"]["value"].clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `loupe serve` on the demo model and spec; `(child, port)`.
fn serve_demo() -> (Child, u16) {
    let spec = root().join("models/loupe-parts-demo/spec.toml");
    let mut child = Command::new(env!("CARGO_BIN_EXE_loupe"))
        .args(["serve", "--port", "0", "--no-audit", "--spec", s(&spec)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on http://127.0.0.1:").nth(1) {
                let p: u16 = rest
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                let _ = tx.send(p);
            }
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("loupe serve started");
    (child, port)
}

/// Whether pixel `(x, y)` of the screenshot, or one within 2 px, has colour `c` (within 60 per
/// channel: the canvas antialiases its edges).
fn colour_near(shot: &image::RgbImage, x: f64, y: f64, c: [u8; 3]) -> bool {
    let (cx, cy) = (x.round() as i64, y.round() as i64);
    (-2..=2).any(|dy| {
        (-2..=2).any(|dx| {
            let (px, py) = (cx + dx, cy + dy);
            if px < 0 || py < 0 || px >= i64::from(shot.width()) || py >= i64::from(shot.height()) {
                return false;
            }
            let p = shot.get_pixel(px as u32, py as u32);
            (0..3).all(|i| (i32::from(p[i]) - i32::from(c[i])).abs() <= 60)
        })
    })
}

fn hex(c: &str) -> [u8; 3] {
    let v = u32::from_str_radix(c.trim_start_matches('#'), 16).unwrap();
    [(v >> 16) as u8, (v >> 8) as u8, v as u8]
}

fn check_viewport(exe: &Path, video: &Path, frame: (u32, u32), port: u16, size: (u32, u32)) {
    let profile = tempfile::tempdir().unwrap();
    let mut b = Browser::start(exe, video, profile.path(), size.0, size.1);
    b.call("Page.enable", json!({}));
    b.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": size.0, "height": size.1, "deviceScaleFactor": 1, "mobile": size.0 < 600}),
    );
    b.call(
        "Page.navigate",
        json!({"url": format!("http://127.0.0.1:{port}/")}),
    );
    // Wait for an answer with a defect box (the sample shows one), then one more frame drawn.
    let deadline = Instant::now() + Duration::from_secs(60);
    let state = loop {
        let st = b.eval(
            "JSON.stringify({verdict: document.body.dataset.verdict || null, \
              banner: document.getElementById('banner').textContent, last: window.loupeLast || null, \
              hint: document.getElementById('hint').hidden, \
              video: (() => { const r = document.getElementById('video').getBoundingClientRect(); \
                return {x: r.x, y: r.y, w: r.width, h: r.height}; })(), \
              palette: ['#ff3b30', '#ffcc00', '#34c759', '#0a84ff', '#af52de', '#ff9500', '#5ac8fa', '#ff2d55'], \
              classes: Array.from(document.getElementById('spec').options).map(o => JSON.parse(o.dataset.classes))[0] || []})",
        );
        let st: Value = serde_json::from_str(st.as_str().unwrap_or("{}")).unwrap();
        if st["last"]["record"]["defects"]
            .as_array()
            .is_some_and(|d| !d.is_empty())
        {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "no inspection with a defect shown within 60 s at {size:?}: {st}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(state["hint"], true, "the hint is gone once the camera runs");
    let rec = &state["last"]["record"];
    let verdict = rec["verdict"].as_str().unwrap();
    assert_eq!(state["verdict"], verdict);
    assert!(
        state["banner"]
            .as_str()
            .unwrap()
            .starts_with(&verdict.to_uppercase()),
        "{}",
        state["banner"]
    );
    assert_eq!(
        (
            state["last"]["w"].as_u64().unwrap(),
            state["last"]["h"].as_u64().unwrap()
        ),
        (u64::from(frame.0), u64::from(frame.1))
    );
    let shot = b.call("Page.captureScreenshot", json!({"format": "png"}));
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    let shot = image::load_from_memory(&png).unwrap().to_rgb8();
    // LOUPE_PAGE_SHOTS=DIR keeps the screenshots, to look at.
    if let Some(dir) = std::env::var_os("LOUPE_PAGE_SHOTS") {
        let _ = shot.save(Path::new(&dir).join(format!("page_{}x{}.png", size.0, size.1)));
    }
    // Where the frame sits in the video element (object-fit: contain), and so where each box is.
    let v = &state["video"];
    let (vx, vy, vw, vh) = (
        v["x"].as_f64().unwrap(),
        v["y"].as_f64().unwrap(),
        v["w"].as_f64().unwrap(),
        v["h"].as_f64().unwrap(),
    );
    let (fw, fh) = (f64::from(frame.0), f64::from(frame.1));
    let sc = (vw / fw).min(vh / fh);
    let (ox, oy) = (vx + (vw - fw * sc) / 2.0, vy + (vh - fh * sc) / 2.0);
    let classes: Vec<String> = serde_json::from_value(state["classes"].clone()).unwrap();
    for d in rec["defects"].as_array().unwrap() {
        let bx: Vec<f64> = serde_json::from_value(d["box"].clone()).unwrap();
        let class = d["class"].as_str().unwrap();
        let idx = classes.iter().position(|c| c == class).unwrap_or(0);
        let c = hex(state["palette"][idx % 8].as_str().unwrap());
        let (x1, y1, x2, y2) = (
            ox + bx[0] * sc,
            oy + bx[1] * sc,
            ox + bx[2] * sc,
            oy + bx[3] * sc,
        );
        let midx = (x1 + x2) / 2.0;
        let midy = (y1 + y2) / 2.0;
        // The bottom, left and right edges (the label may cover the top one).
        for (x, y, edge) in [
            (midx, y2, "bottom"),
            (x1, midy, "left"),
            (x2, midy, "right"),
        ] {
            assert!(
                colour_near(&shot, x, y, c),
                "the {edge} edge of the {class} box at ({x:.0}, {y:.0}) in the {size:?} screenshot is not {c:?}: {:?}",
                shot.get_pixel(x.round() as u32, y.round() as u32)
            );
        }
        // Inside the box, away from its edges, the frame shows through (no filled rectangle).
        if x2 - x1 > 12.0 && y2 - y1 > 12.0 {
            assert!(
                !colour_near(&shot, midx, midy, c) || c == [255, 204, 0],
                "the box is not filled"
            );
        }
    }
}

/// With nothing chosen (`?camera=0`), the stage says what to do instead of showing a black pane.
fn check_empty_stage(exe: &Path, video: &Path, port: u16) {
    let profile = tempfile::tempdir().unwrap();
    let mut b = Browser::start(exe, video, profile.path(), 1200, 800);
    b.call("Page.enable", json!({}));
    b.call(
        "Page.navigate",
        json!({"url": format!("http://127.0.0.1:{port}/?camera=0")}),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = b.eval(
            "JSON.stringify((() => { const h = document.getElementById('hint'); \
               const r = h.getBoundingClientRect(); \
               return {hidden: h.hidden, text: h.textContent, w: r.width, h: r.height, \
                       specs: document.getElementById('spec').options.length}; })())",
        );
        let st: Value = serde_json::from_str(st.as_str().unwrap_or("{}")).unwrap();
        if st["specs"].as_u64().unwrap_or(0) > 0 {
            assert_eq!(st["hidden"], false, "{st}");
            let text = st["text"].as_str().unwrap();
            assert!(text.contains("Camera") && text.contains("Image"), "{text}");
            assert!(st["w"].as_f64().unwrap() > 100.0, "the hint has room: {st}");
            return;
        }
        assert!(Instant::now() < deadline, "the page did not load: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn live_page_draws_the_defect_box_over_the_camera_at_desktop_and_phone_sizes() {
    let Some(exe) = chromium() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the browser test: no chromium found"
        );
        eprintln!("page test skipped: no chromium on this machine");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let video = tmp.path().join("camera.y4m");
    let sample = root().join("models/loupe-parts-demo/samples/test/scratch/000.png");
    let frame = write_y4m(&sample, &video, 10);
    let (mut server, port) = serve_demo();
    let result = std::panic::catch_unwind(|| {
        check_empty_stage(&exe, &video, port);
        check_viewport(&exe, &video, frame, port, (1200, 800));
        check_viewport(&exe, &video, frame, port, (390, 844));
    });
    let _ = server.kill();
    let _ = server.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
