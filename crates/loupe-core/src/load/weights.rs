//! Safetensors weights, memory-mapped. A tensor's bytes are read from the mapping once, straight into
//! the tensor that the model keeps, and the mapped pages are released right after, so peak memory
//! stays near one copy of the model.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::TensorInfo;

use crate::error::{Error, Result};

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
}

/// Which format (if any) a tensor takes when the user asks for a quantization: the model's policy.
pub type QuantPolicy = fn(&str, GgmlDType) -> Option<GgmlDType>;

/// Every tensor of a checkpoint, by name: safetensors (mapped, across shards), or a GGUF written by
/// `loupe quantize` (its tensors read once, already quantized).
pub struct Weights {
    files: Vec<MappedFile>,
    index: HashMap<String, (usize, TensorInfo)>,
    gguf: HashMap<String, Arc<QTensor>>,
    gguf_path: Option<PathBuf>,
    device: Device,
    dtype: DType,
    quant: Option<GgmlDType>,
    policy: QuantPolicy,
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
        if let [one] = paths {
            if one.extension().is_some_and(|e| e == "gguf") {
                return Self::open_gguf(one, dtype, device, sanitize);
            }
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
            gguf_path: None,
            device: device.clone(),
            dtype,
            quant: None,
            policy: no_policy,
        })
    }

    fn open_gguf(
        path: &Path,
        dtype: DType,
        device: &Device,
        sanitize: fn(&str) -> String,
    ) -> Result<Self> {
        let bad = |e: candle_core::Error| Error::Weights {
            path: path.into(),
            msg: format!(
                "not a valid GGUF file ({}); is it truncated or corrupt?",
                crate::error::first_line(&e)
            ),
        };
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let content = gguf_file::Content::read(&mut file).map_err(bad)?;
        let mut gguf = HashMap::new();
        for name in content.tensor_infos.keys() {
            let t = content.tensor(&mut file, name, device).map_err(bad)?;
            gguf.insert(sanitize(name), Arc::new(t));
        }
        Ok(Weights {
            files: Vec::new(),
            index: HashMap::new(),
            gguf,
            gguf_path: Some(path.into()),
            device: device.clone(),
            dtype,
            quant: None,
            policy: no_policy,
        })
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().chain(self.gguf.keys()).cloned().collect();
        v.sort();
        v
    }

    /// The stored shape of a tensor.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.index
            .get(name)
            .map(|(_, i)| i.shape.clone())
            .or_else(|| self.gguf.get(name).map(|t| t.shape().dims().to_vec()))
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

    /// A tensor stored block-quantized (GGUF), shape-checked; `None` when it is stored as floats.
    pub fn get_quantized(&self, name: &str, shape: &[usize]) -> Result<Option<Arc<QTensor>>> {
        match self.gguf.get(name) {
            Some(t) if is_block_quantized(t.dtype()) => {
                self.check_shape(name, t.shape().dims(), shape)?;
                Ok(Some(t.clone()))
            }
            _ => Ok(None),
        }
    }

    fn check_shape(&self, name: &str, found: &[usize], expected: &[usize]) -> Result<()> {
        if found != expected {
            return Err(Error::TensorShape {
                name: name.into(),
                path: self.where_(),
                expected: expected.to_vec(),
                found: found.to_vec(),
            });
        }
        Ok(())
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name) || self.gguf.contains_key(name)
    }

    fn where_(&self) -> PathBuf {
        if let Some(p) = &self.gguf_path {
            return p.clone();
        }
        match self.files.as_slice() {
            [one] => one.path.clone(),
            _ => self
                .files
                .first()
                .and_then(|f| f.path.parent())
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
            .map(|(_, t)| t.shape().elem_count())
            .sum();
        st + gg
    }

    /// The stored dtype of the largest tensor (what the checkpoint "is").
    pub fn stored_dtype(&self) -> Option<String> {
        if let Some(t) = self.gguf.values().max_by_key(|t| t.shape().elem_count()) {
            return Some(format!("{:?}", t.dtype()).to_lowercase());
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

    /// Loads `name` in an explicit dtype (norms and biases may be kept in f32).
    pub fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        if let Some(t) = self.gguf.get(name) {
            let stored = t.shape().dims();
            // Tensors of more than 4 dims are stored as (dim0, rest) (GGUF's limit).
            let flattened = shape.len() > 4
                && stored.len() == 2
                && stored[0] == shape[0]
                && stored[1] == shape[1..].iter().product::<usize>();
            if !flattened {
                self.check_shape(name, stored, shape)?;
            }
            return Ok(t
                .dequantize(&self.device)?
                .reshape(shape)?
                .to_dtype(dtype)?);
        }
        let (file_idx, info) = self.index.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.into(),
            path: self.where_(),
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
        self.release(file, file.data_start + start, end - start);
        Ok(if src_dtype == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        })
    }

    /// Drops the mapped pages of a tensor we have copied, so they stop counting against memory.
    fn release(&self, file: &MappedFile, offset: usize, len: usize) {
        const PAGE: usize = 4096;
        let first = offset.div_ceil(PAGE) * PAGE;
        let last = (offset + len) / PAGE * PAGE;
        if last > first {
            // SAFETY: the range lies inside a read-only file mapping; dropping its pages only means they
            // are read again from the file if touched, which no slice we still hold does.
            let _ = unsafe {
                file.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    first,
                    last - first,
                )
            };
        }
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
