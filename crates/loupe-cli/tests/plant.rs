//! Plant outputs against real services started by the test on loopback: verdicts published to a
//! Mosquitto broker that is stopped and restarted mid-run (and a server killed while it is away), and
//! two `loupe serve` replicas writing one PostgreSQL database that `loupe history` then reads. Each
//! is skipped with a message where the service is not installed, except on CI, where it must run.

mod common;
#[path = "common/server.rs"]
mod server;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{loupe, root, s};
use serde_json::{json, Value};
use server::Server;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn demo() -> PathBuf {
    root().join("models/loupe-parts-demo")
}

/// One sample image of each class of the demo model, good first.
fn samples() -> Vec<PathBuf> {
    ["good", "scratch", "dent", "crack"]
        .iter()
        .map(|c| {
            let mut v: Vec<_> = std::fs::read_dir(demo().join("samples/test").join(c))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            v.sort();
            v.remove(0)
        })
        .collect()
}

/// `POST /v1/inspect` of one image as JSON with base64: the response.
fn inspect(srv: &Server, path: &Path) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap());
    let (st, v, _) = srv.post_json("/v1/inspect", &json!({"spec": "parts-demo", "image": b64}));
    assert_eq!(st, 200, "{v}");
    v
}

/// A service the test needs: its binary, or `None` (after checking that CI is not asking for it).
fn service(what: &str, candidates: &[PathBuf]) -> Option<PathBuf> {
    if let Some(p) = candidates.iter().find(|p| p.is_file()) {
        return Some(p.clone());
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run the {what} test: {what} is not installed"
    );
    eprintln!("{what} test skipped: {what} is not installed on this machine");
    None
}

fn wait_for_port(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("{what} exited ({st}) before listening on {port}");
        }
        assert!(
            Instant::now() < deadline,
            "{what} is not listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn terminate(child: &mut Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
}

/// A Mosquitto broker on `port`, keeping its sessions in `dir` across restarts.
struct Broker {
    exe: PathBuf,
    conf: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Broker {
    fn new(exe: PathBuf, dir: &Path) -> Broker {
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 persistence_location {}/\n# Run by root (CI), stay root: the folder is ours.\nuser root\n",
                dir.display()
            ),
        )
        .unwrap();
        let mut b = Broker {
            exe,
            conf,
            port,
            child: None,
        };
        b.start();
        b
    }

    fn start(&mut self) {
        let mut child = Command::new(&self.exe)
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        wait_for_port(self.port, &mut child, "mosquitto");
        self.child = Some(child);
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every message the subscriber received on the topic, in order of arrival.
type Received = Arc<Mutex<Vec<Value>>>;

/// A subscriber with a persistent session (clean session off, QoS 1): what is published while it
/// is reconnecting waits for it at the broker.
fn subscribe(port: u16, topic: &str) -> Received {
    let mut opts = rumqttc::MqttOptions::new("loupe-test-subscriber", "127.0.0.1", port);
    opts.set_clean_session(false)
        .set_keep_alive(Duration::from_secs(5))
        .set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut conn) = rumqttc::Client::new(opts, 64);
    client
        .subscribe(topic, rumqttc::QoS::AtLeastOnce)
        .expect("subscribe");
    let got: Received = Arc::default();
    let (subscribed_tx, subscribed) = std::sync::mpsc::channel();
    let sink = got.clone();
    std::thread::spawn(move || {
        let _client = client;
        for ev in conn.iter() {
            match ev {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    let _ = subscribed_tx.send(());
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let v: Value = serde_json::from_slice(&p.payload).expect("a JSON record");
                    sink.lock().unwrap().push(v);
                }
                Ok(_) => {}
                // The broker is away: try again shortly (the iterator reconnects).
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    subscribed
        .recv_timeout(Duration::from_secs(30))
        .expect("the subscription was acknowledged");
    got
}

/// Waits until the subscriber holds every id in `want`; the ids received, with how often each came.
fn received(got: &Received, want: &BTreeSet<i64>) -> BTreeMap<i64, usize> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut counts = BTreeMap::new();
        for v in got.lock().unwrap().iter() {
            *counts.entry(v["id"].as_i64().expect("an id")).or_insert(0) += 1;
        }
        if want.iter().all(|id| counts.contains_key(id)) {
            return counts;
        }
        assert!(
            Instant::now() < deadline,
            "missing messages: want {want:?}, have {counts:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn metric(srv: &Server, name: &str) -> f64 {
    let (st, text, _) = srv.call("GET", "/metrics", &[], None);
    assert_eq!(st, 200);
    text.as_str()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

#[test]
fn verdicts_reach_mqtt_through_a_broker_outage_and_a_killed_server() {
    let Some(exe) = service(
        "mosquitto",
        &[
            PathBuf::from("/usr/sbin/mosquitto"),
            PathBuf::from("/usr/bin/mosquitto"),
        ],
    ) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut broker = Broker::new(exe, tmp.path());
    let topic = "plant/line1/verdicts";
    let got = subscribe(broker.port, topic);
    let db = tmp.path().join("audit.sqlite");
    let spec = demo().join("spec.toml");
    let mqtt = format!("mqtt://127.0.0.1:{}/{topic}", broker.port);
    let args = ["--spec", s(&spec), "--db", s(&db), "--mqtt", &mqtt];
    let images = samples();
    let mut sent: BTreeMap<i64, Value> = BTreeMap::new();

    // With the broker up: each verdict arrives, as the record the API answered.
    let srv = Server::start(&args);
    for img in &images {
        let v = inspect(&srv, img);
        sent.insert(v["id"].as_i64().unwrap(), v);
    }
    received(&got, &sent.keys().copied().collect());

    // The broker goes away: inspections go on, their messages wait in the audit database.
    broker.stop();
    for img in &images {
        let v = inspect(&srv, img);
        sent.insert(v["id"].as_i64().unwrap(), v);
    }
    let waiting = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get::<_, i64>(0))
        .unwrap();
    assert_eq!(
        waiting,
        images.len() as i64,
        "queued while the broker is down"
    );
    assert_eq!(metric(&srv, "loupe_mqtt_connected"), 0.0);
    broker.start();
    received(&got, &sent.keys().copied().collect());
    // The subscriber can hold a message before the server has its broker's acknowledgement
    // (which the counter counts): wait for the count, as for the messages.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&srv, "loupe_mqtt_published_total") < sent.len() as f64 {
        assert!(
            Instant::now() < deadline,
            "published_total {} < {}",
            metric(&srv, "loupe_mqtt_published_total"),
            sent.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The broker away again and the server killed outright: its queued verdict goes out from the
    // next server on the same database.
    broker.stop();
    let v = inspect(&srv, &images[1]);
    sent.insert(v["id"].as_i64().unwrap(), v);
    drop(srv); // SIGKILL
    broker.start();
    let srv = Server::start(&args);
    received(&got, &sent.keys().copied().collect());
    let v = inspect(&srv, &images[2]);
    sent.insert(v["id"].as_i64().unwrap(), v);
    let (code, log) = srv.stop();
    assert_eq!(code, 0, "{log}");
    let counts = received(&got, &sent.keys().copied().collect());

    // Every id once at least; a second copy only for a message whose acknowledgement a broker
    // outage cut off (QoS 1), never more than the messages in flight.
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        sent.keys().copied().collect::<Vec<_>>()
    );
    let extra: usize = counts.values().map(|n| n - 1).sum();
    assert!(extra <= 2 * 32, "{extra} duplicates: {counts:?}");
    for m in got.lock().unwrap().iter() {
        let want = &sent[&m["id"].as_i64().unwrap()];
        for field in ["verdict", "defects", "image_sha256", "spec", "fail_score"] {
            assert_eq!(m[field], want[field], "{field} of message {}", m["id"]);
        }
    }
    let left = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get::<_, i64>(0))
        .unwrap();
    assert_eq!(
        left, 0,
        "the outbox is empty once everything is acknowledged"
    );
}

/// A PostgreSQL server in a fresh data folder, on loopback only.
struct Postgres {
    child: Child,
    port: u16,
}

impl Postgres {
    fn start(bin: &Path, dir: &Path) -> Postgres {
        let data = dir.join("pgdata");
        std::fs::create_dir_all(&data).unwrap();
        // PostgreSQL refuses to run as root: as root (CI), run it as the `postgres` user (set in the
        // child itself, so that signals reach PostgreSQL and not a wrapper).
        // SAFETY: getuid(2) has no preconditions; getpwnam(3) with a NUL-terminated name, its
        // result read at once.
        let user = (unsafe { libc::getuid() } == 0).then(|| {
            let pw = unsafe { libc::getpwnam(c"postgres".as_ptr()) };
            assert!(!pw.is_null(), "no `postgres` user to run PostgreSQL as");
            unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
        });
        if user.is_some() {
            let st = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir)
                .status()
                .unwrap();
            assert!(st.success());
        }
        let as_user = |exe: &Path| {
            use std::os::unix::process::CommandExt;
            let mut c = Command::new(exe);
            if let Some((uid, gid)) = user {
                c.uid(uid).gid(gid);
            }
            c
        };
        let out = as_user(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "loupe", "--no-sync", "-E", "UTF8"])
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let mut child = as_user(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-k")
            .arg(dir)
            .args(["-c", "fsync=off"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start postgres");
        wait_for_port(port, &mut child, "postgres");
        Postgres { child, port }
    }

    fn url(&self) -> String {
        format!("postgres://loupe@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGINT: PostgreSQL's fast shutdown.
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let _ = self.child.wait();
    }
}

fn postgres_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| Some(e.ok()?.path().join("bin")))
                .filter(|b| b.join("initdb").is_file())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    let newest = found.pop().map(|b| b.join("initdb"));
    service("postgresql", &newest.into_iter().collect::<Vec<_>>())
        .map(|initdb| initdb.parent().unwrap().to_path_buf())
}

#[test]
fn two_servers_share_one_postgres_audit_log_that_loupe_history_reads() {
    let Some(bin) = postgres_bin() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let pg = Postgres::start(&bin, tmp.path());
    let url = pg.url();
    let spec = demo().join("spec.toml");
    // Both replicas start at once: the tables are created once.
    let servers: Vec<Server> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..2)
            .map(|_| sc.spawn(|| Server::start(&["--spec", s(&spec), "--db", &url])))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let images = samples();
    // Each replica inspects every sample twice, both at the same time.
    let answers: Vec<Value> = std::thread::scope(|sc| {
        let hs: Vec<_> = servers
            .iter()
            .map(|srv| {
                let images = &images;
                sc.spawn(move || {
                    (0..2)
                        .flat_map(|_| images.iter().map(|i| inspect(srv, i)).collect::<Vec<_>>())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    // Each replica's /v1/history reads the shared log: the other's rows too.
    let (st, hist, _) = servers[0].call("GET", "/v1/history?limit=100", &[], None);
    assert_eq!(st, 200, "{hist}");
    assert_eq!(
        hist["data"].as_array().map(Vec::len),
        Some(answers.len()),
        "{hist}"
    );
    for srv in servers {
        let (code, log) = srv.stop();
        assert_eq!(code, 0, "{log}");
    }

    let out = loupe(&["history", "--db", &url, "--json", "--limit", "100"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let rows: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: BTreeSet<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(ids.len(), rows.len(), "no row twice");
    let answered: BTreeSet<i64> = answers.iter().map(|a| a["id"].as_i64().unwrap()).collect();
    assert_eq!(
        ids, answered,
        "every answered inspection has its row, and no other"
    );
    for a in &answers {
        let r = rows.iter().find(|r| r["id"] == a["id"]).unwrap();
        assert_eq!(r["verdict"], a["verdict"]);
        assert_eq!(r["defects"], a["defects"]);
        assert_eq!(r["image_sha256"], a["image_sha256"]);
    }
    // The filters work as on SQLite.
    let fails = answers.iter().filter(|a| a["verdict"] == "fail").count();
    assert!(fails > 0 && fails < answers.len());
    let out = loupe(&["history", "--db", &url, "--json", "--verdict", "fail"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout.lines().count(), fails);
    let out = loupe(&["history", "--db", &url, "--json", "--limit", "3"]);
    let newest: Vec<i64> = out
        .stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        newest,
        ids.iter().rev().take(3).copied().collect::<Vec<_>>()
    );

    // A database that is not there: one clear line naming it, the password hidden.
    let bad = format!("postgres://loupe:secret@127.0.0.1:{}/postgres", free_port());
    let out = loupe(&["history", "--db", &bad]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(!out.stderr.contains("secret"), "{}", out.stderr);
    assert!(out.stderr.contains("loupe:***@127.0.0.1"), "{}", out.stderr);
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
}
