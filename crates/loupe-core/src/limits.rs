//! Bounds on every size a file controls. A file a user has, or one an attacker gives, cannot make
//! Loupe allocate, loop or wait without bound: each read, decode or render stops at its limit with
//! an error naming the file, the size and the limit's name (`--allow NAME=VALUE` raises it).
//!
//! The limits are process-wide settings: the binary sets them once at start ([`set`]), every
//! reader consults them ([`get`]). Defaults sit well above what any published checkpoint needs
//! (docs/reliability.md lists each with its reason).

use std::sync::RwLock;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of a JSON config file (`config.json`, `preprocessor_config.json`, index, ...).
    pub json_bytes: u64,
    /// Bytes of `tokenizer.json` (Gemma's is 33 MB, Qwen's 7-12 MB).
    pub tokenizer_bytes: u64,
    /// Bytes of a chat template or an inspection spec.
    pub text_bytes: u64,
    /// Bytes of an image file.
    pub image_bytes: u64,
    /// Pixels of a decoded image (width x height, read from the header before decoding): Pillow's
    /// decompression-bomb limit.
    pub image_pixels: u64,
    /// Pixels an image may be resized to for the model: `max_pixels` of a preprocessor config is
    /// clamped to it (Qwen3-VL's published `longest_edge` is 16777216 = 4096²).
    pub model_pixels: u64,
    /// Steps of chat-template rendering (minijinja fuel: about one per instruction executed).
    pub template_steps: u64,
    /// Bytes of a rendered chat template.
    pub template_bytes: u64,
    /// GGUF: metadata entries, tensors, and items of one metadata array.
    pub gguf_entries: u64,
    /// GGUF: bytes of one metadata string or tensor name.
    pub gguf_string_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        const MIB: u64 = 1 << 20;
        Limits {
            json_bytes: 16 * MIB,
            tokenizer_bytes: 128 * MIB,
            text_bytes: 4 * MIB,
            image_bytes: 256 * MIB,
            image_pixels: 178_956_970,
            model_pixels: 16_777_216,
            template_steps: 20_000_000,
            template_bytes: 16 * MIB,
            gguf_entries: 16_000_000,
            gguf_string_bytes: 16 * MIB,
        }
    }
}

/// Each limit by its flag name, with what it bounds (for `--allow`, errors and docs).
pub const NAMES: &[(&str, &str)] = &[
    ("json-bytes", "bytes of a JSON config file"),
    ("tokenizer-bytes", "bytes of tokenizer.json"),
    ("text-bytes", "bytes of a chat template or spec file"),
    ("image-bytes", "bytes of an image file"),
    ("image-pixels", "pixels of a decoded image"),
    (
        "model-pixels",
        "pixels an image is resized to for the model",
    ),
    ("template-steps", "steps of chat-template rendering"),
    ("template-bytes", "bytes of a rendered chat template"),
    (
        "gguf-entries",
        "GGUF metadata entries, tensors and array items",
    ),
    ("gguf-string-bytes", "bytes of one GGUF string"),
];

impl Limits {
    fn slot(&mut self, name: &str) -> Option<&mut u64> {
        Some(match name {
            "json-bytes" => &mut self.json_bytes,
            "tokenizer-bytes" => &mut self.tokenizer_bytes,
            "text-bytes" => &mut self.text_bytes,
            "image-bytes" => &mut self.image_bytes,
            "image-pixels" => &mut self.image_pixels,
            "model-pixels" => &mut self.model_pixels,
            "template-steps" => &mut self.template_steps,
            "template-bytes" => &mut self.template_bytes,
            "gguf-entries" => &mut self.gguf_entries,
            "gguf-string-bytes" => &mut self.gguf_string_bytes,
            _ => return None,
        })
    }

    /// The value of a limit by its flag name.
    pub fn value(&self, name: &str) -> Option<u64> {
        let mut copy = *self;
        copy.slot(name).map(|v| *v)
    }

    /// Applies one `NAME=VALUE` setting (`--allow image-pixels=400000000`).
    pub fn apply(&mut self, setting: &str) -> Result<()> {
        let known = || NAMES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
        let (name, value) = setting.split_once('=').ok_or_else(|| {
            Error::InvalidInput(format!(
                "--allow `{setting}` is not NAME=VALUE (names: {})",
                known()
            ))
        })?;
        let value: u64 = value
            .trim()
            .parse()
            .ok()
            .filter(|v| *v > 0)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "--allow {name}: `{value}` is not a positive whole number"
                ))
            })?;
        let slot = self.slot(name.trim()).ok_or_else(|| {
            Error::InvalidInput(format!(
                "--allow: unknown limit `{name}` (names: {})",
                known()
            ))
        })?;
        *slot = value;
        Ok(())
    }
}

static LIMITS: RwLock<Option<Limits>> = RwLock::new(None);

/// The limits in force: those [`set`] last, else the defaults.
pub fn get() -> Limits {
    LIMITS
        .read()
        .map(|l| l.unwrap_or_default())
        .unwrap_or_default()
}

/// Sets the limits for the whole process.
pub fn set(limits: Limits) {
    if let Ok(mut l) = LIMITS.write() {
        *l = Some(limits);
    }
}

/// Reads a whole file of at most `max` bytes (the limit `name`), checking the size before reading.
pub fn read_file(path: &std::path::Path, max: u64, name: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > max {
        return Err(too_large(path, len, max, name));
    }
    // The size may change under us (a file still being written): read at most one byte past the
    // limit, so a growing file is caught too.
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max {
        return Err(too_large(path, bytes.len() as u64, max, name));
    }
    Ok(bytes)
}

fn too_large(path: &std::path::Path, len: u64, max: u64, name: &str) -> Error {
    Error::Limit {
        what: path.display().to_string(),
        found: format!("{len} bytes"),
        limit: max,
        name: name.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_limit_can_be_set_and_read() {
        let mut l = Limits::default();
        for (i, (name, _)) in NAMES.iter().enumerate() {
            l.apply(&format!("{name}={}", 1000 + i)).unwrap();
            assert_eq!(l.value(name), Some(1000 + i as u64), "{name}");
        }
        // Every field is reachable by a name: no two names share a slot.
        let defaults = Limits::default();
        assert!(NAMES.iter().all(|(n, _)| l.value(n) != defaults.value(n)));
    }

    #[test]
    fn bad_settings_name_the_problem() {
        let mut l = Limits::default();
        let e = l.apply("image-pixels").unwrap_err().to_string();
        assert!(e.contains("NAME=VALUE"), "{e}");
        let e = l.apply("pixels=5").unwrap_err().to_string();
        assert!(e.contains("unknown limit `pixels`"), "{e}");
        let e = l.apply("image-pixels=0").unwrap_err().to_string();
        assert!(e.contains("positive"), "{e}");
        assert_eq!(l, Limits::default());
    }

    #[test]
    fn read_file_refuses_past_the_limit() {
        let dir = std::env::temp_dir().join(format!("loupe-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("ten.bin");
        std::fs::write(&p, [7u8; 10]).unwrap();
        assert_eq!(read_file(&p, 10, "json-bytes").unwrap().len(), 10);
        let e = read_file(&p, 9, "json-bytes").unwrap_err().to_string();
        assert!(
            e.contains("10 bytes") && e.contains("--allow json-bytes"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
