//! A bounded walk over a GGUF header before it is parsed: every count, string and array is checked
//! against the file's remaining bytes and the `gguf-*` limits, the alignment against zero, every
//! tensor's dims, type and byte range against the file (inside it, no two overlapping), and no key
//! or tensor name given twice. The parser that follows (candle's) then never sees a header that
//! could make it allocate without bound, divide by zero or overflow.

use std::collections::HashSet;

use candle_core::quantized::GgmlDType;

use crate::limits::Limits;

/// A problem with the header, as one sentence (the caller names the file).
pub type Problem = String;

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// GGUF v1 writes lengths and counts in 32 bits, v2 and v3 in 64.
    wide: bool,
    limits: Limits,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], Problem> {
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err(format!(
                "{what} needs {n} bytes at offset {}, the file has {left} left (truncated?)",
                self.pos
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> Result<u32, Problem> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, Problem> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn length(&mut self, what: &str) -> Result<u64, Problem> {
        if self.wide {
            self.u64(what)
        } else {
            self.u32(what).map(u64::from)
        }
    }

    fn count(&mut self, what: &str) -> Result<u64, Problem> {
        let n = self.length(what)?;
        if n > self.limits.gguf_entries {
            return Err(format!(
                "{what} is {n}, over the limit of {} (raise it with --allow gguf-entries=N)",
                self.limits.gguf_entries
            ));
        }
        Ok(n)
    }

    fn string(&mut self, what: &str) -> Result<&'a [u8], Problem> {
        let n = self.length(what)?;
        if n > self.limits.gguf_string_bytes {
            return Err(format!(
                "{what} is {n} bytes long, over the limit of {} (raise it with --allow gguf-string-bytes=N)",
                self.limits.gguf_string_bytes
            ));
        }
        self.take(n, what)
    }

    /// Skips one value of `kind`, returning it when it is a small unsigned integer (for the
    /// alignment).
    fn value(&mut self, kind: u32, key: &str, depth: usize) -> Result<Option<u64>, Problem> {
        let fixed = |n: u64| -> Option<u64> { Some(n) };
        let size = match kind {
            0 | 1 | 7 => fixed(1),
            2 | 3 => fixed(2),
            4..=6 => fixed(4),
            10..=12 => fixed(8),
            8 | 9 => None,
            other => return Err(format!("metadata `{key}` has unknown value type {other}")),
        };
        if let Some(n) = size {
            let b = self.take(n, &format!("metadata `{key}`"))?;
            // Integers as candle reads them for `general.alignment`: unsigned, or signed and not
            // negative (a signed 0 once reached candle's division).
            return Ok(match (kind, b) {
                (0, [x]) => Some(u64::from(*x)),
                (1, [x]) => u64::try_from(*x as i8).ok(),
                (2, [a, b]) => Some(u64::from(u16::from_le_bytes([*a, *b]))),
                (3, [a, b]) => u64::try_from(i16::from_le_bytes([*a, *b])).ok(),
                (4, [a, b, c, d]) => Some(u64::from(u32::from_le_bytes([*a, *b, *c, *d]))),
                (5, [a, b, c, d]) => u64::try_from(i32::from_le_bytes([*a, *b, *c, *d])).ok(),
                (7, [x]) if *x > 1 => {
                    return Err(format!("metadata `{key}`: bool value {x} is not 0 or 1"))
                }
                _ => None,
            });
        }
        if kind == 8 {
            self.string(&format!("metadata `{key}`"))?;
            return Ok(None);
        }
        if depth >= 8 {
            return Err(format!("metadata `{key}`: arrays nested deeper than 8"));
        }
        let item = self.u32(&format!("metadata `{key}` item type"))?;
        let n = self.count(&format!("metadata `{key}` array length"))?;
        // Each item takes at least a byte: a count the file cannot hold is refused before the walk.
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err(format!(
                "metadata `{key}`: an array of {n} items cannot fit in the {left} bytes left"
            ));
        }
        for _ in 0..n {
            self.value(item, key, depth + 1)?;
        }
        Ok(None)
    }
}

fn dtype(code: u32) -> Option<GgmlDType> {
    Some(match code {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// GGML type codes that llama.cpp writes and Loupe does not read, by name (for the error).
fn unsupported_name(code: u32) -> Option<&'static str> {
    Some(match code {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

/// Checks a whole GGUF file's header (`bytes` is the file, mapped).
pub fn check(bytes: &[u8], limits: Limits) -> Result<(), Problem> {
    let mut r = Reader {
        bytes,
        pos: 0,
        wide: true,
        limits,
    };
    let magic = r.take(4, "the magic number")?;
    if magic != b"GGUF" {
        return Err(format!(
            "does not start with the GGUF magic number (found {magic:02x?})"
        ));
    }
    let version = r.u32("the version")?;
    match version {
        1 => r.wide = false,
        2 | 3 => {}
        v => return Err(format!("GGUF version {v} is not 1, 2 or 3")),
    }
    let tensors = r.count("the tensor count")?;
    let entries = r.count("the metadata entry count")?;
    let mut alignment = 32u64;
    let mut keys = HashSet::new();
    for _ in 0..entries {
        let key = r.string("a metadata key")?;
        let key = gguf_text(key);
        let kind = r.u32(&format!("metadata `{key}` type"))?;
        let value = r.value(kind, &key, 0)?;
        if key == "general.alignment" {
            alignment = value
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| "general.alignment must be a power of two".to_string())?;
        }
        if !keys.insert(key.clone()) {
            return Err(format!("metadata key `{key}` is given twice"));
        }
    }
    let mut names = HashSet::new();
    let mut ranges = Vec::with_capacity(tensors.min(1 << 16) as usize);
    for _ in 0..tensors {
        let name = gguf_text(r.string("a tensor name")?);
        let n_dims = r.u32(&format!("tensor `{name}` dims"))?;
        if n_dims == 0 || n_dims > 4 {
            return Err(format!(
                "tensor `{name}` has {n_dims} dims (GGUF allows 1 to 4)"
            ));
        }
        let mut elems = 1u64;
        for _ in 0..n_dims {
            let d = r.length(&format!("tensor `{name}` dims"))?;
            elems = elems
                .checked_mul(d)
                .filter(|&e| e <= 1 << 40)
                .ok_or_else(|| format!("tensor `{name}` has more than 2^40 elements"))?;
        }
        let code = r.u32(&format!("tensor `{name}` type"))?;
        let Some(dt) = dtype(code) else {
            return Err(match unsupported_name(code) {
                Some(n) => format!("tensor `{name}` is stored as {n}, a type Loupe does not read"),
                None => format!("tensor `{name}` has unknown type code {code}"),
            });
        };
        let block = dt.block_size() as u64;
        if !elems.is_multiple_of(block) {
            return Err(format!(
                "tensor `{name}` has {elems} elements, not a whole number of {block}-element blocks"
            ));
        }
        let len = elems / block * dt.type_size() as u64;
        let offset = r.u64(&format!("tensor `{name}` offset"))?;
        if !offset.is_multiple_of(alignment) {
            return Err(format!(
                "tensor `{name}` starts at offset {offset}, not a multiple of the alignment {alignment}"
            ));
        }
        if !names.insert(name.clone()) {
            return Err(format!("tensor `{name}` is given twice"));
        }
        ranges.push((offset, len, name));
    }
    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
    let data_len = (bytes.len() as u64).saturating_sub(data_start);
    ranges.sort();
    let mut end = 0u64;
    let mut prev = "";
    for (offset, len, name) in &ranges {
        let stop = offset.saturating_add(*len);
        if stop > data_len {
            return Err(format!(
                "tensor `{name}` needs bytes {offset}..{stop} of the tensor data, the file has {data_len} (truncated?)"
            ));
        }
        if *offset < end {
            return Err(format!("tensors `{prev}` and `{name}` overlap in the file"));
        }
        end = stop;
        prev = name;
    }
    Ok(())
}

/// A GGUF string as candle reads it: trailing NUL bytes dropped (writers add them), invalid UTF-8
/// replaced. Keys are compared in this form, so `general.alignment\0` is the alignment.
fn gguf_text(bytes: &[u8]) -> String {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v3 header with the given metadata (already encoded) and tensors, then `data` bytes.
    fn file(
        meta: &[(&str, u32, Vec<u8>)],
        tensors: &[(&str, &[u64], u32, u64)],
        data: usize,
    ) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((meta.len() as u64).to_le_bytes());
        let s = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        for (k, t, v) in meta {
            s(&mut b, k);
            b.extend(t.to_le_bytes());
            b.extend(v);
        }
        for (name, dims, code, offset) in tensors {
            s(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            for d in *dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(code.to_le_bytes());
            b.extend(offset.to_le_bytes());
        }
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
        b.extend(vec![0u8; data]);
        b
    }

    fn check_default(b: &[u8]) -> Result<(), Problem> {
        check(b, Limits::default())
    }

    #[test]
    fn a_well_formed_header_passes() {
        let arch = {
            let mut v = 5u64.to_le_bytes().to_vec();
            v.extend(b"qwen2");
            v
        };
        let b = file(
            &[
                ("general.architecture", 8, arch),
                ("general.alignment", 4, 32u32.to_le_bytes().to_vec()),
            ],
            &[("a", &[8, 4], 0, 0), ("b", &[32], 8, 128)],
            128 + 34,
        );
        check_default(&b).unwrap();
        // Every shorter prefix of it is refused, none panics.
        for n in 0..b.len() {
            assert!(check_default(&b[..n]).is_err(), "prefix {n}");
        }
    }

    #[test]
    fn hostile_headers_are_refused_with_the_reason() {
        let huge_string = {
            let mut v = u64::MAX.to_le_bytes().to_vec();
            v.extend(b"x");
            v
        };
        let array_of = |n: u64| {
            let mut v = 0u32.to_le_bytes().to_vec();
            v.extend(n.to_le_bytes());
            v
        };
        let (huge_array, long_array) = (array_of(1 << 40), array_of(1 << 20));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (file(&[("k", 8, huge_string)], &[], 0), "over the limit"),
            (
                file(
                    &[("general.alignment", 4, 0u32.to_le_bytes().to_vec())],
                    &[],
                    0,
                ),
                "power of two",
            ),
            (file(&[("k", 9, huge_array)], &[], 0), "over the limit"),
            (file(&[("k", 9, long_array)], &[], 0), "cannot fit"),
            (file(&[], &[("t", &[u64::MAX, 4], 0, 0)], 0), "2^40"),
            (file(&[], &[("t", &[16], 0, 0)], 8), "truncated"),
            (
                file(&[], &[("t", &[8], 0, 0), ("u", &[8], 0, 0)], 64),
                "overlap",
            ),
            (
                file(&[], &[("t", &[8], 0, 0), ("t", &[8], 0, 32)], 64),
                "given twice",
            ),
            (file(&[], &[("t", &[8], 23, 0)], 64), "IQ4_XS"),
            (file(&[], &[("t", &[8], 99, 0)], 64), "unknown type code 99"),
            (file(&[], &[("t", &[31], 8, 0)], 64), "blocks"),
            (file(&[], &[("t", &[1, 1, 1, 1, 1], 0, 0)], 64), "dims"),
            (file(&[("k", 7, vec![2])], &[], 0), "bool"),
        ];
        for (b, want) in cases {
            let e = check_default(&b).unwrap_err();
            assert!(e.contains(want), "{e} (wanted `{want}`)");
        }
        // A count of entries the file cannot hold.
        let mut b = file(&[], &[], 0);
        b[16..24].copy_from_slice(&(1u64 << 50).to_le_bytes());
        assert!(check_default(&b).unwrap_err().contains("over the limit"));
    }
}
