//! The inspection API: `POST /v1/inspect` (a multipart upload, or JSON with a base64 image) returns
//! the record `loupe inspect --json` writes and adds the audit row; `GET /v1/inspect/{id}/overlay.png`
//! the overlay; `GET /v1/history` the audit log with `loupe history`'s filters.

use std::collections::HashMap;
use std::io::Cursor;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use loupe_inspect::audit::{AuditLog, Filter};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;

use crate::error::{ApiError, ApiResult};
use crate::worker::{InspectJob, Job};
use crate::{body_bytes, parse_json, AppState};

#[derive(Debug, Deserialize)]
struct InspectJson {
    /// The spec's `name`; may be left out when one spec is loaded.
    spec: Option<String>,
    /// Base64 bytes, or a `data:` URI.
    image: String,
    /// What the record calls the image.
    name: Option<String>,
}

/// The image and its spec, from either body kind.
struct Upload {
    spec: Option<String>,
    name: String,
    bytes: Vec<u8>,
}

pub async fn inspect(
    State(s): State<AppState>,
    headers: HeaderMap,
    req: axum::extract::Request,
) -> Response {
    match inspect_inner(s, headers, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn inspect_inner(
    s: AppState,
    headers: HeaderMap,
    req: axum::extract::Request,
) -> ApiResult<Response> {
    use axum::extract::FromRequest;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let upload = if content_type.starts_with("multipart/form-data") {
        let mp = Multipart::from_request(req, &s)
            .await
            .map_err(|e| ApiError::bad_request(format!("multipart body: {e}")))?;
        read_multipart(mp).await?
    } else {
        let body: Result<Bytes, BytesRejection> = Bytes::from_request(req, &s).await;
        let j: InspectJson = parse_json(&body_bytes(body)?)?;
        let data = match j.image.strip_prefix("data:") {
            Some(rest) => rest.split_once(',').map_or("", |(_, d)| d).to_owned(),
            None => j.image,
        };
        Upload {
            spec: j.spec,
            name: j.name.unwrap_or_else(|| "upload".into()),
            bytes: crate::images::base64_bytes(&data, "image")?,
        }
    };
    let spec = s.spec_index(upload.spec.as_deref())?;
    check_image(&upload.bytes)?;
    let (tx, rx) = oneshot::channel();
    s.submit(Job::Inspect(InspectJob {
        spec,
        name: upload.name,
        bytes: upload.bytes,
        reply: tx,
    }))?;
    let done = rx
        .await
        .map_err(|_| ApiError::unavailable("the server is shutting down"))??;
    let mut v = serde_json::to_value(&done.record)
        .map_err(|e| ApiError::internal(format!("record: {e}")))?;
    v["id"] = json!(done.id);
    v["overlay_url"] = json!(format!("/v1/inspect/{}/overlay.png", done.id));
    Ok(Json(v).into_response())
}

async fn read_multipart(mut mp: Multipart) -> ApiResult<Upload> {
    let mut spec = None;
    let mut image = None;
    while let Some(field) = mp
        .next_field()
        .await
        .map_err(|e| ApiError::bad_request(format!("multipart body: {e}")))?
    {
        match field.name() {
            Some("spec") => {
                spec = Some(
                    field
                        .text()
                        .await
                        .map_err(|e| ApiError::field("spec", e.to_string()))?,
                )
            }
            Some("image") => {
                let name = field.file_name().unwrap_or("upload").to_owned();
                let bytes = field
                    .bytes()
                    .await
                    .map_err(|e| ApiError::too_large(format!("image: {e}")))?;
                image = Some((name, bytes.to_vec()));
            }
            _ => {}
        }
    }
    let (name, bytes) =
        image.ok_or_else(|| ApiError::field("image", "the form has no `image` file"))?;
    Ok(Upload { spec, name, bytes })
}

/// Refuses what is not an image, or is over the byte or pixel limits, from its header alone.
fn check_image(bytes: &[u8]) -> ApiResult<()> {
    let lim = loupe_core::limits::get();
    if bytes.len() as u64 > lim.image_bytes {
        return Err(ApiError::too_large(format!(
            "image: {} bytes, over the limit of {} (image-bytes)",
            bytes.len(),
            lim.image_bytes
        )));
    }
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::field("image", e.to_string()))?;
    if reader.format().is_none() {
        return Err(ApiError::field(
            "image",
            "not an image Loupe reads (JPEG, PNG, WebP, GIF, BMP, TIFF)",
        ));
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| ApiError::field("image", format!("unreadable image header: {e}")))?;
    let pixels = u64::from(w) * u64::from(h);
    if pixels > lim.image_pixels {
        return Err(ApiError::too_large(format!(
            "image: {w}x{h} is {pixels} pixels, over the limit of {} (image-pixels)",
            lim.image_pixels
        )));
    }
    Ok(())
}

pub async fn overlay(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    let png = id.parse::<i64>().ok().and_then(|i| s.overlays.get(i));
    match png {
        Some(p) => ([(header::CONTENT_TYPE, "image/png")], p.as_ref().clone()).into_response(),
        None => ApiError::not_found(
            "overlay_not_found",
            format!(
                "no overlay for inspection `{id}` (the server keeps the latest {})",
                crate::worker::Overlays::CAPACITY
            ),
        )
        .into_response(),
    }
}

pub async fn history(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match history_inner(s, q).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn history_inner(s: AppState, q: HashMap<String, String>) -> ApiResult<Response> {
    let Some(db) = s.db.clone() else {
        return Err(ApiError::not_found(
            "no_audit_log",
            "this server keeps no audit log (started with --no-audit)",
        ));
    };
    let limit = match q.get("limit") {
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| ApiError::field("limit", format!("`{l}` is not a count")))?
            .min(10_000),
        None => 50,
    };
    let get = |k: &str| q.get(k).map(String::as_str);
    let filter = Filter::parse(
        get("verdict"),
        get("spec"),
        get("image"),
        get("since"),
        limit,
    )
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let rows = tokio::task::spawn_blocking(move || AuditLog::open(&db)?.history(&filter))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(Json(json!({"object": "list", "data": rows})).into_response())
}
