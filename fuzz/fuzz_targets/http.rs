//! `loupe serve`'s request bodies, through the real router and model thread, in-process: the first
//! byte picks the route (chat completions JSON, inspection JSON, inspection multipart, history
//! query), the rest is the body (or the query). Any answer is fine but a 5xx other than 503: a bad
//! request must be a 4xx in OpenAI's error shape, never a failure inside the server.
#![no_main]
use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

#[path = "common.rs"]
mod common;

struct Server {
    runtime: tokio::runtime::Runtime,
    app: loupe_server::App,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/loupe-parts-demo");
        // Small bounds, so that one input stays well inside libFuzzer's time per input.
        let mut lim = loupe_core::limits::get();
        lim.image_pixels = 1 << 20;
        loupe_core::limits::set(lim);
        let engine = loupe_core::Engine::load(root, &Default::default()).expect("the demo model");
        let spec = loupe_inspect::Spec::load(std::path::Path::new(&format!("{root}/spec.toml")))
            .expect("the demo spec");
        let opts = loupe_server::Options {
            host: "127.0.0.1".into(),
            port: 0,
            api_key: None,
            parallel: 2,
            batch: true,
            max_queue: 4,
            allow_paths: vec![],
            max_body_bytes: 1 << 20,
            max_tokens: 8,
            model_name: "demo".into(),
            model_aliases: vec![],
            db: None,
            reuse: loupe_inspect::inspector::ReuseMode::Prefix,
            mqtt: None,
        };
        let app = loupe_server::app(engine, vec![spec], &opts).expect("the server");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        Server { runtime, app }
    })
}

fuzz_target!(|data: &[u8]| {
    common::hook();
    let Some((&route, body)) = data.split_first() else {
        return;
    };
    let s = server();
    let req = match route % 4 {
        0 => Request::post("/v1/chat/completions")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_vec())),
        1 => Request::post("/v1/inspect")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_vec())),
        2 => Request::post("/v1/inspect")
            .header(header::CONTENT_TYPE, "multipart/form-data; boundary=XyZ")
            .body(Body::from(body.to_vec())),
        _ => {
            let Ok(q) = std::str::from_utf8(body) else {
                return;
            };
            Request::get(format!("/v1/history?{q}")).body(Body::empty())
        }
    };
    let Ok(req) = req else { return }; // not a valid URI: no request reaches the server
    let status = s.runtime.block_on(async {
        let resp = s
            .app
            .router()
            .oneshot(req)
            .await
            .expect("the router is infallible");
        let status = resp.status();
        // The whole answer, streamed ones included.
        let body = tokio::time::timeout(
            Duration::from_secs(8),
            axum::body::to_bytes(resp.into_body(), usize::MAX),
        )
        .await;
        assert!(body.is_ok(), "the answer did not end within 8 s");
        status
    });
    assert!(
        !status.is_server_error() || status.as_u16() == 503,
        "route {} answered {status} to {:?}",
        route % 4,
        String::from_utf8_lossy(&body[..body.len().min(300)])
    );
});
