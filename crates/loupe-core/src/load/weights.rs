//! Safetensors weights, memory-mapped. A tensor's bytes are read from the mapping once, straight into
//! the tensor that the model keeps, and the mapped pages are released right after, so peak memory
//! stays near one copy of the model.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::TensorInfo;

use crate::error::{Error, Result};

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
}

/// Every tensor of a checkpoint, by name, across its shards.
pub struct Weights {
    files: Vec<MappedFile>,
    index: HashMap<String, (usize, TensorInfo)>,
    device: Device,
    dtype: DType,
    quant: Option<GgmlDType>,
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
            device: device.clone(),
            dtype,
            quant: None,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Quantizes the projections a model loads with `Linear::load` (quantization at load).
    pub fn with_quant(mut self, quant: Option<GgmlDType>) -> Self {
        self.quant = quant;
        self
    }

    pub fn quant(&self) -> Option<GgmlDType> {
        self.quant
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn where_(&self) -> PathBuf {
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
        self.index
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, (_, info))| info.shape.iter().product::<usize>())
            .sum()
    }

    /// The stored dtype of the largest tensor (what the checkpoint "is").
    pub fn stored_dtype(&self) -> Option<String> {
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
