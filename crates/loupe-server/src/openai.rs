//! `POST /v1/chat/completions` as OpenAI's clients send it: text and `image_url` parts, sampling
//! settings, `stop`, `response_format` (decoded under the constraint), `stream` as server-sent events.

use std::convert::Infallible;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use loupe_core::generate::{
    FinishReason, GenerateParams, Grammar, SamplingParams, SamplingRequest,
};
use loupe_core::image::ImageInput;
use loupe_core::tokenize::{Content, Message};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::error::{ApiError, ApiResult};
use crate::worker::{ChatJob, Event, Job};
use crate::{body_bytes, parse_json, AppState};

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Not OpenAI's, but llama-server's and vLLM's.
    pub top_k: Option<usize>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub response_format: Option<ResponseFormat>,
    #[serde(default)]
    pub logprobs: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    pub schema: Option<Value>,
    pub strict: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<MessageContent>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Deserialize)]
pub struct ImageUrl {
    pub url: String,
}

/// Most stop strings, and the longest, a request may give (OpenAI allows 4).
const MAX_STOPS: usize = 4;
const MAX_STOP_BYTES: usize = 256;

/// A validated request, ready to queue.
struct Prepared {
    job_prompt: loupe_core::generate::Prompt,
    params: GenerateParams,
    stream: bool,
    include_usage: bool,
}

pub async fn chat_completions(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match chat(s, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat(s: AppState, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let arrived = Instant::now();
    let body = body_bytes(body)?;
    let req: ChatRequest = parse_json(&body)?;
    if !s.serves_model(&req.model) {
        return Err(ApiError::not_found(
            "model_not_found",
            format!(
                "model `{}` is not served here (GET /v1/models lists `{}`)",
                req.model, s.model_name
            ),
        ));
    }
    let state = s.clone();
    let (prepared, constraint) = tokio::task::spawn_blocking(move || {
        let p = prepare(&state, req)?;
        let c = p
            .params
            .grammar
            .as_ref()
            .map(|g| state.engine.constraint(g))
            .transpose()
            .map_err(|e| ApiError::field("response_format", e.to_string()))?;
        Ok::<_, ApiError>((p, c))
    })
    .await
    .map_err(|e| ApiError::internal(format!("request preparation failed: {e}")))??;

    let (tx, rx) = mpsc::unbounded_channel();
    s.submit(Job::Chat(Box::new(ChatJob {
        prompt: prepared.job_prompt,
        params: prepared.params,
        constraint,
        events: tx,
        arrived,
    })))?;
    let id = format!("chatcmpl-{}", s.next_id());
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if prepared.stream {
        Ok(stream(
            rx,
            id,
            created,
            s.model_name.clone(),
            prepared.include_usage,
        )
        .into_response())
    } else {
        collect(rx, id, created, &s.model_name).await
    }
}

/// Checks every field and builds the prompt (images decoded and preprocessed, the chat template
/// rendered): all the work that can fail on the request, done before it is queued.
fn prepare(s: &AppState, req: ChatRequest) -> ApiResult<Prepared> {
    if let Some(n) = req.n {
        if n != 1 {
            return Err(ApiError::field("n", format!("{n}: only n=1 is supported")));
        }
    }
    if req.logprobs {
        return Err(ApiError::field(
            "logprobs",
            "log probabilities are not returned yet",
        ));
    }
    let (field, asked) = match (req.max_completion_tokens, req.max_tokens) {
        (Some(m), _) => ("max_completion_tokens", Some(m)),
        (None, Some(m)) => ("max_tokens", Some(m)),
        (None, None) => ("max_tokens", None),
    };
    let max_tokens = asked.unwrap_or(s.max_tokens);
    if max_tokens == 0 {
        return Err(ApiError::field(field, "must be at least 1"));
    }
    if max_tokens > s.max_tokens {
        return Err(ApiError::field(
            field,
            format!(
                "{max_tokens} is over this server's limit of {} (loupe serve --max-tokens)",
                s.max_tokens
            ),
        ));
    }
    let stop_strings = match req.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop_strings.len() > MAX_STOPS
        || stop_strings
            .iter()
            .any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(ApiError::field(
            "stop",
            format!("at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_BYTES} bytes"),
        ));
    }
    let seed = match req.seed {
        Some(v) => v as u64,
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    };
    let sampling = SamplingParams::resolve(
        &SamplingRequest {
            temperature: req.temperature,
            top_k: req.top_k,
            top_p: req.top_p,
            min_p: req.min_p,
            repetition_penalty: req.repetition_penalty,
            seed,
        },
        &s.engine.generation_config,
    );
    sampling
        .check(|f| f.to_owned())
        .map_err(ApiError::bad_request)?;
    let grammar = match req.response_format {
        None | Some(ResponseFormat::Text) => None,
        Some(ResponseFormat::JsonObject) => Some(Grammar::JsonSchema(json!({"type": "object"}))),
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            let _ = (&json_schema.name, json_schema.strict);
            let schema = json_schema.schema.ok_or_else(|| {
                ApiError::field("response_format.json_schema.schema", "is required")
            })?;
            Some(Grammar::JsonSchema(schema))
        }
    };
    let (messages, images) = messages(&req.messages, s)?;
    let prompt = s
        .engine
        .prompt_from_messages(&messages, &images, &s.engine.preprocessor)
        .map_err(ApiError::from)?;
    let params = GenerateParams {
        max_tokens,
        sampling,
        stop_strings,
        eos_token_ids: s.engine.eos_token_ids(),
        grammar,
    };
    // A prompt longer than the context is refused here, not after queueing.
    s.engine.fit(&prompt, &params)?;
    Ok(Prepared {
        job_prompt: prompt,
        params,
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// The conversation in the engine's terms, and its images in order.
fn messages(msgs: &[ChatMessage], s: &AppState) -> ApiResult<(Vec<Message>, Vec<ImageInput>)> {
    if msgs.is_empty() {
        return Err(ApiError::field(
            "messages",
            "must hold at least one message",
        ));
    }
    let mut out = Vec::with_capacity(msgs.len());
    let mut images = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::field(
                    format!("messages[{i}].role"),
                    format!("`{other}` is not one of system, developer, user, assistant"),
                ))
            }
        };
        let mut content = Vec::new();
        match &m.content {
            None => {}
            Some(MessageContent::Text(t)) => content.push(Content::Text { text: t.clone() }),
            Some(MessageContent::Parts(parts)) => {
                for (j, p) in parts.iter().enumerate() {
                    match p {
                        Part::Text { text } => content.push(Content::Text { text: text.clone() }),
                        Part::ImageUrl { image_url } => {
                            let param = format!("messages[{i}].content[{j}].image_url");
                            if role != "user" {
                                return Err(ApiError::field(param, "images go in user messages"));
                            }
                            let bytes =
                                crate::images::fetch(&image_url.url, &s.allow_paths, &param)?;
                            images.push(crate::images::decode(
                                &bytes,
                                &format!("image {}", images.len() + 1),
                                &param,
                            )?);
                            content.push(Content::Image);
                        }
                    }
                }
            }
        }
        if content.is_empty() && role != "assistant" {
            return Err(ApiError::field(
                format!("messages[{i}].content"),
                "is empty",
            ));
        }
        out.push(Message {
            role: role.into(),
            content,
        });
    }
    Ok((out, images))
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// Waits for the whole answer. If the client goes away this future is dropped, and with it the
/// receiver: the worker sees the closed channel at the next token.
async fn collect(
    mut rx: mpsc::UnboundedReceiver<Event>,
    id: String,
    created: u64,
    model: &str,
) -> ApiResult<Response> {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Error(e) => return Err(e),
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                return Ok(Json(json!({
                    "id": id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": null,
                        "finish_reason": finish_str(finish_reason),
                    }],
                    "usage": usage(prompt_tokens, completion_tokens),
                }))
                .into_response())
            }
        }
    }
    Err(ApiError::unavailable(
        "the answer ended without finishing (the server is shutting down)",
    ))
}

/// Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.
fn stream(
    rx: mpsc::UnboundedReceiver<Event>,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let chunk = move |delta: Value, finish: Option<&str>, usage_v: Option<Value>| {
        let mut c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        if let Some(u) = usage_v {
            c["choices"] = json!([]);
            c["usage"] = u;
        }
        SseEvent::default().data(c.to_string())
    };
    let first = chunk(json!({"role": "assistant", "content": ""}), None, None);
    let body = UnboundedReceiverStream::new(rx).map(move |ev| match ev {
        Event::Text(t) => vec![chunk(json!({"content": t}), None, None)],
        Event::Error(e) => vec![SseEvent::default().data(e.body().to_string())],
        Event::Done {
            finish_reason,
            prompt_tokens,
            completion_tokens,
        } => {
            let mut v = vec![chunk(json!({}), Some(finish_str(finish_reason)), None)];
            if include_usage {
                v.push(chunk(
                    json!({}),
                    None,
                    Some(usage(prompt_tokens, completion_tokens)),
                ));
            }
            v.push(SseEvent::default().data("[DONE]"));
            v
        }
    });
    let events = stream::once(async move { vec![first] })
        .chain(body)
        .flat_map(|v| stream::iter(v.into_iter().map(Ok)));
    Sse::new(events)
}
