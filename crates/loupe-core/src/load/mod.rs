//! Bytes on disk: where a model's files are, its configs, and its weights.

pub mod config;
pub mod gguf;
pub mod quantize;
pub mod weights;

use std::path::{Path, PathBuf};

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
    /// A lone llama.cpp GGUF file: `config`, `weights` and `tokenizer` all name it, and what they hold
    /// is read from its metadata ([`gguf::GgufModel`]).
    pub gguf: bool,
}

impl ModelFiles {
    /// The image processor's settings, or transformers' defaults when the model ships none.
    pub fn preprocessor(&self) -> Result<config::PreprocessorConfig> {
        match &self.preprocessor_config {
            Some(p) => config::PreprocessorConfig::from_file(p),
            None => Ok(config::PreprocessorConfig::default()),
        }
    }

    /// Finds a model by directory path or by hub id (`org/name`, optionally `@revision`) in the local
    /// Hugging Face cache. Never touches the network.
    pub fn find(model: &str) -> Result<Self> {
        let as_path = Path::new(model);
        if as_path.is_file() && as_path.extension().is_some_and(|e| e == "gguf") {
            let file = as_path.to_path_buf();
            return Ok(ModelFiles {
                dir: as_path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                config: file.clone(),
                weights: vec![file.clone()],
                tokenizer: file,
                tokenizer_config: None,
                chat_template: None,
                preprocessor_config: None,
                generation_config: None,
                gguf: true,
            });
        }
        let dir = resolve(model)?;
        Self::in_dir(&dir)
    }

    /// The config, tokenizer and chat template: from the files, or from a lone GGUF's metadata.
    pub fn read_model(
        &self,
    ) -> Result<(
        config::Qwen2VlConfig,
        crate::tokenize::Tokenizer,
        crate::tokenize::ChatTemplate,
    )> {
        if self.gguf {
            let g = gguf::GgufModel::open(&self.config)?;
            let cfg = config::Qwen2VlConfig::from_value(&self.config, &g.config_json()?)?;
            let tok = crate::tokenize::Tokenizer::from_bytes(
                g.tokenizer_json()?.as_bytes(),
                &self.tokenizer,
            )?;
            let mut template = crate::tokenize::ChatTemplate::from_source(
                g.chat_template().ok_or_else(|| {
                    Error::config(
                        &self.config,
                        "tokenizer.chat_template",
                        "missing from the GGUF metadata",
                    )
                })?,
            )?;
            template.text_content = !cfg.has_vision();
            return Ok((cfg, tok, template));
        }
        config::require_supported(&self.config)?;
        let cfg = config::Qwen2VlConfig::from_file(&self.config)?;
        let mut template = crate::tokenize::ChatTemplate::find(
            self.chat_template.as_deref(),
            self.tokenizer_config.as_deref(),
        )?;
        template.text_content = !cfg.has_vision();
        Ok((
            cfg,
            crate::tokenize::Tokenizer::from_file(&self.tokenizer)?,
            template,
        ))
    }

    /// How stored tensor names map to the names the model files use.
    pub fn sanitize(&self) -> fn(&str) -> String {
        if self.gguf {
            gguf::hf_name
        } else {
            crate::models::qwen2_vl::sanitize
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
            gguf: false,
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
