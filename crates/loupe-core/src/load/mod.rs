//! Bytes on disk: where a model's files are, its configs, and its weights.

pub mod config;
pub mod gguf;
pub mod gguf_check;
pub mod quantize;
pub mod weights;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{read_json, Error, Result};

/// The files of one Hugging Face checkpoint, found on disk.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    /// `model.safetensors`, or every shard named by `model.safetensors.index.json`.
    pub weights: Vec<PathBuf>,
    pub tokenizer: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    pub chat_template: Option<PathBuf>,
    pub preprocessor_config: Option<PathBuf>,
    pub generation_config: Option<PathBuf>,
    /// A llama.cpp GGUF model: `config` and `tokenizer` name its text file, `weights` the text file
    /// and its vision file if any, and what they hold is read from their metadata.
    pub gguf: Option<GgufFiles>,
}

/// The headers of a llama.cpp GGUF model: the text file, and the vision (`mmproj`) file of a vision
/// model. Read once, when the model is found.
#[derive(Clone)]
pub struct GgufFiles {
    pub text: Arc<gguf::GgufModel>,
    pub vision: Option<Arc<gguf::GgufModel>>,
}

impl std::fmt::Debug for GgufFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFiles")
            .field("text", &self.text.path)
            .field("vision", &self.vision.as_ref().map(|v| &v.path))
            .finish()
    }
}

fn is_gguf(p: &Path) -> bool {
    p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn is_mmproj(p: &Path) -> bool {
    is_gguf(p)
        && p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.to_ascii_lowercase().starts_with("mmproj"))
}

/// The `.gguf` files of a directory, sorted.
fn gguf_files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_gguf(p))
        .collect();
    v.sort();
    Ok(v)
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl ModelFiles {
    /// The image processor's settings: the model's file, a GGUF vision file's metadata, or
    /// transformers' defaults when the model ships none.
    pub fn preprocessor(&self) -> Result<config::PreprocessorConfig> {
        if let Some(v) = self.gguf.as_ref().and_then(|g| g.vision.as_ref()) {
            return config::PreprocessorConfig::from_value(&v.path, &v.preprocessor_json()?);
        }
        match &self.preprocessor_config {
            Some(p) => config::PreprocessorConfig::from_file(p),
            None => Ok(config::PreprocessorConfig::default()),
        }
    }

    /// Finds a model by directory path or by hub id (`org/name`, optionally `@revision`) in the local
    /// Hugging Face cache, or a llama.cpp GGUF model (see [`ModelFiles::find_with`]). Never touches the
    /// network.
    pub fn find(model: &str) -> Result<Self> {
        Self::find_with(model, None)
    }

    /// As [`ModelFiles::find`], with llama.cpp's vision file (`mmproj`) given explicitly. A GGUF
    /// model is a `.gguf` file, or a directory holding one text `.gguf` (and no `config.json`). A
    /// vision model's text file (`qwen2vl`) without `mmproj` takes the one `mmproj*.gguf` beside it.
    pub fn find_with(model: &str, mmproj: Option<&Path>) -> Result<Self> {
        let as_path = Path::new(model);
        if as_path.is_file() && is_gguf(as_path) {
            return Self::from_gguf(as_path, mmproj);
        }
        // A directory, or a hub snapshot, of GGUF files (and no config.json).
        let dir = resolve(model)?;
        if !dir.join("config.json").is_file() {
            let ggufs = gguf_files_in(&dir)?;
            let text: Vec<PathBuf> = ggufs.iter().filter(|p| !is_mmproj(p)).cloned().collect();
            match text.as_slice() {
                [one] => return Self::from_gguf(one, mmproj),
                [] => {}
                many => {
                    return Err(Error::ModelNotFound {
                        model: model.into(),
                        msg: format!(
                            "no config.json, and several GGUF models ({}); name the file",
                            list(many)
                        ),
                    })
                }
            }
        }
        if let Some(m) = mmproj {
            return Err(Error::InvalidInput(format!(
                "--mmproj {} goes with a llama.cpp GGUF model, and {model} is not one",
                m.display()
            )));
        }
        Self::in_dir(&dir)
    }

    fn from_gguf(file: &Path, mmproj: Option<&Path>) -> Result<Self> {
        let text = gguf::GgufModel::open(file)?;
        if text.is_vision() {
            return Err(Error::InvalidInput(format!(
                "{} is a vision file (mmproj); give the model's text GGUF as the model, and this as --mmproj",
                file.display()
            )));
        }
        let dir = file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let vision_path = match mmproj {
            Some(m) => Some(m.to_path_buf()),
            None if text.needs_vision() => {
                let beside: Vec<PathBuf> = gguf_files_in(&dir)?
                    .into_iter()
                    .filter(|p| is_mmproj(p))
                    .collect();
                match beside.as_slice() {
                    [] => None, // config_json says what is missing
                    [one] => Some(one.clone()),
                    many => {
                        return Err(Error::InvalidInput(format!(
                            "{} has several vision files beside it ({}); choose one with --mmproj",
                            file.display(),
                            list(many)
                        )))
                    }
                }
            }
            None => None,
        };
        let vision = match &vision_path {
            Some(p) if !p.is_file() => {
                return Err(Error::ModelNotFound {
                    model: p.display().to_string(),
                    msg: "the vision file (--mmproj) does not exist".into(),
                })
            }
            Some(p) => {
                let v = gguf::GgufModel::open(p)?;
                v.projector()?;
                Some(Arc::new(v))
            }
            None => None,
        };
        let mut weights = vec![file.to_path_buf()];
        weights.extend(vision_path);
        Ok(ModelFiles {
            dir,
            config: file.to_path_buf(),
            weights,
            tokenizer: file.to_path_buf(),
            tokenizer_config: None,
            chat_template: None,
            preprocessor_config: None,
            generation_config: None,
            gguf: Some(GgufFiles {
                text: Arc::new(text),
                vision,
            }),
        })
    }

    /// The tokenizer: from `tokenizer.json` (with the special tokens `tokenizer_config.json` has
    /// it add to each text), or from a lone GGUF's metadata.
    pub fn read_tokenizer(&self) -> Result<crate::tokenize::Tokenizer> {
        use crate::tokenize::{config_specials, Tokenizer};
        match &self.gguf {
            Some(GgufFiles { text: g, .. }) => {
                let t = Tokenizer::from_bytes(g.tokenizer_json()?.as_bytes(), &self.tokenizer)?;
                let (bos, eos) = (g.added_special("bos"), g.added_special("eos"));
                if bos.is_none() && eos.is_none() {
                    return Ok(t);
                }
                t.with_added_specials(bos.as_deref(), eos.as_deref())
            }
            None => {
                let t = Tokenizer::from_file(&self.tokenizer)?;
                let cfg: Option<serde_json::Value> = self
                    .tokenizer_config
                    .as_deref()
                    .map(read_json)
                    .transpose()?;
                match cfg.as_ref().and_then(config_specials) {
                    Some((bos, eos)) => t.with_added_specials(bos.as_deref(), eos.as_deref()),
                    None => Ok(t),
                }
            }
        }
    }

    /// The config and chat template: from the files, or from a lone GGUF's metadata.
    pub fn read_model(&self) -> Result<(config::Qwen2VlConfig, crate::tokenize::ChatTemplate)> {
        if let Some(GgufFiles { text: g, vision }) = &self.gguf {
            let cfg =
                config::Qwen2VlConfig::from_value(&self.config, &g.config_json(vision.as_deref())?)
                    .map_err(|e| match (e, vision) {
                        // A vision file that does not fit the text file: name both.
                        (Error::Config { path, field, msg }, Some(v))
                            if field.starts_with("vision_config") =>
                        {
                            Error::Config {
                                path,
                                field,
                                msg: format!("{msg} (vision file {})", v.path.display()),
                            }
                        }
                        (e, _) => e,
                    })?;
            let mut template = crate::tokenize::ChatTemplate::from_source(
                g.chat_template()
                    .or_else(|| g.published_chat_template())
                    .ok_or_else(|| {
                        Error::config(
                            &self.config,
                            "tokenizer.chat_template",
                            "missing from the GGUF metadata",
                        )
                    })?,
            )?
            .with_special_tokens(g.special_token("bos"), g.special_token("eos"));
            template.text_content = !cfg.has_vision();
            return Ok((cfg, template));
        }
        config::require_supported(&self.config)?;
        let cfg = config::Qwen2VlConfig::from_file(&self.config)?;
        let mut template = crate::tokenize::ChatTemplate::find(
            self.chat_template.as_deref(),
            self.tokenizer_config.as_deref(),
        )?;
        template.text_content = !cfg.has_vision();
        Ok((cfg, template))
    }

    /// The model's tensors, mapped, under the names the model files use, in the checkpoint's layout.
    pub fn open_weights(
        &self,
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> Result<weights::Weights> {
        let mut w = weights::Weights::open(&self.weights, dtype, device, self.sanitize())?;
        if self.gguf.as_ref().is_some_and(|g| g.text.arch == "gemma3") {
            w = w.with_norm_offset(1.0);
        }
        match self.gguf.as_ref().map(|g| g.text.interleaved_rope()) {
            Some(Ok(Some(head_dim))) => w.with_interleaved_rope(head_dim),
            Some(Err(e)) => Err(e),
            _ => Ok(w),
        }
    }

    /// How stored tensor names map to the names the model files use.
    fn sanitize(&self) -> fn(&str) -> String {
        match &self.gguf {
            None => crate::models::qwen2_vl::sanitize,
            Some(g) if g.text.arch == "gemma3" => gguf::hf_name_gemma3,
            Some(g) if g.text.arch == "phi3" => gguf::hf_name_phi3,
            Some(g) => match g.vision.as_ref().map(|v| v.projector()) {
                Some(Ok(gguf::Projector::Qwen25Vl)) => gguf::hf_name_gated_vision,
                _ => gguf::hf_name,
            },
        }
    }

    pub fn in_dir(dir: &Path) -> Result<Self> {
        let file = |name: &str| {
            let p = dir.join(name);
            p.is_file().then_some(p)
        };
        let config = file("config.json").ok_or_else(|| Error::ModelNotFound {
            model: dir.display().to_string(),
            msg: "no config.json in this directory".into(),
        })?;
        let weights = if let Some(index) = file("model.safetensors.index.json") {
            shards_from_index(dir, &index)?
        } else if let Some(single) = file("model.safetensors") {
            vec![single]
        } else if let Some(quantized) = file("model.gguf") {
            // Written by `loupe quantize`.
            vec![quantized]
        } else {
            return Err(Error::ModelNotFound {
                model: dir.display().to_string(),
                msg: "no model.safetensors, model.safetensors.index.json or model.gguf in this directory".into(),
            });
        };
        let tokenizer = file("tokenizer.json").ok_or_else(|| Error::ModelNotFound {
            model: dir.display().to_string(),
            msg: "no tokenizer.json in this directory".into(),
        })?;
        Ok(ModelFiles {
            dir: dir.to_path_buf(),
            config,
            weights,
            tokenizer,
            tokenizer_config: file("tokenizer_config.json"),
            chat_template: file("chat_template.jinja").or_else(|| file("chat_template.json")),
            // transformers 5 saves processor_config.json with the image processor nested in it.
            preprocessor_config: file("preprocessor_config.json")
                .or_else(|| file("processor_config.json")),
            generation_config: file("generation_config.json"),
            gguf: None,
        })
    }
}

fn shards_from_index(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let idx: Index = read_json(index)?;
    let mut files: Vec<String> = idx.weight_map.into_values().collect();
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(Error::config(index, "weight_map", "is empty"));
    }
    files
        .into_iter()
        .map(|f| {
            // A shard is a file beside the index: no absolute path, no `..`, no folder.
            let plain = Path::new(&f)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            if !plain || f.contains('/') || f.contains('\\') {
                return Err(Error::config(
                    index,
                    "weight_map",
                    format!("names shard `{f}`, which is not a file name beside the index"),
                ));
            }
            let p = dir.join(&f);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::config(
                    index,
                    "weight_map",
                    format!("names shard `{f}`, which is missing"),
                ))
            }
        })
        .collect()
}

/// The hub cache folders to search, in transformers' order of precedence.
pub fn hub_cache_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|s| !s.is_empty()) {
        dirs.push(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|s| !s.is_empty()) {
        dirs.push(PathBuf::from(p).join("hub"));
    }
    if let Some(home) = std::env::var_os("HOME").filter(|s| !s.is_empty()) {
        dirs.push(PathBuf::from(home).join(".cache/huggingface/hub"));
    }
    dirs
}

/// A directory as given, or a hub id resolved offline to `<cache>/models--org--name/snapshots/<rev>`.
pub fn resolve(model: &str) -> Result<PathBuf> {
    let as_path = Path::new(model);
    if as_path.is_dir() {
        return Ok(as_path.to_path_buf());
    }
    let (id, revision) = match model.split_once('@') {
        Some((id, rev)) => (id, rev),
        None => (model, "main"),
    };
    let looks_like_id = id.split('/').count() == 2 && !id.starts_with('.') && !id.starts_with('/');
    if !looks_like_id {
        return Err(Error::ModelNotFound {
            model: model.into(),
            msg: "not a directory, and not a hub id of the form org/name".into(),
        });
    }
    let folder = format!("models--{}", id.replace('/', "--"));
    let searched = hub_cache_dirs();
    for cache in &searched {
        let repo = cache.join(&folder);
        if !repo.is_dir() {
            continue;
        }
        // A revision is either a ref name (refs/<rev> holds the commit) or a commit hash.
        let commit = std::fs::read_to_string(repo.join("refs").join(revision))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| revision.to_owned());
        let snapshot = repo.join("snapshots").join(&commit);
        if snapshot.is_dir() {
            return Ok(snapshot);
        }
        return Err(Error::ModelNotFound {
            model: model.into(),
            msg: format!(
                "{} has no snapshot for revision `{revision}`",
                repo.display()
            ),
        });
    }
    let list = searched
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    Err(Error::ModelNotFound {
        model: model.into(),
        msg: format!("not a directory, and not in the Hugging Face cache (searched {list})"),
    })
}
