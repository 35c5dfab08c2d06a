//! `libloupe`: Loupe for apps written in C, C++, Swift, Kotlin or C#. Load a model, generate an
//! answer to a prompt with images (streamed to a callback that can stop it, cancellable from another
//! thread), open an inspection spec and inspect one image into its record.
//!
//! The header, `include/loupe.h`, is generated from this file by cbindgen (`tools/header.sh`; a test
//! fails when the checked-in header is stale). docs/embedding.md has a whole C program and the
//! Swift and Kotlin wrappers.
//!
//! At the boundary:
//! - every call that can fail returns a `LoupeStatus`; the message of the last failure on the
//!   calling thread is `loupe_last_error()`, and names the file, field or value at fault;
//! - no panic crosses: each call runs under `catch_unwind`, and a bug in Loupe comes back as
//!   `LOUPE_STATUS_ERROR_INTERNAL` with the panic's message;
//! - every pointer is checked for NULL, every string for UTF-8, every image's size against the
//!   limits before it is read;
//! - objects are freed by their own `_free` call; freeing NULL does nothing.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::fmt::Display;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use loupe_core::generate::{GenerateParams, Grammar, SamplingParams, SamplingRequest};
use loupe_core::image::{ImageInput, RgbImage};
use loupe_core::{Engine, LoadOptions};
use loupe_inspect::inspector::ReuseMode;
use loupe_inspect::{Inspector, Spec};

/// What a call did: `LOUPE_STATUS_OK`, or why it failed (then `loupe_last_error()` says more).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoupeStatus {
    Ok = 0,
    /// A NULL pointer, a string that is not UTF-8, an option out of range, a prompt too long.
    ErrorArgument = 1,
    /// The model's files: not found, an unsupported family, malformed weights, tokenizer or
    /// template.
    ErrorModel = 2,
    /// Image bytes that do not decode, pixels that do not fit the size given.
    ErrorImage = 3,
    /// The inspection spec (the message names its file, line and field).
    ErrorSpec = 4,
    /// A size over its limit (an image's bytes or pixels, a file).
    ErrorLimit = 5,
    /// The inspection of this image failed; its record was still written, and its `error` says
    /// why.
    ErrorInspect = 6,
    /// Work inside the engine failed (a tensor operation, a grammar).
    ErrorCompute = 7,
    /// A bug in Loupe (a panic, caught at the boundary): the message says where.
    ErrorInternal = 99,
}

/// Why an answer ended.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoupeFinish {
    /// The model ended it (an end-of-sequence token or a stop string).
    Stop = 0,
    /// It reached `max_tokens` or the model's context.
    Length = 1,
    /// The callback returned false, or `loupe_model_cancel()` was called.
    Cancelled = 2,
}

/// A loaded model. Several threads may generate with one model at once; `loupe_model_free()` it
/// when no call is using it.
pub struct LoupeModel {
    engine: Arc<Engine>,
    /// Raised by `loupe_model_cancel()`: an answer stops when it differs from its value at the
    /// answer's start.
    cancels: AtomicU64,
}

/// An inspection spec opened on a model: inspects one image at a time (one thread at a time). It
/// keeps its model alive: the model may be freed before it.
pub struct LoupeInspector {
    // Declared (so dropped) before the engine it borrows.
    inspector: Inspector<'static>,
    _engine: Arc<Engine>,
}

/// How to load a model; `loupe_load_options_default()` gives the defaults.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LoupeLoadOptions {
    /// Compute dtype: "f32", "bf16" or "f16"; NULL for the checkpoint's.
    pub dtype: *const c_char,
    /// Quantize the projections at load: "q8_0", "q6_k", "q5_k", "q4_k" or "q4_0"; NULL for none.
    pub quant: *const c_char,
    /// llama.cpp's vision file (mmproj) of a GGUF vision model; NULL for the one beside it.
    pub mmproj: *const c_char,
    /// Compute threads; 0 for one per core. Read once: the first model loaded in a process sets
    /// it for the process.
    pub threads: u32,
}

/// An image: encoded bytes (JPEG, PNG, WebP, GIF, BMP, TIFF) when `width` and `height` are 0,
/// else RGB pixels, 3 bytes each, row-major, rows `stride` bytes apart (0: `3 * width`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LoupeImage {
    pub data: *const u8,
    /// The bytes at `data`.
    pub len: usize,
    pub width: u32,
    pub height: u32,
    pub stride: usize,
}

/// How to answer; `loupe_generate_options_default()` gives the defaults.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LoupeGenerateOptions {
    /// Most tokens to generate (at least 1; default 512).
    pub max_tokens: u32,
    /// Sampling temperature: 0 is greedy; below 0 (the default) the checkpoint's
    /// generation_config decides, else greedy.
    pub temperature: f32,
    /// Draw only from the K most likely tokens; 0 (default): the checkpoint's, else all.
    pub top_k: u32,
    /// Draw only from the most likely tokens whose probabilities add up to P, in (0, 1]; 0
    /// (default): the checkpoint's.
    pub top_p: f32,
    /// Drop tokens less likely than P times the most likely one; 0 (default): off.
    pub min_p: f32,
    /// Above 1 makes tokens already seen less likely; 0 (default): the checkpoint's, else off.
    pub repetition_penalty: f32,
    /// Seed for sampling.
    pub seed: u64,
    /// A system prompt, or NULL.
    pub system: *const c_char,
    /// A JSON schema (its text) the answer must follow, or NULL for free text.
    pub json_schema: *const c_char,
    /// `stop_count` strings that end the answer (not included in it), or NULL.
    pub stop: *const *const c_char,
    pub stop_count: usize,
}

/// A whole answer. Its `text` belongs to Loupe: `loupe_answer_clear()` frees it.
#[repr(C)]
#[derive(Debug)]
pub struct LoupeAnswer {
    /// The answer's text (UTF-8), `text_len` bytes and a terminating NUL.
    pub text: *mut c_char,
    pub text_len: usize,
    pub finish: LoupeFinish,
    pub prompt_tokens: u32,
    /// Tokens generated (with the end-of-sequence token, when there was one).
    pub answer_tokens: u32,
    /// Time spent encoding the images, prefilling the prompt, and generating, in milliseconds.
    pub vision_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
}

/// Receives each piece of the answer as it is generated: `len` bytes of UTF-8 at `text`
/// (NUL-terminated; valid during the call only) and the `user_data` given to `loupe_generate()`.
/// Returning false stops the answer (it then ends with `LOUPE_FINISH_CANCELLED`).
pub type LoupeTextCallback =
    Option<unsafe extern "C" fn(text: *const c_char, len: usize, user_data: *mut c_void) -> bool>;

/// A failure on its way to the caller: the status and the message for `loupe_last_error()`.
struct Failure {
    status: LoupeStatus,
    message: String,
}

impl Failure {
    fn new(status: LoupeStatus, message: impl Display) -> Self {
        Failure {
            status,
            message: message.to_string(),
        }
    }

    fn argument(message: impl Display) -> Self {
        Failure::new(LoupeStatus::ErrorArgument, message)
    }
}

impl From<loupe_core::Error> for Failure {
    fn from(e: loupe_core::Error) -> Self {
        use loupe_core::Error as E;
        let status = match &e {
            E::Io { .. }
            | E::Json { .. }
            | E::Config { .. }
            | E::UnsupportedModel { .. }
            | E::ModelNotFound { .. }
            | E::Weights { .. }
            | E::TensorShape { .. }
            | E::MissingTensor { .. }
            | E::Tokenizer { .. }
            | E::Template(_) => LoupeStatus::ErrorModel,
            E::Image { .. } => LoupeStatus::ErrorImage,
            E::InvalidInput(_) => LoupeStatus::ErrorArgument,
            E::Limit { .. } => LoupeStatus::ErrorLimit,
            E::Grammar(_) | E::Tensor(_) => LoupeStatus::ErrorCompute,
        };
        Failure::new(status, e)
    }
}

impl From<loupe_inspect::Error> for Failure {
    fn from(e: loupe_inspect::Error) -> Self {
        match e {
            loupe_inspect::Error::Engine(e) => e.into(),
            loupe_inspect::Error::InvalidInput(m) => Failure::argument(m),
            e => Failure::new(LoupeStatus::ErrorSpec, e),
        }
    }
}

thread_local! {
    /// The message of the last call on this thread (empty after a success).
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // A message never holds NUL bytes of its own; any there would end the C string early.
    let message = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = message);
}

/// Runs one call's body: its result as a status, its failure's message (or a panic's) kept for
/// `loupe_last_error()`.
fn call(body: impl FnOnce() -> Result<(), Failure>) -> LoupeStatus {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            set_last_error("");
            LoupeStatus::Ok
        }
        Ok(Err(f)) => {
            set_last_error(&f.message);
            f.status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            set_last_error(&format!(
                "internal error in Loupe (please report it): {what}"
            ));
            LoupeStatus::ErrorInternal
        }
    }
}

/// The string at `p`, or `None` for NULL; `what` names the argument in the error.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid for `'a`.
unsafe fn opt_str<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, Failure> {
    if p.is_null() {
        return Ok(None);
    }
    CStr::from_ptr(p)
        .to_str()
        .map(Some)
        .map_err(|e| Failure::argument(format!("{what} is not UTF-8: {e}")))
}

/// As [`opt_str`], NULL refused.
unsafe fn req_str<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    opt_str(p, what)?.ok_or_else(|| Failure::argument(format!("{what} is NULL")))
}

/// `&*p`, NULL refused.
unsafe fn req_ref<'a, T>(p: *const T, what: &str) -> Result<&'a T, Failure> {
    p.as_ref()
        .ok_or_else(|| Failure::argument(format!("{what} is NULL")))
}

/// `&mut *p`, NULL refused.
unsafe fn req_mut<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T, Failure> {
    p.as_mut()
        .ok_or_else(|| Failure::argument(format!("{what} is NULL")))
}

/// An image from the caller, decoded (encoded bytes) or copied (pixels); `what` names it in errors.
///
/// # Safety
/// `img.data` is NULL or points to `img.len` readable bytes.
unsafe fn image_arg(img: &LoupeImage, what: &str) -> Result<RgbImage, Failure> {
    if img.data.is_null() {
        return Err(Failure::argument(format!("{what}.data is NULL")));
    }
    let limits = loupe_core::limits::get();
    let bytes = std::slice::from_raw_parts(img.data, img.len);
    if img.width == 0 && img.height == 0 {
        if img.len as u64 > limits.image_bytes {
            return Err(loupe_core::Error::Limit {
                what: format!("{what}'s encoded bytes"),
                found: img.len.to_string(),
                limit: limits.image_bytes,
                name: "image-bytes".into(),
            }
            .into());
        }
        return loupe_core::image::decode(bytes)
            .map_err(|m| Failure::new(LoupeStatus::ErrorImage, format!("{what}: {m}")));
    }
    let (w, h) = (img.width as usize, img.height as usize);
    if w == 0 || h == 0 {
        return Err(Failure::new(
            LoupeStatus::ErrorImage,
            format!(
                "{what} is {}x{} pixels: give both sizes for pixels, neither for encoded bytes",
                img.width, img.height
            ),
        ));
    }
    if img.width as u64 * img.height as u64 > limits.image_pixels {
        return Err(loupe_core::Error::Limit {
            what: format!("{what} ({}x{})", img.width, img.height),
            found: format!("{} pixels", img.width as u64 * img.height as u64),
            limit: limits.image_pixels,
            name: "image-pixels".into(),
        }
        .into());
    }
    let row = 3 * w;
    let stride = if img.stride == 0 { row } else { img.stride };
    if stride < row {
        return Err(Failure::new(
            LoupeStatus::ErrorImage,
            format!("{what}.stride {stride} is under 3 x width ({row})"),
        ));
    }
    // The pixel count is bounded above, so these products cannot overflow.
    let need = stride * (h - 1) + row;
    if img.len < need {
        return Err(Failure::new(
            LoupeStatus::ErrorImage,
            format!(
                "{what} holds {} bytes; {w}x{h} RGB pixels {stride} bytes a row need {need}",
                img.len
            ),
        ));
    }
    let mut data = Vec::with_capacity(row * h);
    for y in 0..h {
        data.extend_from_slice(&bytes[y * stride..y * stride + row]);
    }
    Ok(RgbImage {
        width: w,
        height: h,
        data,
        orientation: 1,
    })
}

/// Loupe's version, as `loupe --version` prints it (a static string).
#[no_mangle]
pub extern "C" fn loupe_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// The message of the last call on this thread that failed, "" when the last call succeeded.
/// Valid until the next call on this thread.
#[no_mangle]
pub extern "C" fn loupe_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The default load options: the checkpoint's dtype, no quantization, the mmproj beside a GGUF,
/// one thread per core.
#[no_mangle]
pub extern "C" fn loupe_load_options_default() -> LoupeLoadOptions {
    LoupeLoadOptions {
        dtype: std::ptr::null(),
        quant: std::ptr::null(),
        mmproj: std::ptr::null(),
        threads: 0,
    }
}

/// Loads a model: a directory in the Hugging Face layout, a hub id in the local Hugging Face
/// cache, or a llama.cpp GGUF file (as `loupe run --model` takes it). `options` may be NULL (the
/// defaults). On success `*out` is the model, else NULL.
///
/// # Safety
/// `model` is a NUL-terminated string; `options` is NULL or valid; `out` is valid for writing.
#[no_mangle]
pub unsafe extern "C" fn loupe_model_load(
    model: *const c_char,
    options: *const LoupeLoadOptions,
    out: *mut *mut LoupeModel,
) -> LoupeStatus {
    call(|| {
        let out = req_mut(out, "out")?;
        *out = std::ptr::null_mut();
        let model = req_str(model, "model")?;
        let defaults = loupe_load_options_default();
        let o = options.as_ref().unwrap_or(&defaults);
        let dtype = opt_str(o.dtype, "options.dtype")?
            .map(loupe_core::engine::parse_dtype)
            .transpose()?;
        let quant = opt_str(o.quant, "options.quant")?
            .map(loupe_core::engine::parse_quant)
            .transpose()?;
        let mmproj = opt_str(o.mmproj, "options.mmproj")?.map(Into::into);
        if o.threads > 0 && std::env::var_os("RAYON_NUM_THREADS").is_none() {
            // Candle's pool and ours read it when they first start.
            std::env::set_var("RAYON_NUM_THREADS", o.threads.to_string());
        }
        let engine = Engine::load(
            model,
            &LoadOptions {
                dtype,
                quant,
                mmproj,
                ..Default::default()
            },
        )?;
        *out = Box::into_raw(Box::new(LoupeModel {
            engine: Arc::new(engine),
            cancels: AtomicU64::new(0),
        }));
        Ok(())
    })
}

/// Frees a model (NULL: nothing). Inspectors opened on it keep what they need.
///
/// # Safety
/// `model` is NULL or from `loupe_model_load()`, not freed before, and no call is using it.
#[no_mangle]
pub unsafe extern "C" fn loupe_model_free(model: *mut LoupeModel) {
    if !model.is_null() {
        drop(Box::from_raw(model));
    }
}

/// Stops every answer running on `model` at its next token (they end with
/// `LOUPE_FINISH_CANCELLED`); answers started afterwards run normally. Safe to call from any
/// thread, during a `loupe_generate()` on another. Image encoding and prompt prefill are not
/// interrupted: the answer stops when they are done, before its first token.
///
/// # Safety
/// `model` is NULL (nothing happens) or a live model.
#[no_mangle]
pub unsafe extern "C" fn loupe_model_cancel(model: *const LoupeModel) {
    if let Some(m) = model.as_ref() {
        m.cancels.fetch_add(1, Ordering::SeqCst);
    }
}

/// The default generation options: at most 512 tokens, the checkpoint's sampling settings, no
/// system prompt, free text.
#[no_mangle]
pub extern "C" fn loupe_generate_options_default() -> LoupeGenerateOptions {
    LoupeGenerateOptions {
        max_tokens: 512,
        temperature: -1.0,
        top_k: 0,
        top_p: 0.0,
        min_p: 0.0,
        repetition_penalty: 0.0,
        seed: 0,
        system: std::ptr::null(),
        json_schema: std::ptr::null(),
        stop: std::ptr::null(),
        stop_count: 0,
    }
}

/// The engine's parameters from the caller's options.
unsafe fn params(engine: &Engine, o: &LoupeGenerateOptions) -> Result<GenerateParams, Failure> {
    if o.max_tokens == 0 {
        return Err(Failure::argument("options.max_tokens must be at least 1"));
    }
    let positive = |v: f32| (v > 0.0).then_some(v as f64);
    let req = SamplingRequest {
        temperature: (o.temperature >= 0.0).then_some(o.temperature as f64),
        top_k: (o.top_k > 0).then_some(o.top_k as usize),
        top_p: positive(o.top_p),
        min_p: positive(o.min_p),
        repetition_penalty: positive(o.repetition_penalty),
        seed: o.seed,
    };
    // NaN passes the comparisons above as "not given"; the check below still sees what is used.
    if o.temperature.is_nan() || o.top_p.is_nan() || o.min_p.is_nan() {
        return Err(Failure::argument("options hold NaN"));
    }
    let sampling = SamplingParams::resolve(&req, &engine.generation_config);
    sampling
        .check(|field| format!("options.{field}"))
        .map_err(Failure::argument)?;
    let grammar = match opt_str(o.json_schema, "options.json_schema")? {
        None => None,
        Some(text) => Some(Grammar::JsonSchema(serde_json::from_str(text).map_err(
            |e| Failure::argument(format!("options.json_schema is not JSON: {e}")),
        )?)),
    };
    let mut stop_strings = Vec::with_capacity(o.stop_count.min(64));
    if o.stop_count > 0 {
        if o.stop.is_null() {
            return Err(Failure::argument(format!(
                "options.stop is NULL with stop_count {}",
                o.stop_count
            )));
        }
        for (i, &p) in std::slice::from_raw_parts(o.stop, o.stop_count)
            .iter()
            .enumerate()
        {
            let s = req_str(p, &format!("options.stop[{i}]"))?;
            if s.is_empty() {
                return Err(Failure::argument(format!("options.stop[{i}] is empty")));
            }
            stop_strings.push(s.to_owned());
        }
    }
    Ok(GenerateParams {
        max_tokens: o.max_tokens as usize,
        sampling,
        stop_strings,
        eos_token_ids: engine.eos_token_ids(),
        grammar,
    })
}

/// Answers `prompt` (UTF-8 text; may be empty when there are images) about `image_count` images
/// (shown before the text, in order) under the model's chat template. Each piece of text goes to
/// `on_text` (may be NULL) as it is generated, with `user_data`; `answer` (may be NULL) receives
/// the whole answer, to be freed with `loupe_answer_clear()`. `options` may be NULL (the defaults).
///
/// # Safety
/// `model` is a live model; `prompt` a NUL-terminated string; `images` NULL or `image_count`
/// valid images; `options` NULL or valid; `answer` NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn loupe_generate(
    model: *const LoupeModel,
    prompt: *const c_char,
    images: *const LoupeImage,
    image_count: usize,
    options: *const LoupeGenerateOptions,
    on_text: LoupeTextCallback,
    user_data: *mut c_void,
    answer: *mut LoupeAnswer,
) -> LoupeStatus {
    if let Some(a) = answer.as_mut() {
        *a = empty_answer();
    }
    call(|| {
        let model = req_ref(model, "model")?;
        let started = model.cancels.load(Ordering::SeqCst);
        let engine = &*model.engine;
        let text = req_str(prompt, "prompt")?;
        if image_count > 0 && images.is_null() {
            return Err(Failure::argument(format!(
                "images is NULL with image_count {image_count}"
            )));
        }
        let inputs = (0..image_count)
            .map(|i| {
                let what = format!("images[{i}]");
                Ok(ImageInput {
                    image: image_arg(&*images.add(i), &what)?,
                    source: what.into(),
                })
            })
            .collect::<Result<Vec<_>, Failure>>()?;
        let defaults = loupe_generate_options_default();
        let o = options.as_ref().unwrap_or(&defaults);
        let system = opt_str(o.system, "options.system")?;
        let params = params(engine, o)?;
        let prompt = engine.prompt(system, text, &inputs, &engine.preprocessor)?;
        let constraint = params
            .grammar
            .as_ref()
            .map(|g| engine.constraint(g))
            .transpose()?;
        let mut seq = engine.sequence(&prompt, &params, constraint, None)?;
        // Each piece with a NUL after it, for callers that read C strings.
        let mut piece_buf = Vec::new();
        let mut emit = |piece: &str| -> bool {
            let Some(cb) = on_text else { return true };
            piece_buf.clear();
            piece_buf.extend_from_slice(piece.as_bytes());
            piece_buf.push(0);
            cb(piece_buf.as_ptr() as *const c_char, piece.len(), user_data)
        };
        let mut cancelled = false;
        while !seq.is_finished() {
            if model.cancels.load(Ordering::SeqCst) != started {
                cancelled = true;
                break;
            }
            let piece = seq.step()?;
            if !piece.is_empty() && !emit(&piece) {
                cancelled = true;
                break;
            }
        }
        // Text held back (a possible stop string, an unfinished character) goes out at the end,
        // unless the caller asked to stop.
        let out = seq.finish(&mut |piece| {
            if !cancelled {
                emit(piece);
            }
        })?;
        if let Some(a) = answer.as_mut() {
            let mut bytes = out.text.into_bytes();
            let text_len = bytes.len();
            bytes.push(0);
            *a = LoupeAnswer {
                text: Box::into_raw(bytes.into_boxed_slice()) as *mut c_char,
                text_len,
                finish: match (cancelled, out.finish_reason) {
                    (true, _) => LoupeFinish::Cancelled,
                    (_, loupe_core::generate::FinishReason::Stop) => LoupeFinish::Stop,
                    (_, loupe_core::generate::FinishReason::Length) => LoupeFinish::Length,
                },
                prompt_tokens: out.prompt_tokens as u32,
                answer_tokens: out.tokens.len() as u32,
                vision_ms: out.timings.vision_ms,
                prefill_ms: out.timings.prefill_ms,
                decode_ms: out.timings.decode_ms,
            };
        }
        Ok(())
    })
}

fn empty_answer() -> LoupeAnswer {
    LoupeAnswer {
        text: std::ptr::null_mut(),
        text_len: 0,
        finish: LoupeFinish::Stop,
        prompt_tokens: 0,
        answer_tokens: 0,
        vision_ms: 0.0,
        prefill_ms: 0.0,
        decode_ms: 0.0,
    }
}

/// Frees an answer's text and zeroes it (NULL, or an answer already cleared: nothing).
///
/// # Safety
/// `answer` is NULL or an answer filled by `loupe_generate()`, its `text` and `text_len` as
/// Loupe wrote them.
#[no_mangle]
pub unsafe extern "C" fn loupe_answer_clear(answer: *mut LoupeAnswer) {
    if let Some(a) = answer.as_mut() {
        if !a.text.is_null() {
            let bytes = std::ptr::slice_from_raw_parts_mut(a.text as *mut u8, a.text_len + 1);
            drop(Box::from_raw(bytes));
        }
        *a = empty_answer();
    }
}

/// Opens an inspection spec (a TOML file, as `loupe inspect --spec` takes it) on `model`: its
/// reference images are read, its answer schema compiled, its anomaly bank loaded, here. The
/// spec's own `model` setting is not read: the inspector uses `model`. On success `*out` is the
/// inspector, else NULL.
///
/// # Safety
/// `model` is a live model; `spec_path` a NUL-terminated string; `out` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn loupe_inspector_open(
    model: *const LoupeModel,
    spec_path: *const c_char,
    out: *mut *mut LoupeInspector,
) -> LoupeStatus {
    call(|| {
        let out = req_mut(out, "out")?;
        *out = std::ptr::null_mut();
        let model = req_ref(model, "model")?;
        let path = req_str(spec_path, "spec_path")?;
        // Whatever goes wrong reading the spec (a missing file too) is the spec's.
        let spec =
            Spec::load(Path::new(path)).map_err(|e| Failure::new(LoupeStatus::ErrorSpec, e))?;
        let engine = Arc::clone(&model.engine);
        // SAFETY: the engine lives in the Arc's allocation, which `_engine` keeps alive (and in
        // place) for as long as the inspector that borrows it: the inspector is dropped first.
        let borrowed: &'static Engine = &*Arc::as_ptr(&engine);
        let inspector = Inspector::new(borrowed, spec, ReuseMode::Prefix)?;
        *out = Box::into_raw(Box::new(LoupeInspector {
            inspector,
            _engine: engine,
        }));
        Ok(())
    })
}

/// Frees an inspector (NULL: nothing).
///
/// # Safety
/// `inspector` is NULL or from `loupe_inspector_open()`, not freed before, and not in use.
#[no_mangle]
pub unsafe extern "C" fn loupe_inspector_free(inspector: *mut LoupeInspector) {
    if !inspector.is_null() {
        drop(Box::from_raw(inspector));
    }
}

/// Inspects one image as `loupe inspect` does, and writes its record (the JSON object of a line of
/// `results.jsonl`: verdict, defects with boxes in the image's pixels, anomaly score, timings) to
/// `*record_json`, to be freed with `loupe_string_free()`. `name` (may be NULL) is what the record
/// calls the image. An image that cannot be inspected returns `LOUPE_STATUS_ERROR_INSPECT` and still
/// writes its record, whose `error` says why; an argument at fault writes NULL.
///
/// # Safety
/// `inspector` is a live inspector used by no other thread; `image` a valid image; `name` NULL or
/// a NUL-terminated string; `record_json` valid for writing.
#[no_mangle]
pub unsafe extern "C" fn loupe_inspect(
    inspector: *mut LoupeInspector,
    image: *const LoupeImage,
    name: *const c_char,
    record_json: *mut *mut c_char,
) -> LoupeStatus {
    call(|| {
        let out = req_mut(record_json, "record_json")?;
        *out = std::ptr::null_mut();
        let inspector = &mut req_mut(inspector, "inspector")?.inspector;
        let image = req_ref(image, "image")?;
        let name = Path::new(opt_str(name, "name")?.unwrap_or("image"));
        let t0 = Instant::now();
        let (record, _) = if image.width == 0 && image.height == 0 {
            if image.data.is_null() {
                return Err(Failure::argument("image.data is NULL"));
            }
            let limit = loupe_core::limits::get().image_bytes;
            if image.len as u64 > limit {
                return Err(loupe_core::Error::Limit {
                    what: "image's encoded bytes".into(),
                    found: image.len.to_string(),
                    limit,
                    name: "image-bytes".into(),
                }
                .into());
            }
            let bytes = std::slice::from_raw_parts(image.data, image.len);
            inspector.inspect_bytes(name, bytes, t0)
        } else {
            let pixels = image_arg(image, "image")?;
            inspector.inspect_pixels(name, pixels, t0)
        };
        let json = serde_json::to_string(&record)
            .map_err(|e| Failure::new(LoupeStatus::ErrorInternal, e))?;
        *out = CString::new(json)
            .map_err(|e| Failure::new(LoupeStatus::ErrorInternal, e))?
            .into_raw();
        match record.error {
            Some(e) => Err(Failure::new(LoupeStatus::ErrorInspect, e)),
            None => Ok(()),
        }
    })
}

/// Frees a string Loupe returned (NULL: nothing).
///
/// # Safety
/// `s` is NULL or a string from Loupe (a record), not freed before.
#[no_mangle]
pub unsafe extern "C" fn loupe_string_free(s: *mut c_char) {
    if !s.is_null() {
        drop(CString::from_raw(s));
    }
}
