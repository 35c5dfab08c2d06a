//! `loupe quantize`: a checkpoint's tensors quantized once, by the model's policy, into one GGUF file
//! beside copies of its config, tokenizer and template. Loading it reads each tensor once, already
//! quantized: no re-quantizing and no second copy in memory.
//!
//! The GGUF keeps the checkpoint's own tensor names and shapes (not llama.cpp's), so it is a Loupe
//! model directory; a llama.cpp-compatible export is separate work (docs/quantization.md).
//!
//! The input may also be llama.cpp's own GGUF files (a text model, or a vision pair): their
//! block-quantized matrices keep their blocks as they are, their float tensors (an f16 vision file)
//! are quantized by the policy, and the config, tokenizer, template and image settings read from their
//! metadata are written as files beside `model.gguf`.

use std::path::{Path, PathBuf};

use candle_core::quantized::{ggml_file, gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device};

use super::config::{require_supported, Qwen2VlConfig};
use super::ModelFiles;
use crate::error::{Error, Result};
use crate::models::qwen2_vl;

#[derive(Debug, Clone, serde::Serialize)]
pub struct QuantizeReport {
    pub out: PathBuf,
    pub tensors: usize,
    pub quantized: usize,
    pub bytes: u64,
}

/// Quantizes `model` (with llama.cpp's vision file `mmproj`, if given) to `quant` into the directory
/// `out` (created; must not hold a model already). `progress(done, total)` is called after each tensor.
pub fn quantize_model(
    model: &str,
    mmproj: Option<&Path>,
    quant: GgmlDType,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<QuantizeReport> {
    let files = ModelFiles::find_with(model, mmproj)?;
    let llama_cpp = match &files.gguf {
        Some(g) => Some((g, g.text.config_json(g.vision.as_deref())?)),
        None => None,
    };
    let model_type = match &llama_cpp {
        Some((_, cfg)) => cfg["model_type"].as_str().unwrap_or_default().to_owned(),
        None => require_supported(&files.config)?,
    };
    if llama_cpp.is_none()
        && files
            .weights
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "gguf"))
    {
        return Err(Error::InvalidInput(format!(
            "{} is already quantized (model.gguf)",
            files.dir.display()
        )));
    }
    if out.join("model.gguf").exists() || out.join("config.json").exists() {
        return Err(Error::InvalidInput(format!(
            "{} already holds a model",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;

    // llama.cpp stores one patch kernel per frame; the checkpoint's Conv3D has them on axis 2.
    let patch_kernel = match &llama_cpp {
        Some((_, cfg)) => {
            let v = Qwen2VlConfig::from_value(&files.config, cfg)?.vision;
            Some(vec![
                v.embed_dim,
                v.in_channels,
                v.temporal_patch_size,
                v.patch_size,
                v.patch_size,
            ])
        }
        None => None,
    };
    let w = files.open_weights(DType::F32, &Device::Cpu)?;
    let names = w.names();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    let mut quantized = 0;
    for (i, name) in names.iter().enumerate() {
        let shape = match &patch_kernel {
            Some(s) if name == "visual.patch_embed.proj.weight" => s.clone(),
            _ => w.shape(name).unwrap_or_default(),
        };
        // Already block-quantized (llama.cpp's text file): the blocks are kept as they are.
        if let Some(m) = w.get_quantized(name, &shape)? {
            let t = ggml_file::qtensor_from_ggml(m.dtype(), &m.blocks()?, shape, &Device::Cpu)?;
            quantized += 1;
            tensors.push((name.clone(), t));
            progress(i + 1, names.len());
            continue;
        }
        let mut t = w.get_as(name, &shape, DType::F32)?;
        if shape.len() > 4 {
            // GGUF holds at most 4 dims: store (dim0, rest); the loader restores the shape it asks for.
            t = t.reshape((shape[0], shape[1..].iter().product::<usize>()))?;
        }
        let row = shape.last().copied().unwrap_or(1);
        let format = qwen2_vl::quant_policy(name, quant)
            .filter(|q| shape.len() == 2 && row.is_multiple_of(q.block_size()));
        let q = match format {
            Some(q) => {
                quantized += 1;
                QTensor::quantize(&t, q)?
            }
            None => QTensor::quantize(&t, GgmlDType::F32)?,
        };
        tensors.push((name.clone(), q));
        progress(i + 1, names.len());
    }
    let path = out.join("model.gguf");
    let mut file =
        std::io::BufWriter::new(std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?);
    let quant_name = gguf_file::Value::String(format!("{quant:?}").to_lowercase());
    let arch = gguf_file::Value::String(model_type.clone());
    let metadata = [
        ("general.architecture", &arch),
        ("loupe.quantization", &quant_name),
    ];
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(&mut file, &metadata, &refs)?;
    drop(file);

    if let Some((g, cfg)) = &llama_cpp {
        // What llama.cpp's files hold in their metadata, as the files a checkpoint has.
        let write = |name: &str, text: String| -> Result<()> {
            let dst = out.join(name);
            std::fs::write(&dst, text).map_err(|e| Error::io(&dst, e))
        };
        let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
        write("config.json", pretty(cfg))?;
        write("tokenizer.json", g.text.tokenizer_json()?)?;
        if let Some(t) = g.text.chat_template() {
            write("chat_template.jinja", t)?;
        }
        if let Some(v) = &g.vision {
            write("preprocessor_config.json", pretty(&v.preprocessor_json()?))?;
        }
    } else {
        // Everything but the weights travels as is.
        let others = [
            Some(&files.config),
            Some(&files.tokenizer),
            files.tokenizer_config.as_ref(),
            files.chat_template.as_ref(),
            files.preprocessor_config.as_ref(),
            files.generation_config.as_ref(),
        ];
        for src in others.into_iter().flatten() {
            let dst = out.join(src.file_name().unwrap_or_default());
            std::fs::copy(src, &dst).map_err(|e| Error::io(&dst, e))?;
        }
    }
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    Ok(QuantizeReport {
        out: out.to_path_buf(),
        tensors: tensors.len(),
        quantized,
        bytes,
    })
}
