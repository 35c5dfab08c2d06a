//! Images named by a request: `data:` URIs (base64), `file://` paths under `--allow-path` folders
//! (no `..`, no symlink out of them), and nothing from the network (Loupe never reaches it).

use std::path::{Component, Path, PathBuf};

use base64::Engine as _;
use loupe_core::image::ImageInput;

use crate::error::{ApiError, ApiResult};

/// Decodes base64 (standard alphabet, padding optional, whitespace allowed as in wrapped text).
pub fn base64_bytes(text: &str, param: &str) -> ApiResult<Vec<u8>> {
    let clean: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(clean.trim_end_matches('='))
        .or_else(|_| {
            base64::engine::general_purpose::STANDARD_NO_PAD.decode(clean.trim_end_matches('='))
        })
        .map_err(|e| ApiError::field(param, format!("not valid base64: {e}")))
}

/// The bytes an `image_url` names.
pub fn fetch(url: &str, allowed: &[PathBuf], param: &str) -> ApiResult<Vec<u8>> {
    let max = loupe_core::limits::get().image_bytes;
    if let Some(rest) = url.strip_prefix("data:") {
        let Some((meta, data)) = rest.split_once(',') else {
            return Err(ApiError::field(
                param,
                "a data: URI needs a comma before its data",
            ));
        };
        if !meta.ends_with(";base64") {
            return Err(ApiError::field(
                param,
                "only base64 data: URIs are read (data:image/png;base64,...)",
            ));
        }
        // Base64 is 4/3 of the bytes: refuse before decoding.
        if data.len() as u64 / 4 * 3 > max {
            return Err(ApiError::too_large(format!(
                "{param}: the image is over the limit of {max} bytes (image-bytes)"
            )));
        }
        return base64_bytes(data, param);
    }
    if let Some(path) = url.strip_prefix("file://") {
        let path = Path::new(path);
        let resolved = allowed_path(path, allowed, param)?;
        return loupe_core::limits::read_file(&resolved, max, "image-bytes")
            .map_err(|e| ApiError::field(param, e.to_string()));
    }
    let scheme = url.split(':').next().unwrap_or("");
    if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") {
        return Err(ApiError::field(
            param,
            "http(s) image URLs are not fetched: Loupe never reaches the network; send the image \
             as a base64 data: URI",
        ));
    }
    Err(ApiError::field(
        param,
        "an image_url must be a data: URI (base64) or a file:// path under --allow-path",
    ))
}

/// `path` resolved (symlinks followed) and inside one of the `--allow-path` folders.
fn allowed_path(path: &Path, allowed: &[PathBuf], param: &str) -> ApiResult<PathBuf> {
    if allowed.is_empty() {
        return Err(ApiError::field(
            param,
            "file:// images are refused: the server was started without --allow-path",
        ));
    }
    if !path.is_absolute() || path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(ApiError::field(
            param,
            "a file:// path must be absolute and must not contain `..`",
        ));
    }
    let real = path
        .canonicalize()
        .map_err(|e| ApiError::field(param, format!("{}: {e}", path.display())))?;
    if allowed.iter().any(|dir| real.starts_with(dir)) {
        Ok(real)
    } else {
        Err(ApiError::field(
            param,
            format!("{} is outside the --allow-path folders", path.display()),
        ))
    }
}

/// Decodes image bytes (bounded by the `image-pixels` limit, checked in the header first).
pub fn decode(bytes: &[u8], name: &str, param: &str) -> ApiResult<ImageInput> {
    let image = loupe_core::image::decode(bytes).map_err(|m| {
        if m.contains("--allow") {
            ApiError::too_large(format!("{param}: {m}"))
        } else {
            ApiError::field(param, format!("not an image Loupe reads: {m}"))
        }
    })?;
    Ok(ImageInput {
        source: PathBuf::from(name),
        image,
    })
}
