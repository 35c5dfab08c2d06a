//! A loaded model with everything around it: tokenizer, chat template, image processor, generation
//! defaults. This is what the CLI and the server hold.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::generate::{
    Constraint, ConstraintFactory, FastForward, GenerateParams, Generation, Grammar, PrefixCache,
    Prompt, Reuse,
};
use crate::image::{self, ImageInput, Preprocessor};
use crate::load::config::{GenerationConfig, Qwen2VlConfig};
use crate::load::ModelFiles;
use crate::models::{gemma3, llama, phi3, qwen2_vl, qwen3_5, VisionLanguageModel};
use crate::tokenize::{ChatTemplate, Message, Tokenizer};

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype; `None` keeps the checkpoint's (f32 when quantizing).
    pub dtype: Option<DType>,
    /// Quantize the projections at load (GGML block formats); see docs/quantization.md.
    pub quant: Option<GgmlDType>,
    pub device: Device,
    /// llama.cpp's vision file (`mmproj`) for a GGUF vision model; by default the one beside it.
    pub mmproj: Option<std::path::PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: None,
            quant: None,
            device: Device::Cpu,
            mmproj: None,
        }
    }
}

/// Parses `q8_0`, `q6_k`, `q5_k`, `q4_k`, `q4_0`.
pub fn parse_quant(s: &str) -> Result<GgmlDType> {
    match s.to_ascii_lowercase().as_str() {
        "q8_0" => Ok(GgmlDType::Q8_0),
        "q6_k" => Ok(GgmlDType::Q6K),
        "q5_k" => Ok(GgmlDType::Q5K),
        "q4_k" => Ok(GgmlDType::Q4K),
        "q4_0" => Ok(GgmlDType::Q4_0),
        other => Err(Error::InvalidInput(format!(
            "--quant `{other}` is not one of q8_0, q6_k, q5_k, q4_k, q4_0"
        ))),
    }
}

/// Parses `f32`, `bf16`, `f16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(Error::InvalidInput(format!(
            "--dtype `{other}` is not one of f32, bf16, f16"
        ))),
    }
}

pub struct Engine {
    pub files: ModelFiles,
    /// `config.json`'s `model_type` (the family: `qwen2_vl`, ...).
    pub model_type: String,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub preprocessor: Preprocessor,
    pub generation_config: GenerationConfig,
    pub model: Box<dyn VisionLanguageModel>,
    pub dtype: DType,
    pub quant: Option<GgmlDType>,
    pub stored_dtype: Option<String>,
    pub load_ms: f64,
    /// Tokens the model attends over (`max_position_embeddings`): prompt plus answer.
    pub context_length: usize,
    image_pad: String,
    /// A language model without a vision tower.
    text_only: bool,
    /// The token trie for constrained decoding, built on first use.
    constraints: OnceLock<ConstraintFactory>,
}

impl Engine {
    pub fn load(model: &str, opts: &LoadOptions) -> Result<Self> {
        let t0 = Instant::now();
        let files = ModelFiles::find_with(model, opts.mmproj.as_deref())?;
        let (cfg, template) = files.read_model()?;
        let model_type = cfg.model_type.clone();
        let context_length = cfg.text.max_position_embeddings;
        let (text_only, image_token_id) = (!cfg.has_vision(), cfg.image_token_id);
        let pre_cfg = files.preprocessor()?;
        let generation_config = match &files.generation_config {
            Some(p) => GenerationConfig::from_file(p)?,
            None => GenerationConfig::default(),
        };
        // The tokenizer (a vocabulary of 151k entries to parse) loads on a second thread while the
        // weights are mapped and the model is built.
        let (tokenizer, loaded) = std::thread::scope(|s| {
            let tokenizer = s.spawn(|| files.read_tokenizer());
            let loaded = Self::load_model(&files, cfg, opts);
            let tokenizer = tokenizer
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (tokenizer, loaded)
        });
        let tokenizer = tokenizer?;
        let (model, dtype, stored_dtype, unused) = loaded?;
        if !unused.is_empty() {
            tracing::info!(
                "{} stored tensors are not used by the model: {}",
                unused.len(),
                unused.join(", ")
            );
        }
        let image_pad = match tokenizer.id_to_token(image_token_id) {
            Some(t) => t,
            // A text-only model takes no images; its vocabulary may lack the placeholder.
            None if text_only => "<|image_pad|>".into(),
            None => {
                return Err(Error::Tokenizer {
                    path: files.tokenizer.clone(),
                    msg: format!(
                        "config.json's image_token_id {image_token_id} is not in the vocabulary"
                    ),
                })
            }
        };
        Ok(Engine {
            files,
            model_type,
            tokenizer,
            template,
            preprocessor: Preprocessor::new(pre_cfg),
            generation_config,
            model,
            dtype,
            quant: opts.quant,
            stored_dtype,
            load_ms: t0.elapsed().as_secs_f64() * 1e3,
            context_length,
            image_pad,
            text_only,
            constraints: OnceLock::new(),
        })
    }

    /// Maps the weights and builds the model: `(model, compute dtype, stored dtype, stored tensors
    /// the model did not read)`.
    #[allow(clippy::type_complexity)]
    fn load_model(
        files: &ModelFiles,
        cfg: Qwen2VlConfig,
        opts: &LoadOptions,
    ) -> Result<(
        Box<dyn VisionLanguageModel>,
        DType,
        Option<String>,
        Vec<String>,
    )> {
        let prequantized = files
            .weights
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "gguf"));
        let dtype = if prequantized || opts.quant.is_some() {
            // Quantized products take f32 activations; the dense rest follows.
            match opts.dtype {
                None | Some(DType::F32) => DType::F32,
                Some(other) => {
                    return Err(Error::InvalidInput(format!(
                        "quantized models compute in f32; drop --dtype {other:?} or use --dtype f32"
                    )))
                }
            }
        } else if let Some(d) = opts.dtype {
            d
        } else {
            // The checkpoint's own dtype: its largest tensor's (headers only), else config.json's.
            let probe = files.open_weights(DType::F32, &opts.device)?;
            let from_file = probe
                .stored_dtype()
                .as_deref()
                .and_then(|d| parse_dtype(d).ok());
            let from_config = cfg.dtype.as_deref().and_then(|d| parse_dtype(d).ok());
            from_file.or(from_config).unwrap_or(DType::F32)
        };
        let weights = files
            .open_weights(dtype, &opts.device)?
            .with_quant(opts.quant, qwen2_vl::quant_policy);
        let stored_dtype = weights.stored_dtype();
        let model: Box<dyn VisionLanguageModel> = match cfg.model_type.as_str() {
            "qwen3_5" => Box::new(qwen3_5::Qwen35::load(cfg, &weights)?),
            "llama" => Box::new(llama::load(cfg, &weights)?),
            "gemma3_text" => Box::new(gemma3::load(cfg, &weights)?),
            "phi3" => Box::new(phi3::load(cfg, &weights)?),
            _ => Box::new(qwen2_vl::Qwen2Vl::load(cfg, &weights)?),
        };
        Ok((model, dtype, stored_dtype, weights.unused()))
    }

    /// Loads image files in order, naming the file that fails.
    pub fn load_images(paths: &[impl AsRef<Path>]) -> Result<Vec<ImageInput>> {
        paths
            .iter()
            .map(|p| {
                let p = p.as_ref();
                Ok(ImageInput {
                    source: p.to_path_buf(),
                    image: image::load(p)?,
                })
            })
            .collect()
    }

    /// Builds the prompt of one user turn: the images first, then the text, under the model's own chat
    /// template; each image's placeholder is repeated to its token count.
    pub fn prompt(
        &self,
        system: Option<&str>,
        text: &str,
        images: &[ImageInput],
        preprocessor: &Preprocessor,
    ) -> Result<Prompt> {
        if text.trim().is_empty() && images.is_empty() {
            return Err(Error::InvalidInput(
                "the prompt is empty: give text, an image, or both".into(),
            ));
        }
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(Message::system(s));
        }
        messages.push(Message::user(images.len(), text));
        self.prompt_from_messages(&messages, images, preprocessor)
    }

    /// Builds a prompt from a whole conversation; `images` are those of all turns, in order.
    pub fn prompt_from_messages(
        &self,
        messages: &[Message],
        images: &[ImageInput],
        preprocessor: &Preprocessor,
    ) -> Result<Prompt> {
        if self.text_only && !images.is_empty() {
            return Err(Error::InvalidInput(format!(
                "{} is a text-only model ({}): it cannot take images",
                self.files.dir.display(),
                self.model_type
            )));
        }
        let rendered = self.template.render(messages, true)?;
        let pixels = preprocessor.preprocess(images)?;
        let pieces: Vec<&str> = rendered.split(self.image_pad.as_str()).collect();
        if pieces.len() - 1 != images.len() {
            return Err(Error::Template(format!(
                "the template placed {} image placeholders for {} images",
                pieces.len() - 1,
                images.len()
            )));
        }
        let mut text = String::with_capacity(rendered.len());
        for (i, piece) in pieces.iter().enumerate() {
            text.push_str(piece);
            if let Some(grid) = pixels.grids.get(i) {
                text.push_str(&self.image_pad.repeat(preprocessor.tokens_for(*grid)));
            }
        }
        let ids = self.tokenizer.encode_rendered(&text)?;
        Ok(Prompt { ids, pixels })
    }

    /// End-of-sequence ids: `generation_config.json`'s, else those of the families' end-of-turn and
    /// end-of-text tokens the vocabulary has (a GGUF has no generation config): Qwen's and
    /// SmolLM's `<|im_end|>`, `<|endoftext|>`; Gemma's `<end_of_turn>`, `<eos>`; Llama 3's
    /// `<|eot_id|>`, `<|end_of_text|>`.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        if !self.generation_config.eos_token_id.is_empty() {
            return self.generation_config.eos_token_id.clone();
        }
        [
            "<|im_end|>",
            "<|endoftext|>",
            "<end_of_turn>",
            "<eos>",
            "<|eot_id|>",
            "<|end|>",
            "<|end_of_text|>",
        ]
        .iter()
        .filter_map(|t| self.tokenizer.token_to_id(t))
        .collect()
    }

    pub fn generate(
        &self,
        prompt: &Prompt,
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        self.generate_with(prompt, params, None, on_text)
    }

    /// As `generate`, reusing cached image features and a prefilled prefix where the prompt allows.
    pub fn generate_with(
        &self,
        prompt: &Prompt,
        params: &GenerateParams,
        reuse: Option<&mut Reuse>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        let params = self.fit(prompt, params)?;
        let constraint = params
            .grammar
            .as_ref()
            .map(|g| self.constraint(g))
            .transpose()?;
        crate::generate::generate(
            self.model.as_ref(),
            &self.tokenizer,
            prompt,
            &params,
            constraint,
            reuse,
            on_text,
        )
    }

    /// Starts one answer to be stepped token by token (a server interleaves several): the
    /// prompt's images are encoded and the prompt prefilled here. `constraint` is the matcher for
    /// `params.grammar` (made with [`Engine::constraint`] beforehand, so a bad schema fails before
    /// any model work).
    pub fn sequence(
        &self,
        prompt: &Prompt,
        params: &GenerateParams,
        constraint: Option<Constraint>,
        features: Option<&mut crate::generate::FeatureCache>,
    ) -> Result<crate::generate::Sequence<'_>> {
        let params = self.fit(prompt, params)?;
        crate::generate::Sequence::start(
            self.model.as_ref(),
            &self.tokenizer,
            prompt,
            &params,
            constraint,
            features,
            None,
        )
    }

    /// The prompt checked against the context, and `max_tokens` capped to the room left after it
    /// (the answer then stops with finish_reason `length`).
    pub fn fit(&self, prompt: &Prompt, params: &GenerateParams) -> Result<GenerateParams> {
        if prompt.ids.len() >= self.context_length {
            return Err(Error::InvalidInput(format!(
                "the prompt is {} tokens, and the model's context is {} (max_position_embeddings in {}); \
                 shorten the prompt or lower the image pixels",
                prompt.ids.len(),
                self.context_length,
                self.files.config.display()
            )));
        }
        let room = self.context_length - prompt.ids.len();
        Ok(GenerateParams {
            max_tokens: params.max_tokens.min(room),
            ..params.clone()
        })
    }

    /// A fresh matcher for `grammar`; an invalid schema or grammar fails here. Its forced tokens
    /// run as one batched forward, unless `LOUPE_FAST_FORWARD` says `step` (one decode step each)
    /// or `off` (every token sampled under the mask).
    pub fn constraint(&self, grammar: &Grammar) -> Result<Constraint> {
        let factory = match self.constraints.get() {
            Some(f) => f,
            None => {
                let f = ConstraintFactory::new(&self.tokenizer, &self.eos_token_ids())?;
                self.constraints.get_or_init(|| f)
            }
        };
        let mode = match std::env::var("LOUPE_FAST_FORWARD").as_deref() {
            Ok("off") => FastForward::Off,
            Ok("step") => FastForward::Stepwise,
            Ok("batched") | Ok("") | Err(_) => FastForward::Batched,
            Ok(other) => {
                return Err(Error::InvalidInput(format!(
                    "LOUPE_FAST_FORWARD={other}: batched, step or off"
                )))
            }
        };
        Ok(factory.constraint(grammar)?.with_fast_forward(mode))
    }

    /// Prefills `prefix` once so that prompts starting with it skip that work (see `generate_with`).
    pub fn prefill_prefix(&self, prefix: &Prompt, reuse: &mut Reuse) -> Result<()> {
        reuse.prefix = Some(PrefixCache::build(
            self.model.as_ref(),
            prefix,
            &mut reuse.features,
        )?);
        Ok(())
    }
}

/// What a model is and needs, read from its files without loading the weights.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub path: String,
    pub model_type: String,
    pub architecture: String,
    pub params_vision: usize,
    pub params_text: usize,
    /// The dtype the weights are stored in.
    pub stored_dtype: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub layers: usize,
    pub attention_heads: usize,
    pub kv_heads: usize,
    pub vision_depth: usize,
    pub vision_width: usize,
    pub patch_size: usize,
    /// Memory for the weights at the stored dtype.
    pub weights_bytes: u64,
    /// KV cache per token at the stored dtype.
    pub kv_bytes_per_token: u64,
    pub min_pixels: usize,
    pub max_pixels: usize,
    /// The instruction set Loupe's kernels run with on this CPU (`kernels::Isa::name`).
    pub kernels: &'static str,
}

impl ModelInfo {
    /// Reads what a model is, after checking everything `loupe run` would: the configs, the
    /// tokenizer, the chat template (rendered once), and every tensor the model reads, present
    /// with its shape and a dtype Loupe reads (the model is built on the mapped weights, which
    /// costs a fraction of a second and no copy where the dtype matches). Stored tensors that the
    /// model does not read are an error unless `allow_unused`.
    pub fn read(model: &str, allow_unused: bool) -> Result<Self> {
        let files = ModelFiles::find(model)?;
        let (cfg, template) = files.read_model()?;
        let model_type = cfg.model_type.clone();
        let pre = files.preprocessor()?;
        let tokenizer = files.read_tokenizer()?;
        template.render(&[crate::tokenize::Message::user(0, "Hello")], true)?;
        if cfg.has_vision() && tokenizer.id_to_token(cfg.image_token_id).is_none() {
            return Err(Error::Tokenizer {
                path: files.tokenizer.clone(),
                msg: format!(
                    "config.json's image_token_id {} is not in the vocabulary",
                    cfg.image_token_id
                ),
            });
        }
        let (_, _, _, mut unused) =
            Engine::load_model(&files, cfg.clone(), &LoadOptions::default())?;
        // Qwen3.5's multi-token-prediction head (`mtp.*`, `mtp_num_hidden_layers`) ships with the
        // published checkpoints; Loupe does not draft with it yet, and it is no sign of a wrong
        // architecture.
        unused.retain(|n| !n.starts_with("mtp."));
        if !unused.is_empty() && !allow_unused {
            let shown: Vec<&str> = unused.iter().take(5).map(String::as_str).collect();
            return Err(Error::Weights {
                path: files.weights.first().cloned().unwrap_or_default(),
                msg: format!(
                    "{} stored tensors are not read by the {model_type} model ({}{}); \
                     is this another architecture? (--allow-unused-tensors to accept)",
                    unused.len(),
                    shown.join(", "),
                    if unused.len() > shown.len() {
                        ", ..."
                    } else {
                        ""
                    }
                ),
            });
        }
        let w = files.open_weights(DType::F32, &Device::Cpu)?;
        let params_vision = w.param_count("visual.");
        let params_text = w.param_count("") - params_vision;
        let stored_dtype = w.stored_dtype();
        let bytes_per = match stored_dtype.as_deref() {
            Some("f32") => 4,
            Some("f64") => 8,
            _ => 2,
        };
        let t = &cfg.text;
        Ok(ModelInfo {
            kernels: crate::kernels::Isa::detect().name(),
            path: files.dir.display().to_string(),
            architecture: match model_type.as_str() {
                "qwen2_5_vl" => "Qwen2.5-VL: ViT (RMSNorm, SwiGLU, window attention with full-attention \
                                 blocks, 2x2 merger) + Qwen2 decoder (GQA, SwiGLU, M-RoPE)",
                "qwen2" => "Qwen2: text-only decoder (GQA, SwiGLU, RoPE)",
                "llama" => "Llama: text-only decoder (GQA, SwiGLU, RoPE with llama3/linear scaling)",
                "gemma3_text" => "Gemma 3: text-only decoder (GQA, GeGLU, q/k norm, (1 + w) \
                                  RMSNorm before and after attention and MLP, sliding-window layers \
                                  with their own RoPE base, every sixth global)",
                "phi3" => "Phi-3: text-only decoder (fused qkv and gate/up projections, SwiGLU, \
                           RoPE with LongRoPE scaling and partial rotary, sliding window)",
                "qwen3_5" => "Qwen3.5: ViT (16 px patches, learned position grid, 2x2 merger) + hybrid \
                              decoder (Gated DeltaNet linear attention, gated GQA with partial \
                              interleaved M-RoPE, SwiGLU)",
                "qwen3_vl" => "Qwen3-VL: ViT (16 px patches, learned position grid, 2x2 merger, \
                               DeepStack) + Qwen3 decoder (GQA, q/k norm, SwiGLU, interleaved M-RoPE)",
                _ => "Qwen2-VL: ViT (2D RoPE, 2x2 patch merger) + Qwen2 decoder (GQA, SwiGLU, M-RoPE)",
            }
            .into(),
            model_type,
            params_vision,
            params_text,
            stored_dtype,
            vocab_size: t.vocab_size,
            hidden_size: t.hidden_size,
            layers: t.num_hidden_layers,
            attention_heads: t.num_attention_heads,
            kv_heads: t.num_key_value_heads,
            vision_depth: cfg.vision.depth,
            vision_width: cfg.vision.embed_dim,
            patch_size: cfg.vision.patch_size,
            weights_bytes: ((params_vision + params_text) * bytes_per) as u64,
            // Only full-attention layers keep keys and values; Qwen3.5's DeltaNet layers keep a
            // fixed-size state instead.
            kv_bytes_per_token: (2
                * if t.layer_types.is_empty() {
                    t.num_hidden_layers
                } else {
                    t.layer_types.iter().filter(|l| *l == "full_attention").count()
                }
                * t.num_key_value_heads
                * t.head_dim()
                * bytes_per) as u64,
            min_pixels: pre.min_pixels,
            max_pixels: pre.max_pixels,
        })
    }
}
