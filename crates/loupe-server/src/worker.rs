//! The model's own thread. HTTP handlers validate a request, build its prompt, and queue a job with a
//! channel back; this thread takes jobs while it has free slots (`--parallel`), steps every running
//! answer one token in turn, and sends each piece of text down its channel. A closed channel is a
//! client that has gone: its answer is dropped at the next token and its slot freed.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use loupe_core::generate::{Constraint, FinishReason, GenerateParams, Prompt, Sequence};
use loupe_core::Engine;
use loupe_inspect::audit::AuditLog;
use loupe_inspect::inspector::ReuseMode;
use loupe_inspect::{overlay, Inspector, Record, Spec};
use tokio::sync::{mpsc, oneshot};

use crate::error::{ApiError, ApiResult};
use crate::metrics::{Metrics, VerdictLabels};

pub enum Job {
    Chat(Box<ChatJob>),
    Inspect(InspectJob),
}

pub struct ChatJob {
    pub prompt: Prompt,
    pub params: GenerateParams,
    pub constraint: Option<Constraint>,
    pub events: mpsc::UnboundedSender<Event>,
    /// When the request arrived (for the time to first token).
    pub arrived: Instant,
}

/// What a running answer sends back.
#[derive(Debug)]
pub enum Event {
    Text(String),
    Done {
        finish_reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(ApiError),
}

pub struct InspectJob {
    /// Index into the loaded specs.
    pub spec: usize,
    /// What the record calls the image (the upload's file name).
    pub name: String,
    pub bytes: Vec<u8>,
    pub reply: oneshot::Sender<ApiResult<Inspected>>,
}

#[derive(Debug)]
pub struct Inspected {
    /// The audit row's id (or a counter without an audit log); names the overlay.
    pub id: i64,
    pub record: Record,
}

/// Overlays of the latest inspections, by id, as PNG.
#[derive(Default)]
pub struct Overlays {
    items: Mutex<VecDeque<(i64, Arc<Vec<u8>>)>>,
}

impl Overlays {
    /// Overlays kept in memory (the oldest go first).
    pub const CAPACITY: usize = 256;

    fn put(&self, id: i64, png: Vec<u8>) {
        let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        if items.len() >= Self::CAPACITY {
            items.pop_front();
        }
        items.push_back((id, Arc::new(png)));
    }

    pub fn get(&self, id: i64) -> Option<Arc<Vec<u8>>> {
        let items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        items.iter().find(|(i, _)| *i == id).map(|(_, p)| p.clone())
    }
}

/// What the worker needs besides the engine.
pub struct WorkerSetup {
    pub specs: Vec<Spec>,
    pub reuse: ReuseMode,
    pub audit: Option<AuditLog>,
    pub weights_sha256: Option<String>,
    pub model_id: String,
    pub parallel: usize,
    /// Run the decode steps of the running answers as one batch (else one after the other).
    pub batch: bool,
    /// The topic every verdict is queued for, and the publisher to wake.
    pub mqtt: Option<(String, crate::mqtt::Waker)>,
}

/// Runs the model thread until the job queue closes and every running answer is done. Reports on
/// `ready` once the specs' inspectors are built (or why they could not be).
pub fn run(
    engine: Arc<Engine>,
    setup: WorkerSetup,
    mut jobs: mpsc::Receiver<Job>,
    metrics: Arc<Metrics>,
    overlays: Arc<Overlays>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let engine: &Engine = &engine;
    let mut inspectors = Vec::new();
    for spec in &setup.specs {
        match Inspector::new(engine, spec.clone(), setup.reuse) {
            Ok(mut i) => {
                i.model_id = setup.model_id.clone();
                i.weights_sha256 = setup.weights_sha256.clone();
                inspectors.push(i);
            }
            Err(e) => {
                let _ = ready.send(Err(format!("{}: {e}", spec.path.display())));
                return;
            }
        }
    }
    let _ = ready.send(Ok(()));
    let mut audit = setup.audit;
    let mut next_id = 0i64;
    let mut running: Vec<Running> = Vec::new();
    loop {
        // Take new work while there are free slots; wait for it when there is nothing to do.
        while running.len() < setup.parallel.max(1) {
            let job = if running.is_empty() {
                match jobs.blocking_recv() {
                    Some(j) => j,
                    None => return,
                }
            } else {
                match jobs.try_recv() {
                    Ok(j) => j,
                    Err(_) => break,
                }
            };
            metrics.queue_depth.dec();
            match job {
                Job::Inspect(j) => {
                    let spec_name = setup.specs[j.spec].name.clone();
                    let classes: Vec<String> = setup.specs[j.spec]
                        .defects
                        .iter()
                        .map(|d| d.name.clone())
                        .collect();
                    inspect(
                        &mut inspectors[j.spec],
                        j,
                        &spec_name,
                        &classes,
                        audit.as_mut(),
                        setup.mqtt.as_ref(),
                        &mut next_id,
                        &metrics,
                        &overlays,
                    );
                }
                Job::Chat(j) => {
                    if let Some(r) = start(engine, *j, &metrics) {
                        running.push(r);
                    }
                }
            }
        }
        // Answers whose client went away end here, before their next token.
        let mut i = 0;
        while i < running.len() {
            if running[i].events.is_closed() {
                metrics.cancelled.inc();
                running[i].dropped = true;
                running.swap_remove(i).end(&metrics);
            } else {
                i += 1;
            }
        }
        // One token of each running answer: one batched forward, or one forward each.
        let results = if setup.batch {
            let mut seqs: Vec<&mut Sequence> = running.iter_mut().map(|r| &mut r.seq).collect();
            Sequence::step_batch(&mut seqs)
        } else {
            running.iter_mut().map(|r| r.seq.step()).collect()
        };
        // From the back, so that swap_remove moves only answers already handled.
        for (i, result) in results.into_iter().enumerate().rev() {
            if !running[i].stepped(result, &metrics) {
                running.swap_remove(i).end(&metrics);
            }
        }
    }
}

struct Running<'e> {
    seq: Sequence<'e>,
    events: mpsc::UnboundedSender<Event>,
    arrived: Instant,
    first_token: bool,
    /// Set when the answer cannot go on (client gone, error): dropped without a summary.
    dropped: bool,
}

fn start<'e>(engine: &'e Engine, j: ChatJob, metrics: &Metrics) -> Option<Running<'e>> {
    if j.events.is_closed() {
        metrics.cancelled.inc();
        return None;
    }
    match engine.sequence(&j.prompt, &j.params, j.constraint, None) {
        Ok(seq) => {
            metrics.running.inc();
            Some(Running {
                seq,
                events: j.events,
                arrived: j.arrived,
                first_token: false,
                dropped: false,
            })
        }
        Err(e) => {
            let _ = j.events.send(Event::Error(e.into()));
            None
        }
    }
}

impl Running<'_> {
    /// Sends what one step gave; `false` once the answer is over (finished or failed).
    fn stepped(&mut self, result: loupe_core::Result<String>, metrics: &Metrics) -> bool {
        match result {
            Ok(piece) => {
                if !self.first_token {
                    self.first_token = true;
                    metrics
                        .time_to_first_token
                        .observe(self.arrived.elapsed().as_secs_f64());
                }
                if !piece.is_empty() {
                    let _ = self.events.send(Event::Text(piece));
                }
                !self.seq.is_finished()
            }
            Err(e) => {
                let _ = self.events.send(Event::Error(e.into()));
                self.dropped = true;
                false
            }
        }
    }

    fn end(self, metrics: &Metrics) {
        metrics.running.dec();
        if self.dropped {
            return;
        }
        let events = self.events;
        match self.seq.finish(&mut |rest| {
            let _ = events.send(Event::Text(rest.to_owned()));
        }) {
            Ok(g) => {
                metrics.observe(&g.timings, g.prompt_tokens, g.tokens.len());
                let _ = events.send(Event::Done {
                    finish_reason: g.finish_reason,
                    prompt_tokens: g.prompt_tokens,
                    completion_tokens: g.tokens.len(),
                });
            }
            Err(e) => {
                let _ = events.send(Event::Error(e.into()));
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn inspect(
    inspector: &mut Inspector,
    j: InspectJob,
    spec_name: &str,
    classes: &[String],
    audit: Option<&mut AuditLog>,
    mqtt: Option<&(String, crate::mqtt::Waker)>,
    next_id: &mut i64,
    metrics: &Metrics,
    overlays: &Overlays,
) {
    if j.reply.is_closed() {
        metrics.cancelled.inc();
        return;
    }
    metrics.running.inc();
    let t0 = Instant::now();
    let (record, upright) = inspector.inspect_bytes(Path::new(&j.name), &j.bytes, t0);
    metrics.running.dec();
    let t = &record.timings;
    metrics.observe(
        &loupe_core::generate::Timings {
            vision_ms: t.vision_ms,
            prefill_ms: t.prefill_ms,
            decode_ms: t.decode_ms,
        },
        record.prompt_tokens,
        record.output_tokens,
    );
    // The row is written before the answer goes out: what a client was told is in the log.
    // With MQTT, the message is queued in the same transaction as the row.
    let appended = audit.map(|a| match mqtt {
        Some((topic, _)) => a.append_and_queue(&record, topic),
        None => a.append(&record),
    });
    let id = match appended {
        Some(r) => match r {
            Ok(id) => {
                if let Some((_, waker)) = mqtt {
                    waker.wake();
                }
                id
            }
            Err(e) => {
                let _ = j
                    .reply
                    .send(Err(ApiError::internal(format!("audit log: {e}"))));
                return;
            }
        },
        None => {
            *next_id += 1;
            *next_id
        }
    };
    let verdict = match (&record.error, record.verdict) {
        (None, Some(v)) => v.as_str(),
        _ => "error",
    };
    metrics
        .inspections
        .get_or_create(&VerdictLabels {
            spec: spec_name.to_owned(),
            verdict: verdict.to_owned(),
        })
        .inc();
    if let Some(img) = upright {
        let ov = overlay::draw(&img, &record, true, classes, spec_name);
        let mut png = Vec::new();
        if ov
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .is_ok()
        {
            overlays.put(id, png);
        }
    }
    let _ = j.reply.send(Ok(Inspected { id, record }));
}
