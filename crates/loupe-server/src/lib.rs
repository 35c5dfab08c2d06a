//! `loupe serve`: the OpenAI chat API with images, the inspection API, and the live inspection page,
//! over one loaded model.
//!
//! The HTTP layer (axum on tokio) only validates and queues: each handler checks its request, builds
//! the prompt, and puts a job with a channel back on a bounded queue. One thread owns the model
//! ([`worker`]) and pulls from that queue. A full queue answers 503 with `Retry-After`; a client that
//! goes away closes its channel and its answer stops at the next token.

pub mod error;
mod images;
mod inspect;
pub mod metrics;
pub mod mqtt;
mod openai;
mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use loupe_core::Engine;
use loupe_inspect::audit::AuditLog;
use loupe_inspect::inspector::ReuseMode;
use loupe_inspect::Spec;
use serde_json::json;
use tokio::sync::mpsc;

pub use error::{ApiError, ApiResult};
use metrics::{Metrics, RouteLabels};
use worker::{Job, Overlays, WorkerSetup};

/// How the server runs (the `loupe serve` flags).
#[derive(Debug, Clone)]
pub struct Options {
    pub host: String,
    pub port: u16,
    /// Required as `Authorization: Bearer KEY` on `/v1/*` and `/metrics` when set.
    pub api_key: Option<String>,
    /// Answers generated at once.
    pub parallel: usize,
    /// Their decode steps run as one batched forward (else one after the other).
    pub batch: bool,
    /// Requests waiting for the model beyond the running ones; more get 503.
    pub max_queue: usize,
    /// Folders that `file://` image URLs may name.
    pub allow_paths: Vec<PathBuf>,
    pub max_body_bytes: usize,
    /// The most tokens one answer may ask for (and the default when it asks nothing).
    pub max_tokens: usize,
    /// The model's id in `/v1/models` and in requests.
    pub model_name: String,
    /// Other names a request may use for the model (the path as given).
    pub model_aliases: Vec<String>,
    /// The audit database; `None` keeps none.
    pub db: Option<PathBuf>,
    pub reuse: ReuseMode,
    /// Where every verdict is published (through the audit database's outbox).
    pub mqtt: Option<mqtt::Target>,
}

struct Inner {
    engine: Arc<Engine>,
    model_name: String,
    model_aliases: Vec<String>,
    specs: Vec<SpecInfo>,
    jobs: mpsc::Sender<Job>,
    api_key: Option<String>,
    allow_paths: Vec<PathBuf>,
    max_tokens: usize,
    metrics: Arc<Metrics>,
    overlays: Arc<Overlays>,
    db: Option<PathBuf>,
    ids: AtomicU64,
}

#[derive(Debug, Clone, serde::Serialize)]
struct SpecInfo {
    name: String,
    classes: Vec<String>,
}

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState(Arc<Inner>);

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    fn serves_model(&self, name: &str) -> bool {
        name == self.model_name || self.model_aliases.iter().any(|a| a == name)
    }

    fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Queues a job, or says the queue is full.
    fn submit(&self, job: Job) -> ApiResult<()> {
        match self.jobs.try_send(job) {
            Ok(()) => {
                self.metrics.queue_depth.inc();
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(ApiError::overloaded(1)),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(ApiError::unavailable("the server is shutting down"))
            }
        }
    }

    /// The loaded spec a request names (or the only one).
    fn spec_index(&self, name: Option<&str>) -> ApiResult<usize> {
        let names = || {
            self.specs
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match name {
            Some(n) => self.specs.iter().position(|s| s.name == n).ok_or_else(|| {
                ApiError::not_found(
                    "spec_not_found",
                    format!("spec `{n}` is not loaded (loaded: {})", names()),
                )
            }),
            None if self.specs.len() == 1 => Ok(0),
            None if self.specs.is_empty() => Err(ApiError::bad_request(
                "no inspection spec is loaded (start loupe serve with --spec S.toml)",
            )),
            None => Err(ApiError::field(
                "spec",
                format!("several specs are loaded; name one of {}", names()),
            )),
        }
    }
}

/// The body, or the error a client should see for it (413 over `--max-body-bytes`).
fn body_bytes(body: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(format!(
                "the request body is over this server's limit (loupe serve --max-body-bytes): {e}"
            ))
        } else {
            ApiError::bad_request(format!("request body: {e}"))
        }
    })
}

/// A JSON body into `T`; an error names the field (`messages[0].content`) and what is wrong.
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad_request(format!("the body is not valid JSON: {inner}"))
        } else if path == "." || path.is_empty() {
            ApiError::bad_request(format!("the body is not a valid request: {inner}"))
        } else {
            ApiError::field(path, inner.to_string())
        }
    })
}

/// Whether `host` is a loopback name or address.
fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Equal-time comparison of a presented key with the server's.
fn same_key(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| same_key(g.as_bytes(), key.as_bytes())) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

async fn count(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_owned();
    let resp = next.run(req).await;
    s.metrics
        .requests
        .get_or_create(&RouteLabels {
            route,
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}

async fn health() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

async fn models(State(s): State<AppState>) -> Response {
    Json(json!({
        "object": "list",
        "data": [{
            "id": s.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "loupe",
            "model_type": s.engine.model_type,
            "context_length": s.engine.context_length,
        }],
    }))
    .into_response()
}

async fn specs(State(s): State<AppState>) -> Response {
    Json(json!({"object": "list", "data": s.specs})).into_response()
}

async fn metrics_text(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

async fn page() -> Response {
    Html(include_str!("page/index.html")).into_response()
}

async fn not_found(req: Request) -> Response {
    ApiError::not_found(
        "not_found",
        format!("no route {} {}", req.method(), req.uri().path()),
    )
    .into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::bad_request(format!(
            "{} is not allowed on {}",
            req.method(),
            req.uri().path()
        ))
    }
    .into_response()
}

fn router(state: AppState, max_body_bytes: usize) -> Router {
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/inspect", post(inspect::inspect))
        .route("/v1/inspect/{id}/overlay.png", get(inspect::overlay))
        .route("/v1/history", get(inspect::history))
        .route("/v1/specs", get(specs))
        .route("/metrics", get(metrics_text))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(api)
        .route("/", get(page))
        .route("/health", get(health))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// A server without a socket: the router over the loaded model and the model thread behind it.
/// `serve` binds it to an address; tests and the fuzz target call the router in-process.
pub struct App {
    router: Router,
    worker: std::thread::JoinHandle<()>,
    waker: mqtt::Waker,
    metrics: Arc<Metrics>,
}

impl App {
    /// The routes, ready for `tower::ServiceExt::oneshot` or `axum::serve`.
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// Drops the router (once no clone of it is left, the model thread finishes what it holds and
    /// returns) and waits for the model thread.
    pub fn finish(self) -> Result<(), String> {
        drop(self.router);
        self.worker
            .join()
            .map_err(|_| "the model thread panicked".to_string())
    }
}

/// Loads what `serve` needs besides the socket: the audit log, the model thread (returns once it is
/// ready) and the router.
pub fn app(engine: Engine, specs: Vec<Spec>, opts: &Options) -> Result<App, String> {
    let allow_paths = opts
        .allow_paths
        .iter()
        .map(|p| {
            p.canonicalize()
                .map_err(|e| format!("--allow-path {}: {e}", p.display()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if opts.mqtt.is_some() && opts.db.is_none() {
        return Err(
            "--mqtt needs the audit database (its outbox keeps the messages while the \
                    broker is away): drop --no-audit"
                .into(),
        );
    }
    let (audit, weights_sha256) = match &opts.db {
        Some(db) => {
            let mut a = AuditLog::open(db).map_err(|e| e.to_string())?;
            let sha = a
                .weights_sha256(&engine.files.weights)
                .map_err(|e| e.to_string())?;
            (Some(a), Some(sha))
        }
        None => (None, None),
    };
    let engine = Arc::new(engine);
    let metrics = Arc::new(Metrics::new());
    let waker = mqtt::Waker::default();
    let overlays = Arc::new(Overlays::default());
    let (jobs, queue) = mpsc::channel(opts.max_queue.max(1));
    let spec_infos = specs
        .iter()
        .map(|s| SpecInfo {
            name: s.name.clone(),
            classes: s.defects.iter().map(|d| d.name.clone()).collect(),
        })
        .collect();
    let setup = WorkerSetup {
        specs,
        reuse: opts.reuse,
        audit,
        weights_sha256,
        model_id: opts
            .model_aliases
            .first()
            .cloned()
            .unwrap_or_else(|| opts.model_name.clone()),
        parallel: opts.parallel.max(1),
        batch: opts.batch,
        mqtt: opts.mqtt.as_ref().map(|t| (t.topic.clone(), waker.clone())),
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let worker = {
        let (engine, metrics, overlays) = (engine.clone(), metrics.clone(), overlays.clone());
        std::thread::Builder::new()
            .name("loupe-model".into())
            .spawn(move || worker::run(engine, setup, queue, metrics, overlays, ready_tx))
            .map_err(|e| format!("cannot start the model thread: {e}"))?
    };
    ready_rx
        .recv()
        .map_err(|_| "the model thread stopped while starting".to_string())??;

    let metrics_for_app = metrics.clone();
    let state = AppState(Arc::new(Inner {
        engine,
        model_name: opts.model_name.clone(),
        model_aliases: opts.model_aliases.clone(),
        specs: spec_infos,
        jobs,
        api_key: opts.api_key.clone(),
        allow_paths,
        max_tokens: opts.max_tokens,
        metrics,
        overlays,
        db: opts.db.clone(),
        ids: AtomicU64::new(0),
    }));
    Ok(App {
        router: router(state, opts.max_body_bytes),
        worker,
        waker,
        metrics: metrics_for_app,
    })
}

/// Serves `engine` until SIGINT or SIGTERM; then stops taking connections, lets running requests
/// finish, and returns once the model thread has written its last audit row.
pub fn serve(engine: Engine, specs: Vec<Spec>, opts: Options) -> Result<(), String> {
    let n_specs = specs.len();
    let app = app(engine, specs, &opts)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("loupe-http")
        .build()
        .map_err(|e| format!("cannot start the HTTP runtime: {e}"))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let publisher = match (&opts.mqtt, &opts.db) {
        (Some(target), Some(db)) => Some(runtime.spawn(mqtt::publish(
            target.clone(),
            db.clone(),
            app.waker.clone(),
            stop_rx,
            Duration::from_secs(5),
            app.metrics.clone(),
        ))),
        _ => None,
    };
    let routes = app.router();
    let result = runtime.block_on(async move {
        let addr = format!("{}:{}", opts.host, opts.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let local: SocketAddr = listener.local_addr().map_err(|e| e.to_string())?;
        if !is_loopback(&opts.host) && opts.api_key.is_none() {
            eprintln!(
                "loupe serve: warning: listening on {} without an API key: anyone who can reach \
                 this address can use the model (give --api-key or --api-key-file)",
                opts.host
            );
        }
        eprintln!(
            "loupe serve: listening on http://{local} (model {}, {} spec{})",
            opts.model_name,
            n_specs,
            if n_specs == 1 { "" } else { "s" }
        );
        axum::serve(listener, routes)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(|e| format!("server: {e}"))
    });
    // The router, and with it the queue's sender, is gone: the model thread finishes what it holds
    // and returns; then the publisher sends what the last inspections queued (for a few seconds at
    // most; the rest stays in the outbox for the next start).
    let joined = app.finish();
    let _ = stop_tx.send(true);
    if let Some(p) = publisher {
        let _ = runtime.block_on(p);
    }
    drop(runtime);
    joined?;
    eprintln!("loupe serve: stopped");
    result
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    eprintln!("loupe serve: shutting down (finishing running requests)");
}
