//! Weights, memory-mapped: safetensors (across shards) and GGUF files.
//!
//! A float tensor's bytes are read from the mapping once, straight into the tensor that the model
//! keeps, and the mapped pages are released right after, so peak memory stays near one copy of the
//! model. A block-quantized matrix of a GGUF file is not copied at all: it stays in the mapping
//! ([`QMatrix`]) and our kernels read its blocks there, so loading a quantized model costs the header
//! and the few float tensors, not a pass over the file.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::quantized::{ggml_file, gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::TensorInfo;

use crate::error::{Error, Result};
use crate::kernels::qmatmul::{Format, QRows};

/// A block-quantized `(rows, cols)` matrix. Its GGML blocks stay where they are: in the memory-mapped
/// GGUF file, or in the tensor made when quantizing at load. Our kernels (`kernels::qmatmul`) and the
/// embedding lookup read them in place; candle's copy is made on first use only where a product has
/// no kernel of ours (another format, many rows of Q6_K, a CPU without our SIMD path), and then the
/// mapped pages are released, so memory still holds one copy.
pub struct QMatrix {
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    /// The file mapping and the byte offset of the blocks in it.
    mapped: Option<(Arc<Mmap>, usize)>,
    /// Where candle's copy goes.
    device: Device,
    candle: OnceLock<QMatMul>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QMatrix")
            .field("dtype", &self.dtype)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("mapped", &self.mapped.is_some())
            .finish()
    }
}

impl QMatrix {
    /// A matrix quantized in memory (at load, or by a test).
    pub fn from_qtensor(t: QTensor) -> Result<Self> {
        let (rows, cols) = t.shape().dims2()?;
        let dtype = t.dtype();
        Ok(QMatrix {
            dtype,
            rows,
            cols,
            mapped: None,
            device: t.device(),
            candle: OnceLock::from(QMatMul::QTensor(Arc::new(t))),
        })
    }

    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn byte_len(&self) -> usize {
        self.rows * self.cols / self.dtype.block_size() * self.dtype.type_size()
    }

    /// The GGML blocks, row-major: in the mapping until candle's copy exists, then in that copy.
    pub fn blocks(&self) -> Result<Cow<'_, [u8]>> {
        match (self.candle.get(), &self.mapped) {
            (Some(QMatMul::QTensor(t)), _) => Ok(t.data()?),
            (_, Some((map, at))) => Ok(Cow::Borrowed(&map[*at..*at + self.byte_len()])),
            _ => Err(candle_core::Error::Msg("quantized matrix without blocks".into()).into()),
        }
    }

    /// Rows `start..start + len`: a view of the same blocks in the file mapping (rows of blocks are
    /// whole), or a copy of those rows' blocks when the matrix lives in memory.
    pub fn row_range(&self, start: usize, len: usize) -> Result<QMatrix> {
        if start + len > self.rows || len == 0 {
            return Err(candle_core::Error::Msg(format!(
                "rows {start}..{} of a matrix of {} rows",
                start + len,
                self.rows
            ))
            .into());
        }
        let row = self.byte_len() / self.rows;
        if let (None, Some((map, at))) = (self.candle.get(), &self.mapped) {
            return Ok(QMatrix {
                rows: len,
                mapped: Some((map.clone(), at + start * row)),
                candle: OnceLock::new(),
                device: self.device.clone(),
                ..*self
            });
        }
        let blocks = self.blocks()?;
        let t = ggml_file::qtensor_from_ggml(
            self.dtype,
            &blocks[start * row..(start + len) * row],
            vec![len, self.cols],
            &self.device,
        )?;
        QMatrix::from_qtensor(t)
    }

    /// The blocks as our kernels read them, when they read this format (and the blocks are aligned).
    pub fn with_rows<T>(&self, f: impl FnOnce(QRows) -> T) -> Result<Option<T>> {
        let Some(format) = Format::of(self.dtype) else {
            return Ok(None);
        };
        let data = self.blocks()?;
        Ok(QRows::new(format, self.rows, self.cols, &data).map(f))
    }

    /// candle's form of the matrix, made from the blocks on first use (the mapped pages are released
    /// once it is made: from then on they are read from candle's copy).
    pub fn candle(&self) -> Result<&QMatMul> {
        if let Some(q) = self.candle.get() {
            return Ok(q);
        }
        let Some((map, at)) = &self.mapped else {
            return Err(candle_core::Error::Msg("quantized matrix without blocks".into()).into());
        };
        let bytes = &map[*at..*at + self.byte_len()];
        let t = ggml_file::qtensor_from_ggml(
            self.dtype,
            bytes,
            vec![self.rows, self.cols],
            &self.device,
        )?;
        let q = self.candle.get_or_init(|| QMatMul::QTensor(Arc::new(t)));
        release(map, *at, self.byte_len());
        Ok(q)
    }

    /// Rows `ids` expanded to f32 `(ids.len(), cols)` (embedding lookup).
    pub fn rows_f32(&self, ids: &Tensor) -> Result<Tensor> {
        let want = ids.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        if let Some(&bad) = want.iter().find(|&&id| id as usize >= self.rows) {
            return Err(candle_core::Error::Msg(format!(
                "token id {bad} is outside the embedding table ({} rows)",
                self.rows
            ))
            .into());
        }
        let cols = self.cols;
        let lookup = |dequantize_row: &dyn Fn(usize, &mut [f32])| {
            let mut out = vec![0f32; want.len() * cols];
            for (&id, row) in want.iter().zip(out.chunks_exact_mut(cols)) {
                dequantize_row(id as usize, row);
            }
            out
        };
        // Only the rows asked for are expanded, in place in the blocks: candle's `embedding`
        // expands the whole table first (640 MiB of f32 for Gemma 3's 262k x 640 Q8_0 table).
        let mut looked_up = self.with_rows(|q| lookup(&|r, out| q.dequantize_row(r, out)))?;
        if looked_up.is_none() {
            if let Some(format) = crate::kernels::q32::Format32::of(self.dtype) {
                let data = self.blocks()?;
                looked_up = crate::kernels::q32::Q32Rows::new(format, self.rows, cols, &data)
                    .map(|q| lookup(&|r, out| q.dequantize_row(r, out)));
            }
        }
        match looked_up {
            Some(out) => Ok(Tensor::from_vec(out, (want.len(), cols), ids.device())?),
            None => Ok(self.candle()?.embedding(ids)?),
        }
    }
}

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
}

/// Which format (if any) a tensor takes when the user asks for a quantization: the model's policy.
pub type QuantPolicy = fn(&str, GgmlDType) -> Option<GgmlDType>;

/// Where a tensor of a GGUF file lies: which file, and where in its mapping.
struct GgufTensor {
    file: usize,
    dtype: GgmlDType,
    shape: Vec<usize>,
    start: usize,
    len: usize,
    /// Rows stored in llama.cpp's interleaved rotary order, for heads of this width
    /// ([`Weights::with_interleaved_rope`]).
    rope_rows: Option<usize>,
    /// Stored with this added to every value ([`Weights::with_norm_offset`]); taken off when read.
    offset: Option<f64>,
}

/// Where row `r` of a projection in the checkpoint's rotary order (each head's first halves, then
/// second halves) is stored in llama.cpp's interleaved order (the pairs side by side) for heads of
/// `head_dim`: llama.cpp's converter permutes Llama's q and k rows this way.
fn interleaved_row(r: usize, head_dim: usize) -> usize {
    let half = head_dim / 2;
    let (head, w) = (r / head_dim, r % head_dim);
    head * head_dim + 2 * (w % half) + w / half
}

/// Every tensor of a checkpoint, by name: safetensors (mapped, across shards), or GGUF files (mapped;
/// their block-quantized matrices are used where they lie): one file, or llama.cpp's pair of a text
/// file and a vision (`mmproj`) file.
///
/// A tensor that the checkpoint keeps whole may be stored in pieces (llama.cpp splits the vision
/// tower's fused `qkv` into q, k and v, and its temporal patch kernel into one kernel per frame): the
/// name mapping gives the pieces the whole tensor's name with a `:0`, `:1`, ... suffix, and they are
/// joined here when the whole tensor is asked for.
pub struct Weights {
    files: Vec<MappedFile>,
    index: HashMap<String, (usize, TensorInfo)>,
    gguf: HashMap<String, GgufTensor>,
    gguf_files: Vec<(PathBuf, Arc<Mmap>)>,
    /// Tensors read whole into memory (a PyTorch `.pth` state dict), and the file they came from.
    memory: Option<(PathBuf, HashMap<String, Tensor>)>,
    device: Device,
    dtype: DType,
    quant: Option<GgmlDType>,
    policy: QuantPolicy,
    /// The names the model asked for, so that [`Weights::unused`] can list what it never read.
    used: std::sync::Mutex<std::collections::HashSet<String>>,
}

fn no_policy(_: &str, _: GgmlDType) -> Option<GgmlDType> {
    None
}

/// True for formats that hold blocks rather than plain floats.
pub fn is_block_quantized(q: GgmlDType) -> bool {
    !matches!(q, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

impl Weights {
    /// Maps the files and reads their headers. `sanitize` turns a stored tensor name into the name the
    /// model asks for (the one place where names are mapped).
    pub fn open(
        paths: &[PathBuf],
        dtype: DType,
        device: &Device,
        sanitize: fn(&str) -> String,
    ) -> Result<Self> {
        if !paths.is_empty()
            && paths
                .iter()
                .all(|p| p.extension().is_some_and(|e| e == "gguf"))
        {
            return Self::open_gguf(paths, dtype, device, sanitize);
        }
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the mapping is read-only; a checkpoint modified while Loupe runs is outside what we
            // can guard against, as for every memory-mapped loader.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let (header_len, metadata) =
                safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| Error::Weights {
                    path: path.clone(),
                    msg: format!("not a valid safetensors file ({e}); is it truncated or corrupt?"),
                })?;
            for (name, info) in metadata.tensors() {
                index.insert(sanitize(&name), (i, info.clone()));
            }
            files.push(MappedFile {
                path: path.clone(),
                mmap,
                data_start: 8 + header_len,
            });
        }
        Ok(Weights {
            files,
            index,
            gguf: HashMap::new(),
            gguf_files: Vec::new(),
            memory: None,
            device: device.clone(),
            dtype,
            quant: None,
            policy: no_policy,
            used: Default::default(),
        })
    }

    fn open_gguf(
        paths: &[PathBuf],
        dtype: DType,
        device: &Device,
        sanitize: fn(&str) -> String,
    ) -> Result<Self> {
        let mut gguf = HashMap::new();
        let mut gguf_files = Vec::with_capacity(paths.len());
        for (file_idx, path) in paths.iter().enumerate() {
            let bad = |e: candle_core::Error| Error::Weights {
                path: path.clone(),
                msg: format!(
                    "not a valid GGUF file ({}); is it truncated or corrupt?",
                    crate::error::first_line(&e)
                ),
            };
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: as for safetensors above: a read-only mapping of a file we do not modify.
            let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?);
            super::gguf_check::check(&map, crate::limits::get()).map_err(|msg| Error::Weights {
                path: path.clone(),
                msg: format!("not a valid GGUF file: {msg}"),
            })?;
            let content =
                gguf_file::Content::read(&mut std::io::Cursor::new(&map[..])).map_err(bad)?;
            for (name, info) in &content.tensor_infos {
                let (dtype, elems) = (info.ggml_dtype, info.shape.elem_count());
                let len = elems / dtype.block_size() * dtype.type_size();
                let start = usize::try_from(content.tensor_data_offset.saturating_add(info.offset))
                    .unwrap_or(usize::MAX);
                if !elems.is_multiple_of(dtype.block_size())
                    || start.saturating_add(len) > map.len()
                {
                    return Err(Error::Weights {
                        path: path.clone(),
                        msg: format!(
                            "tensor `{name}` ({dtype:?}, {:?}) needs {len} bytes at offset {start}, \
                             the file has {}; is it truncated or corrupt?",
                            info.shape.dims(),
                            map.len()
                        ),
                    });
                }
                let tensor = GgufTensor {
                    file: file_idx,
                    dtype,
                    shape: info.shape.dims().to_vec(),
                    start,
                    len,
                    rope_rows: None,
                    offset: None,
                };
                if gguf.insert(sanitize(name), tensor).is_some() {
                    return Err(Error::Weights {
                        path: path.clone(),
                        msg: format!("tensor `{name}` is stored twice (in this file or its pair)"),
                    });
                }
            }
            gguf_files.push((path.clone(), map));
        }
        Ok(Weights {
            files: Vec::new(),
            index: HashMap::new(),
            gguf,
            gguf_files,
            memory: None,
            device: device.clone(),
            dtype,
            quant: None,
            policy: no_policy,
            used: Default::default(),
        })
    }

    /// Reads the q and k projections (weights and biases) of a llama.cpp Llama file back into the
    /// checkpoint's row order: its converter interleaves each head's rows for its rotary layout.
    pub fn with_interleaved_rope(mut self, head_dim: usize) -> Result<Self> {
        for (name, t) in self.gguf.iter_mut() {
            let qk = [".self_attn.q_proj.", ".self_attn.k_proj."]
                .iter()
                .any(|p| name.contains(p));
            if !qk {
                continue;
            }
            if head_dim < 2 || !head_dim.is_multiple_of(2) || !t.shape[0].is_multiple_of(head_dim) {
                return Err(Error::Weights {
                    path: self.gguf_files[t.file].0.clone(),
                    msg: format!(
                        "tensor `{name}` has {} rows, not whole heads of {head_dim}",
                        t.shape[0]
                    ),
                });
            }
            t.rope_rows = Some(head_dim);
        }
        Ok(self)
    }

    /// Reads the RMSNorm weights of a llama.cpp Gemma file back as the checkpoint stores them: its
    /// converter adds 1 to every norm weight (Gemma scales by `1 + w`), and the model adds it itself.
    pub fn with_norm_offset(mut self, offset: f64) -> Self {
        for (name, t) in self.gguf.iter_mut() {
            if name.ends_with("norm.weight") {
                t.offset = Some(offset);
            }
        }
        self
    }

    /// The stored pieces of a tensor kept whole in the checkpoint (`name:0`, `name:1`, ...), in order.
    fn pieces(&self, name: &str) -> Vec<&GgufTensor> {
        (0..)
            .map_while(|k| self.gguf.get(&format!("{name}:{k}")))
            .collect()
    }

    /// How pieces join into `shape`: concatenated along the first axis (same rank), or stacked along
    /// a new axis (one rank less). `None` when they make a different shape.
    fn join_axis(pieces: &[&GgufTensor], shape: &[usize]) -> Option<(usize, bool)> {
        let first = &pieces.first()?.shape;
        if pieces.iter().any(|p| p.shape[1..] != first[1..]) {
            return None;
        }
        if first.len() == shape.len() {
            let rows: usize = pieces.iter().map(|p| p.shape[0]).sum();
            return (rows == shape[0] && first[1..] == shape[1..]).then_some((0, false));
        }
        if first.len() + 1 == shape.len() && pieces.iter().all(|p| p.shape == *first) {
            return (0..shape.len())
                .find(|&a| {
                    shape[a] == pieces.len()
                        && shape[..a] == first[..a]
                        && shape[a + 1..] == first[a..]
                })
                .map(|a| (a, true));
        }
        None
    }

    /// Tensors already in memory, read from `path` (a PyTorch state dict: its pickle format cannot
    /// be mapped), by name.
    pub fn from_tensors(path: &Path, tensors: HashMap<String, Tensor>, dtype: DType) -> Self {
        Weights {
            files: Vec::new(),
            index: HashMap::new(),
            gguf: HashMap::new(),
            gguf_files: Vec::new(),
            memory: Some((path.to_path_buf(), tensors)),
            device: Device::Cpu,
            dtype,
            quant: None,
            policy: no_policy,
            used: Default::default(),
        }
    }

    /// The tensors held in memory ([`Weights::from_tensors`]), if any.
    fn memory_names(&self) -> impl Iterator<Item = &String> {
        self.memory.iter().flat_map(|(_, m)| m.keys())
    }

    /// Every tensor name, sorted (a tensor stored in pieces once, by its whole name).
    pub fn names(&self) -> Vec<String> {
        let whole = |n: &String| match n.rsplit_once(':') {
            Some((w, k)) if k.parse::<usize>().is_ok() => w.to_owned(),
            _ => n.clone(),
        };
        let mut v: Vec<String> = self
            .index
            .keys()
            .cloned()
            .chain(self.gguf.keys().map(whole))
            .chain(self.memory_names().cloned())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The stored shape of a tensor (of a tensor stored in pieces: the pieces concatenated along
    /// their first axis).
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        if let Some((_, i)) = self.index.get(name) {
            return Some(i.shape.clone());
        }
        if let Some(t) = self.gguf.get(name) {
            return Some(t.shape.clone());
        }
        if let Some(t) = self.memory.as_ref().and_then(|(_, m)| m.get(name)) {
            return Some(t.dims().to_vec());
        }
        let pieces = self.pieces(name);
        let mut shape = pieces.first()?.shape.clone();
        shape[0] = pieces.iter().map(|p| p.shape[0]).sum();
        Some(shape)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Quantizes at load the tensors that `policy` names (quantization at load).
    pub fn with_quant(mut self, quant: Option<GgmlDType>, policy: QuantPolicy) -> Self {
        self.quant = quant;
        self.policy = policy;
        self
    }

    pub fn quant(&self) -> Option<GgmlDType> {
        self.quant
    }

    /// The format `name` is quantized to at load, if any: the policy's choice, when the row length
    /// `in_dim` is a multiple of that format's block.
    pub fn quant_for(&self, name: &str, in_dim: usize) -> Option<GgmlDType> {
        self.quant
            .and_then(|q| (self.policy)(name, q))
            .filter(|q| in_dim.is_multiple_of(q.block_size()))
    }

    /// A matrix stored block-quantized (GGUF), shape-checked, left in the file mapping; `None` when
    /// it is stored as floats. A matrix stored in row pieces is joined into one copy of its blocks.
    pub fn get_quantized(&self, name: &str, shape: &[usize]) -> Result<Option<QMatrix>> {
        self.mark_used(name);
        let &[rows, cols] = shape else {
            return Ok(None);
        };
        if let Some(t) = self.gguf.get(name) {
            if !is_block_quantized(t.dtype) {
                return Ok(None);
            }
            self.check_shape(name, &t.shape, shape)?;
            if let Some(hd) = t.rope_rows {
                // Rows of blocks are whole: the matrix in checkpoint order is its rows moved.
                let bytes = &self.gguf_files[t.file].1[t.start..t.start + t.len];
                let row = t.len / rows;
                let mut moved = Vec::with_capacity(t.len);
                for r in 0..rows {
                    let from = interleaved_row(r, hd) * row;
                    moved.extend_from_slice(&bytes[from..from + row]);
                }
                let q =
                    ggml_file::qtensor_from_ggml(t.dtype, &moved, shape.to_vec(), &self.device)?;
                release(&self.gguf_files[t.file].1, t.start, t.len);
                return Ok(Some(QMatrix::from_qtensor(q)?));
            }
            return Ok(Some(QMatrix {
                dtype: t.dtype,
                rows,
                cols,
                mapped: Some((self.gguf_files[t.file].1.clone(), t.start)),
                device: self.device.clone(),
                candle: OnceLock::new(),
            }));
        }
        let pieces = self.pieces(name);
        let Some(first) = pieces.first() else {
            return Ok(None);
        };
        if !is_block_quantized(first.dtype) || pieces.iter().any(|p| p.dtype != first.dtype) {
            return Ok(None);
        }
        if Self::join_axis(&pieces, shape) != Some((0, false)) {
            return Err(self.pieces_mismatch(name, &pieces, shape));
        }
        // Rows of blocks are contiguous: the joined matrix is the pieces' bytes one after another.
        let mut bytes = Vec::with_capacity(pieces.iter().map(|p| p.len).sum());
        for p in &pieces {
            bytes.extend_from_slice(&self.gguf_files[p.file].1[p.start..p.start + p.len]);
        }
        let t = ggml_file::qtensor_from_ggml(first.dtype, &bytes, shape.to_vec(), &self.device)?;
        Ok(Some(QMatrix::from_qtensor(t)?))
    }

    fn pieces_mismatch(&self, name: &str, pieces: &[&GgufTensor], shape: &[usize]) -> Error {
        let found = pieces
            .iter()
            .map(|p| format!("{:?}", p.shape))
            .collect::<Vec<_>>()
            .join(" + ");
        Error::Weights {
            path: self.gguf_files[pieces[0].file].0.clone(),
            msg: format!(
                "tensor `{name}` is stored in {} pieces ({found}) that do not make its shape {shape:?}",
                pieces.len()
            ),
        }
    }

    fn check_shape(&self, name: &str, found: &[usize], expected: &[usize]) -> Result<()> {
        if found != expected {
            return Err(Error::TensorShape {
                name: name.into(),
                path: self.where_(name),
                expected: expected.to_vec(),
                found: found.to_vec(),
            });
        }
        Ok(())
    }

    fn mark_used(&self, name: &str) {
        if let Ok(mut used) = self.used.lock() {
            used.insert(name.to_owned());
        }
    }

    /// The stored tensors the model never asked for (sanitized names, sorted); pieces of one
    /// tensor (`name:0`, `name:1`) count as that tensor.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().map(|u| u.clone()).unwrap_or_default();
        let whole = |n: &str| match n.rsplit_once(':') {
            Some((base, k)) if k.bytes().all(|b| b.is_ascii_digit()) => base.to_owned(),
            _ => n.to_owned(),
        };
        let mut names: Vec<String> = self
            .index
            .keys()
            .map(String::as_str)
            .chain(self.gguf.keys().map(String::as_str))
            .chain(self.memory_names().map(String::as_str))
            .map(whole)
            .filter(|n| !used.contains(n))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
            || self
                .memory
                .as_ref()
                .is_some_and(|(_, m)| m.contains_key(name))
            || self.gguf.contains_key(name)
            || self.gguf.contains_key(&format!("{name}:0"))
    }

    /// The file that holds `name`, or where it was looked for.
    /// The error for a tensor `name` these weights do not have, naming the files.
    pub fn missing(&self, name: &str) -> Error {
        Error::MissingTensor {
            name: name.into(),
            path: self.where_(name),
        }
    }

    fn where_(&self, name: &str) -> PathBuf {
        if let Some(t) = self
            .gguf
            .get(name)
            .or_else(|| self.pieces(name).first().copied())
        {
            return self.gguf_files[t.file].0.clone();
        }
        if let Some((i, _)) = self.index.get(name) {
            return self.files[*i].path.clone();
        }
        if let Some((path, _)) = &self.memory {
            return path.clone();
        }
        let paths: Vec<&Path> = match self.gguf_files.as_slice() {
            [] => self.files.iter().map(|f| f.path.as_path()).collect(),
            g => g.iter().map(|(p, _)| p.as_path()).collect(),
        };
        match paths.as_slice() {
            [one] => one.to_path_buf(),
            _ => paths
                .first()
                .and_then(|p| p.parent())
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        }
    }

    /// Total parameter count of the tensors whose (sanitized) name starts with `prefix`.
    pub fn param_count(&self, prefix: &str) -> usize {
        let st: usize = self
            .index
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, (_, info))| info.shape.iter().product::<usize>())
            .sum();
        let gg: usize = self
            .gguf
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, t)| t.shape.iter().product::<usize>())
            .sum();
        st + gg
    }

    /// The stored dtype of the largest tensor (what the checkpoint "is").
    pub fn stored_dtype(&self) -> Option<String> {
        if let Some(t) = self.gguf.values().max_by_key(|t| t.len) {
            return Some(format!("{:?}", t.dtype).to_lowercase());
        }
        self.index
            .values()
            .max_by_key(|(_, info)| info.shape.iter().product::<usize>())
            .map(|(_, info)| format!("{:?}", info.dtype).to_lowercase())
    }

    /// Loads `name`, checks its shape, converts it to the model dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, self.dtype)
    }

    /// A GGUF tensor as stored (its own shape), expanded to floats (`dtype` when that is f32); its
    /// mapped pages released.
    fn read_gguf(&self, t: &GgufTensor, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let map = &self.gguf_files[t.file].1;
        let bytes = &map[t.start..t.start + t.len];
        let out = match t.dtype {
            // f16 to f32 in one pass from the mapping: no f16 copy in between (a 1.3 GB f16 vision
            // file would otherwise pass through 1.3 GB of fresh pages before its 2.6 GB of f32).
            GgmlDType::F16 if dtype == DType::F32 => {
                let mut out = vec![0f32; bytes.len() / 2];
                widen_f16(bytes, &mut out);
                Tensor::from_vec(out, shape, &self.device)?
            }
            GgmlDType::F32 => Tensor::from_raw_buffer(bytes, DType::F32, shape, &self.device)?,
            GgmlDType::F16 => Tensor::from_raw_buffer(bytes, DType::F16, shape, &self.device)?,
            GgmlDType::BF16 => Tensor::from_raw_buffer(bytes, DType::BF16, shape, &self.device)?,
            q => ggml_file::qtensor_from_ggml(q, bytes, t.shape.clone(), &self.device)?
                .dequantize(&self.device)?
                .reshape(shape)?,
        };
        release(map, t.start, t.len);
        let out = match t.offset {
            Some(offset) => (out.to_dtype(DType::F32)? - offset)?,
            None => out,
        };
        match t.rope_rows {
            Some(hd) => {
                let order: Vec<u32> = (0..t.shape[0])
                    .map(|r| interleaved_row(r, hd) as u32)
                    .collect();
                let order = Tensor::from_vec(order, t.shape[0], &self.device)?;
                Ok(out.index_select(&order, 0)?)
            }
            None => Ok(out),
        }
    }

    /// Loads `name` in an explicit dtype (norms and biases may be kept in f32).
    pub fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.mark_used(name);
        if let Some(t) = self.memory.as_ref().and_then(|(_, m)| m.get(name)) {
            if t.dims() != shape {
                return Err(Error::TensorShape {
                    name: name.into(),
                    path: self.where_(name),
                    expected: shape.to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            return Ok(t.to_dtype(dtype)?);
        }
        if let Some(t) = self.gguf.get(name) {
            // Tensors of more than 4 dims are stored as (dim0, rest) (GGUF's limit).
            let flattened = shape.len() > 4
                && t.shape.len() == 2
                && t.shape[0] == shape[0]
                && t.shape[1] == shape[1..].iter().product::<usize>();
            if !flattened {
                self.check_shape(name, &t.shape, shape)?;
            }
            return Ok(self.read_gguf(t, shape, dtype)?.to_dtype(dtype)?);
        }
        let pieces = self.pieces(name);
        if !pieces.is_empty() {
            let Some((axis, stack)) = Self::join_axis(&pieces, shape) else {
                return Err(self.pieces_mismatch(name, &pieces, shape));
            };
            let parts = pieces
                .iter()
                .map(|p| Ok(self.read_gguf(p, &p.shape, dtype)?.to_dtype(dtype)?))
                .collect::<Result<Vec<_>>>()?;
            let whole = if stack {
                Tensor::stack(&parts, axis)?
            } else {
                Tensor::cat(&parts, axis)?
            };
            return Ok(whole);
        }
        let (file_idx, info) = self.index.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.into(),
            path: self.where_(name),
        })?;
        let file = &self.files[*file_idx];
        if info.shape != shape {
            return Err(Error::TensorShape {
                name: name.into(),
                path: file.path.clone(),
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        let src_dtype = candle_dtype(info.dtype).ok_or_else(|| Error::Weights {
            path: file.path.clone(),
            msg: format!(
                "tensor `{name}` has dtype {:?}, which Loupe does not read",
                info.dtype
            ),
        })?;
        let (start, end) = info.data_offsets;
        let bytes = &file.mmap[file.data_start + start..file.data_start + end];
        let t = Tensor::from_raw_buffer(bytes, src_dtype, shape, &self.device)?;
        release(&file.mmap, file.data_start + start, end - start);
        Ok(if src_dtype == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        })
    }
}

/// Little-endian f16 `bytes` into `out`, split over candle's threads for large tensors: most of the
/// cost is the kernel handing out fresh zeroed pages on first write, which each thread then pays
/// for its own part.
fn widen_f16(bytes: &[u8], out: &mut [f32]) {
    fn widen(bytes: &[u8], out: &mut [f32]) {
        if bytes.as_ptr().align_offset(2) == 0 && cfg!(target_endian = "little") {
            // SAFETY: 2-aligned, in bounds, and every bit pattern is an f16.
            let halves: &[half::f16] =
                unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), out.len()) };
            // half's slice conversion uses F16C where the CPU has it.
            half::slice::HalfFloatSliceExt::convert_to_f32_slice(halves, out);
        } else {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
    }
    const PER_THREAD_MIN: usize = 1 << 20;
    if out.is_empty() {
        return;
    }
    let threads = candle_core::utils::get_num_threads()
        .min(out.len() / PER_THREAD_MIN)
        .max(1);
    let chunk = out.len().div_ceil(threads);
    std::thread::scope(|s| {
        for (o, b) in out.chunks_mut(chunk).zip(bytes.chunks(2 * chunk)) {
            s.spawn(move || widen(b, o));
        }
    });
}

/// Drops the mapped pages of a tensor we have copied, so they stop counting against memory.
fn release(map: &Mmap, offset: usize, len: usize) {
    const PAGE: usize = 4096;
    let first = offset.div_ceil(PAGE) * PAGE;
    let last = (offset + len) / PAGE * PAGE;
    if last > first {
        // SAFETY: the range lies inside a read-only file mapping; dropping its pages only means they
        // are read again from the file if touched.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, last - first)
        };
    }
}

fn candle_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        S::I64 => DType::I64,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_rows_are_llama_cpps_permutation_undone() {
        // Head width 4: llama.cpp stores rows (0, 2, 1, 3) of each head, its two halves paired.
        let order: Vec<usize> = (0..8).map(|r| interleaved_row(r, 4)).collect();
        assert_eq!(order, [0, 2, 1, 3, 4, 6, 5, 7]);
        // A permutation for any even width.
        for hd in [2, 8, 64, 128] {
            let mut seen: Vec<usize> = (0..3 * hd).map(|r| interleaved_row(r, hd)).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..3 * hd).collect::<Vec<_>>());
        }
    }
    use candle_core::Module;

    fn matrix(rows: usize, cols: usize, seed: f32) -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| (i as f32 * 0.618 + seed).sin() * (1.0 + (i % 7) as f32))
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    /// A GGUF file with a Q4_K, a Q6_K, a Q8_0, a Q5_0 and an f32 tensor; returns its path and the
    /// tensors.
    fn write_gguf(name: &str) -> (PathBuf, Vec<(String, QTensor)>) {
        let dir = std::env::temp_dir().join(format!("loupe-weights-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.gguf");
        let tensors: Vec<(String, QTensor)> = [
            ("a.weight", GgmlDType::Q4K, 5, 512),
            ("b.weight", GgmlDType::Q6K, 3, 256),
            ("c.weight", GgmlDType::Q8_0, 4, 64),
            ("d.weight", GgmlDType::Q5_0, 3, 128),
            ("n.weight", GgmlDType::F32, 1, 40),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (n, q, r, c))| {
            let t = QTensor::quantize(&matrix(r, c, i as f32), q).unwrap();
            (n.to_string(), t)
        })
        .collect();
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut f = File::create(&path).unwrap();
        gguf_file::write(&mut f, &[], &refs).unwrap();
        (path, tensors)
    }

    fn open(path: &Path) -> Weights {
        Weights::open(&[path.into()], DType::F32, &Device::Cpu, |s| s.to_string()).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Quantized matrices of a GGUF file are used where they lie: the same blocks as written, the
    /// same embedding rows (read from the blocks, without a copy) and products as candle's in-memory
    /// copy, before and after that copy is
    /// made from the mapping; float tensors are read as written.
    #[test]
    fn gguf_matrices_are_read_in_place() {
        let (path, tensors) = write_gguf("in-place");
        let w = open(&path);
        for (name, t) in &tensors {
            let (rows, cols) = t.shape().dims2().unwrap();
            let Some(q) = w.get_quantized(name, &[rows, cols]).unwrap() else {
                assert_eq!(t.dtype(), GgmlDType::F32, "{name}");
                let got = w.get(name, &[rows, cols]).unwrap();
                assert_eq!(values(&got), values(&t.dequantize(&Device::Cpu).unwrap()));
                continue;
            };
            assert!(q.mapped.is_some() && q.candle.get().is_none(), "{name}");
            assert_eq!(
                q.blocks().unwrap().as_ref(),
                t.data().unwrap().as_ref(),
                "{name}"
            );
            let ids = Tensor::new(&[rows as u32 - 1, 0, 1], &Device::Cpu).unwrap();
            let want_rows = values(
                &t.dequantize(&Device::Cpu)
                    .unwrap()
                    .index_select(&ids, 0)
                    .unwrap(),
            );
            assert_eq!(values(&q.rows_f32(&ids).unwrap()), want_rows, "{name}");
            // Looking rows up expands only those rows: no copy of the whole table is made.
            assert!(
                q.candle.get().is_none(),
                "{name}: the lookup copied the table"
            );
            // A part of the rows (Phi-3's fused projections) is a view of the same blocks.
            let part = q.row_range(1, rows - 1).unwrap();
            assert!(part.mapped.is_some(), "{name}: the part was copied");
            let part_ids = Tensor::arange(0u32, rows as u32 - 1, &Device::Cpu).unwrap();
            let whole = t.dequantize(&Device::Cpu).unwrap();
            assert_eq!(
                values(&part.rows_f32(&part_ids).unwrap()),
                values(&whole.narrow(0, 1, rows - 1).unwrap()),
                "{name}: rows 1.."
            );
            assert!(q.row_range(1, rows).is_err(), "{name}: rows past the end");
            let x = matrix(2, cols, 9.0);
            let copy = ggml_file::qtensor_from_ggml(
                t.dtype(),
                &t.data().unwrap(),
                vec![rows, cols],
                &Device::Cpu,
            );
            let want = values(
                &QMatMul::from_qtensor(copy.unwrap())
                    .unwrap()
                    .forward(&x)
                    .unwrap(),
            );
            let got = values(&q.candle().unwrap().forward(&x).unwrap());
            assert_eq!(got, want, "{name}");
            // Once candle's copy exists (and the mapped pages were released), the same blocks and rows.
            assert_eq!(
                q.blocks().unwrap().as_ref(),
                t.data().unwrap().as_ref(),
                "{name}"
            );
            assert_eq!(values(&q.rows_f32(&ids).unwrap()), want_rows, "{name}");
            let outside = Tensor::new(&[rows as u32], &Device::Cpu).unwrap();
            let err = q.rows_f32(&outside).unwrap_err().to_string();
            assert!(err.contains(&format!("token id {rows}")), "{err}");
        }
        let err = w
            .get_quantized("a.weight", &[5, 256])
            .unwrap_err()
            .to_string();
        assert!(err.contains("a.weight"), "{err}");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    /// A GGUF file cut short names the tensor that does not fit, instead of reading past the end.
    #[test]
    fn a_truncated_gguf_names_the_missing_tensor() {
        let (path, _) = write_gguf("truncated");
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 100).unwrap();
        drop(f);
        let err = Weights::open(std::slice::from_ref(&path), DType::F32, &Device::Cpu, |s| {
            s.to_string()
        })
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("n.weight") && err.contains("truncated"),
            "{err}"
        );
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    /// Two GGUF files, as llama.cpp's text + vision pair: pieces of `w` (Q8_0 rows) and `b` (f32) in
    /// the second file, and two kernels of `k` to stack on a new axis.
    #[test]
    fn pieces_across_two_files_are_joined_into_the_whole_tensor() {
        let dir = std::env::temp_dir().join(format!("loupe-weights-{}-pieces", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let q = |r, c, seed| QTensor::quantize(&matrix(r, c, seed), GgmlDType::Q8_0).unwrap();
        let f = |shape: &[usize], seed| {
            let n: usize = shape.iter().product();
            QTensor::quantize(&matrix(1, n, seed).reshape(shape).unwrap(), GgmlDType::F32).unwrap()
        };
        let first = [("t.weight", q(4, 64, 0.0))];
        let second = [
            ("w.0", q(3, 64, 1.0)),
            ("w.1", q(2, 64, 2.0)),
            ("w.2", q(3, 64, 3.0)),
            ("b.0", f(&[3], 4.0)),
            ("b.1", f(&[5], 5.0)),
            ("k.0", f(&[2, 3, 4], 6.0)),
            ("k.1", f(&[2, 3, 4], 7.0)),
        ];
        let mut paths = Vec::new();
        for (i, tensors) in [&first[..], &second[..]].into_iter().enumerate() {
            let path = dir.join(format!("f{i}.gguf"));
            let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
            gguf_file::write(&mut File::create(&path).unwrap(), &[], &refs).unwrap();
            paths.push(path);
        }
        let w = Weights::open(&paths, DType::F32, &Device::Cpu, |s| {
            match s.split_once('.') {
                Some((n, k)) if k.parse::<usize>().is_ok() => format!("{n}.whole:{k}"),
                _ => s.to_string(),
            }
        })
        .unwrap();
        assert!(w.contains("w.whole") && w.contains("t.weight") && !w.contains("w"));
        assert_eq!(w.names(), ["b.whole", "k.whole", "t.weight", "w.whole"]);
        assert_eq!(w.shape("w.whole"), Some(vec![8, 64]));

        // Quantized rows: one matrix whose blocks are the pieces' blocks in order.
        let m = w.get_quantized("w.whole", &[8, 64]).unwrap().unwrap();
        let want: Vec<u8> = second[..3]
            .iter()
            .flat_map(|(_, t)| t.data().unwrap().into_owned())
            .collect();
        assert_eq!(m.blocks().unwrap().as_ref(), &want[..]);
        assert_eq!(m.dims(), (8, 64));
        let dense = w.get("w.whole", &[8, 64]).unwrap();
        let parts: Vec<Tensor> = second[..3]
            .iter()
            .map(|(_, t)| t.dequantize(&Device::Cpu).unwrap())
            .collect();
        let cat = Tensor::cat(&parts, 0).unwrap();
        assert_eq!(
            dense.to_vec2::<f32>().unwrap(),
            cat.to_vec2::<f32>().unwrap()
        );

        // Floats: concatenated (same rank), or stacked on the axis the asked shape names.
        let b = w.get("b.whole", &[8]).unwrap().to_vec1::<f32>().unwrap();
        let mut want = second[3]
            .1
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        want.extend(
            second[4]
                .1
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
        assert_eq!(b, want);
        assert!(w.get_quantized("b.whole", &[8]).unwrap().is_none());
        let k = w.get("k.whole", &[2, 3, 2, 4]).unwrap();
        for t in 0..2 {
            let kernel = k.narrow(2, t, 1).unwrap().squeeze(2).unwrap();
            let want = second[5 + t].1.dequantize(&Device::Cpu).unwrap();
            assert_eq!(
                kernel.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }

        // Pieces that do not make the asked shape: the error names the tensor, the pieces and the file.
        let err = w.get("k.whole", &[2, 3, 3, 4]).unwrap_err().to_string();
        assert!(
            err.contains("k.whole") && err.contains("2 pieces") && err.contains("f1.gguf"),
            "{err}"
        );
        let err = w
            .get_quantized("w.whole", &[9, 64])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("w.whole") && err.contains("[3, 64] + [2, 64] + [3, 64]"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn f16_widening_equals_half_on_every_split() {
        for n in [0usize, 1, 7, (1 << 20) + 3, (3 << 20) + 1] {
            let want: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 300.0).collect();
            let bytes: Vec<u8> = want
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect();
            let mut got = vec![0f32; n];
            widen_f16(&bytes, &mut got);
            let exact: Vec<f32> = want
                .iter()
                .map(|&x| half::f16::from_f32(x).to_f32())
                .collect();
            assert_eq!(got, exact, "n = {n}");
            // Unaligned bytes take the scalar path to the same values.
            let mut shifted = vec![0u8];
            shifted.extend_from_slice(&bytes);
            let mut got = vec![0f32; n];
            widen_f16(&shifted[1..], &mut got);
            assert_eq!(got, exact, "n = {n}, unaligned");
        }
    }
}
