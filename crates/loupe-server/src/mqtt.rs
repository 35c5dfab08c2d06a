//! Verdicts to the plant over MQTT, at least once (QoS 1), nothing lost while the broker is away.
//!
//! The model thread writes each inspection's record and its outgoing message in one transaction of
//! the audit database (the `outbox` table), then wakes the publisher. The publisher sends what the
//! outbox holds, oldest first, and deletes a message only when the broker has acknowledged it
//! (PUBACK). When the connection drops it starts a fresh one after a backoff and sends again
//! everything still in the outbox: a message whose PUBACK was lost arrives twice, which QoS 1 allows;
//! none is lost, also across a crash or a restart of the server (the outbox is on disk).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use loupe_inspect::audit::{AuditLog, Outgoing};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{watch, Notify};

use crate::metrics::Metrics;

/// Messages sent and not yet acknowledged, at most.
const IN_FLIGHT: usize = 32;
/// The largest record a message may carry (the broker may set a smaller bound).
const MAX_PACKET: usize = 16 << 20;
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often the outbox is read without a wake-up (rows left by another process, a missed wake-up).
const POLL: Duration = Duration::from_secs(2);

/// Where verdicts go: `mqtt://host[:port]/topic`.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub topic: String,
}

impl Target {
    /// Reads `mqtt://host[:port]/topic` (port 1883 by default; the topic may have levels `a/b/c`).
    pub fn parse(url: &str) -> Result<Target, String> {
        let bad = |why: &str| format!("--mqtt `{url}`: {why} (expected mqtt://host[:port]/topic)");
        let rest = match url.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => rest,
            Some(("mqtts" | "ssl" | "ws" | "wss", _)) => {
                return Err(bad(
                    "only plain mqtt:// is supported; put a TLS bridge on the broker's side",
                ))
            }
            _ => return Err(bad("the scheme must be mqtt://")),
        };
        let (authority, topic) = rest.split_once('/').ok_or_else(|| bad("no topic"))?;
        if topic.is_empty() {
            return Err(bad("no topic"));
        }
        if topic.contains(['+', '#', '\0']) {
            return Err(bad("a topic to publish on has no wildcards (+, #) or NUL"));
        }
        if authority.contains('@') {
            return Err(bad("user names and passwords in the URL are not supported"));
        }
        // `host`, `host:port`, `[v6]` or `[v6]:port`.
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (h, rest) = v6
                    .split_once(']')
                    .ok_or_else(|| bad("no `]` after the address"))?;
                (h, rest.strip_prefix(':'))
            }
            None => match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            },
        };
        let port = match port {
            None => 1883,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(&format!("port `{p}` is not a number from 1 to 65535")))?,
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(Target {
            host: host.to_owned(),
            port,
            topic: topic.to_owned(),
        })
    }
}

/// Wakes the publisher when the model thread has queued a message.
#[derive(Clone, Default)]
pub struct Waker(Arc<Notify>);

impl Waker {
    pub fn wake(&self) {
        self.0.notify_one();
    }
}

/// Publishes the outbox of the audit database at `db` to `target` until `stop` turns true; then
/// sends what it can for up to `drain` and returns (what is left stays in the outbox).
pub async fn publish(
    target: Target,
    db: PathBuf,
    waker: Waker,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
    metrics: Arc<Metrics>,
) {
    let log = match tokio::task::spawn_blocking(move || AuditLog::open(&db)).await {
        Ok(Ok(log)) => Arc::new(Mutex::new(log)),
        Ok(Err(e)) => {
            tracing::error!("mqtt: cannot open the outbox: {e}; nothing will be published");
            return;
        }
        Err(_) => return,
    };
    let client_id = format!(
        "loupe-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    );
    let mut backoff = BACKOFF_MIN;
    loop {
        let outcome = connection(
            &target, &client_id, &log, &waker, &metrics, &mut stop, drain,
        )
        .await;
        metrics.mqtt_connected.set(0);
        match outcome {
            Session::Stopped => return,
            Session::Lost { was_up } => {
                if was_up {
                    backoff = BACKOFF_MIN;
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stopped(&mut stop) => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

enum Session {
    Stopped,
    Lost { was_up: bool },
}

/// One connection to the broker: sends the outbox and waits for its acknowledgements until the
/// connection fails or the server stops.
async fn connection(
    target: &Target,
    client_id: &str,
    log: &Arc<Mutex<AuditLog>>,
    waker: &Waker,
    metrics: &Metrics,
    stop: &mut watch::Receiver<bool>,
    drain: Duration,
) -> Session {
    let mut opts = MqttOptions::new(client_id, &target.host, target.port);
    opts.set_keep_alive(Duration::from_secs(15))
        .set_clean_session(true)
        .set_inflight(IN_FLIGHT as u16)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET);
    let (client, mut events) = AsyncClient::new(opts, IN_FLIGHT * 2);
    let mut up = false;
    // Outbox ids handed to the client, in order, until the event loop gives each its packet id.
    let mut handed: VecDeque<i64> = VecDeque::new();
    let mut by_pkid: HashMap<u16, i64> = HashMap::new();
    // The newest outbox id sent on this connection: the next read starts after it.
    let mut after = 0i64;
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(POLL);
    loop {
        let waiting = handed.len() + by_pkid.len();
        if up && waiting < IN_FLIGHT {
            let rows = read_outbox(log, after, IN_FLIGHT - waiting).await;
            for m in rows {
                if client
                    .try_publish(&m.topic, QoS::AtLeastOnce, false, m.payload.into_bytes())
                    .is_err()
                {
                    break;
                }
                after = m.id;
                handed.push_back(m.id);
            }
        }
        if deadline.is_some() && handed.is_empty() && by_pkid.is_empty() {
            // Stopping, and everything sent is acknowledged: anything newer waits for the next start.
            let _ = client.try_disconnect();
            return Session::Stopped;
        }
        tokio::select! {
            ev = events.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if !up {
                        tracing::info!("mqtt: connected to {}:{}", target.host, target.port);
                    }
                    up = true;
                    metrics.mqtt_connected.set(1);
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                    if let Some(id) = handed.pop_front() {
                        by_pkid.insert(pkid, id);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(id) = by_pkid.remove(&ack.pkid) {
                        metrics.mqtt_published.inc();
                        delete(log, id).await;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if up {
                        tracing::warn!("mqtt: connection to {}:{} lost: {e}; reconnecting", target.host, target.port);
                    } else {
                        tracing::debug!("mqtt: cannot reach {}:{}: {e}", target.host, target.port);
                    }
                    if deadline.is_some() {
                        return Session::Stopped;
                    }
                    return Session::Lost { was_up: up };
                }
            },
            () = waker.0.notified() => {}
            _ = tick.tick() => {}
            () = stopped(stop), if deadline.is_none() => {
                deadline = Some(tokio::time::Instant::now() + drain);
            }
            () = sleep_until(deadline) => {
                let _ = client.try_disconnect();
                return Session::Stopped;
            }
        }
    }
}

/// Returns once the server stops (or the stop signal's sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            return;
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn read_outbox(log: &Arc<Mutex<AuditLog>>, after: i64, limit: usize) -> Vec<Outgoing> {
    let log = log.clone();
    let rows = tokio::task::spawn_blocking(move || {
        log.lock()
            .unwrap_or_else(|p| p.into_inner())
            .outbox(after, limit)
    })
    .await;
    match rows {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => {
            tracing::warn!("mqtt: cannot read the outbox: {e}");
            Vec::new()
        }
        Err(_) => Vec::new(),
    }
}

async fn delete(log: &Arc<Mutex<AuditLog>>, id: i64) {
    let log = log.clone();
    let done =
        tokio::task::spawn_blocking(move || log.lock().unwrap_or_else(|p| p.into_inner()).sent(id))
            .await;
    if let Ok(Err(e)) = done {
        // Left in the outbox: sent again later, a duplicate QoS 1 allows.
        tracing::warn!("mqtt: cannot mark message {id} as sent: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_with_default_port_and_topic_levels() {
        assert_eq!(
            Target::parse("mqtt://broker.local/line1/verdicts").unwrap(),
            Target {
                host: "broker.local".into(),
                port: 1883,
                topic: "line1/verdicts".into()
            }
        );
        assert_eq!(
            Target::parse("mqtt://127.0.0.1:18830/v").unwrap(),
            Target {
                host: "127.0.0.1".into(),
                port: 18830,
                topic: "v".into()
            }
        );
        assert_eq!(Target::parse("mqtt://[::1]:1884/v").unwrap().host, "::1");
        assert_eq!(Target::parse("mqtt://[::1]/v").unwrap().port, 1883);
    }

    #[test]
    fn bad_targets_say_what_is_wrong() {
        for (url, why) in [
            ("http://h/t", "scheme"),
            ("mqtts://h/t", "TLS"),
            ("mqtt://h", "no topic"),
            ("mqtt://h/", "no topic"),
            ("mqtt://h:0/t", "port `0`"),
            ("mqtt://h:99999/t", "port `99999`"),
            ("mqtt://h:x/t", "port `x`"),
            ("mqtt://:1883/t", "no host"),
            ("mqtt://h/a/#", "wildcards"),
            ("mqtt://u:p@h/t", "passwords"),
        ] {
            let e = Target::parse(url).unwrap_err();
            assert!(e.contains(why), "{url}: {e}");
            assert!(e.contains(url), "{url}: {e}");
        }
    }
}
