//! `loupe run`: one prompt, streamed.

use std::io::Write;
use std::path::PathBuf;

use loupe_core::generate::{GenerateParams, Grammar, SamplingParams, SamplingRequest};
use loupe_core::{Error, Result};
use loupe_inspect::boxes::{parse_groundings, BoxConvention, Frame};

use crate::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// An image to show the model (repeat for several; they come before the text, in order).
    #[arg(long = "image", short = 'i')]
    pub images: Vec<PathBuf>,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Send the prompt text as it is, tokenized with special tokens, without the chat template (no
    /// images).
    #[arg(long)]
    pub raw: bool,
    /// Thinking models (Qwen3, Qwen3.5): `on` or `off` sets the chat template's `enable_thinking`;
    /// left out, the template's default applies.
    #[arg(long, value_parser = ["on", "off"])]
    pub thinking: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Stop when the text contains this string (repeatable); the string is not printed.
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Smallest image size in pixels after resizing (default: preprocessor_config.json).
    #[arg(long)]
    pub min_pixels: Option<usize>,
    /// Largest image size in pixels after resizing (default: preprocessor_config.json).
    #[arg(long)]
    pub max_pixels: Option<usize>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Constrain the answer to this JSON schema (a file): it always parses and validates.
    #[arg(long, value_name = "FILE", conflicts_with = "grammar")]
    pub json_schema: Option<PathBuf>,
    /// Constrain the answer to this grammar (a file, llguidance's Lark dialect).
    #[arg(long, value_name = "FILE")]
    pub grammar: Option<PathBuf>,
    /// Find grounding boxes in the answer and map them to pixels of the last image (as shown, and in
    /// the file's stored grid), in the model family's box convention.
    #[arg(long)]
    pub boxes: bool,
    /// The prompt text.
    #[arg(default_value = "")]
    pub prompt: String,
}

impl RunArgs {
    /// The `--json-schema` or `--grammar` file, read and checked as far as can be without the model.
    fn grammar_arg(&self) -> Result<Option<Grammar>> {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p)
                .map_err(|e| Error::InvalidInput(format!("{}: {e}", p.display())))
        };
        if let Some(p) = &self.json_schema {
            let v: serde_json::Value = serde_json::from_str(&read(p)?).map_err(|e| {
                Error::InvalidInput(format!("{}: not a JSON schema: {e}", p.display()))
            })?;
            return Ok(Some(Grammar::JsonSchema(v)));
        }
        Ok(self
            .grammar
            .as_ref()
            .map(read)
            .transpose()?
            .map(Grammar::Lark))
    }
}

/// How tokens are drawn (`loupe run`, `loupe chat`).
#[derive(clap::Args, Debug)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy (default: the checkpoint's generation_config, else greedy).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Draw only from the K most likely tokens, K at least 1 (default: generation_config, else all).
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Draw only from the most likely tokens whose probabilities add up to P, in (0, 1]; 1 keeps
    /// all (default: generation_config).
    #[arg(long, value_name = "P")]
    pub top_p: Option<f64>,
    /// Drop tokens less likely than P times the most likely one, in [0, 1]; 0 keeps all (default:
    /// generation_config).
    #[arg(long, value_name = "P")]
    pub min_p: Option<f64>,
    /// Make tokens already in the prompt or answer less likely (> 1) or more likely (< 1); 1 is off
    /// (default: generation_config).
    #[arg(long, value_name = "X")]
    pub repetition_penalty: Option<f64>,
    /// Seed for sampling, for reproducible runs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    /// The settings given, the checkpoint's generation_config for the rest; checked.
    pub fn resolve(
        &self,
        gc: &loupe_core::load::config::GenerationConfig,
    ) -> Result<SamplingParams> {
        let req = SamplingRequest {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        };
        let sampling = SamplingParams::resolve(&req, gc);
        sampling.validate().map_err(Error::InvalidInput)?;
        Ok(sampling)
    }
}

pub fn run(args: RunArgs) -> Result<()> {
    if args.prompt.trim().is_empty() && args.images.is_empty() {
        return Err(Error::InvalidInput(
            "the prompt is empty: give text, an --image, or both".into(),
        ));
    }
    if args.max_tokens == 0 {
        return Err(Error::InvalidInput(
            "--max-tokens must be at least 1".into(),
        ));
    }
    let grammar = args.grammar_arg()?;
    if args.boxes && args.images.is_empty() {
        return Err(Error::InvalidInput(
            "--boxes needs an --image to map the boxes onto".into(),
        ));
    }
    // Images are read before the model, so a bad path fails fast.
    let images = loupe_core::Engine::load_images(&args.images)?;
    let mut engine = args.model.load()?;
    engine.template.enable_thinking = args.thinking.as_deref().map(|t| t == "on");
    if let Some(g) = &grammar {
        // Compile it now so that a bad schema or grammar is reported against its file.
        let file = args.json_schema.as_ref().or(args.grammar.as_ref());
        engine.constraint(g).map_err(|e| match file {
            Some(f) => Error::InvalidInput(format!("{}: {e}", f.display())),
            None => e,
        })?;
    }
    let pre = engine
        .preprocessor
        .clone()
        .with_pixels(args.min_pixels, args.max_pixels)?;
    let prompt = if args.raw {
        if !images.is_empty() || args.system.is_some() {
            return Err(Error::InvalidInput(
                "--raw sends the text as it is: it takes no --image and no --system".into(),
            ));
        }
        loupe_core::generate::Prompt {
            ids: engine.tokenizer.encode(&args.prompt)?,
            pixels: Default::default(),
        }
    } else {
        engine.prompt(args.system.as_deref(), &args.prompt, &images, &pre)?
    };
    let sampling = args.sampling.resolve(&engine.generation_config)?;
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        sampling,
        stop_strings: args.stop.clone(),
        eos_token_ids: engine.eos_token_ids(),
        grammar,
    };
    let mut stdout = std::io::stdout().lock();
    let json = args.json;
    let out = engine.generate(&prompt, &params, &mut |piece| {
        if !json {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    let boxes = if args.boxes {
        let raw = engine.tokenizer.decode_with_special(&out.tokens)?;
        let last = images
            .last()
            .ok_or_else(|| Error::InvalidInput("--boxes needs an --image".into()))?;
        let (mh, mw) = pre.target_size(last)?;
        let frame = Frame::new(
            (last.image.width, last.image.height),
            last.image.orientation,
            (mw, mh),
        );
        let convention = BoxConvention::for_model_type(&engine.model_type);
        parse_groundings(&raw)
            .into_iter()
            .map(|g| {
                let px = convention.to_pixels(g.coords, &frame);
                serde_json::json!({
                    "label": g.label,
                    "box_model": g.coords,
                    "box": px.rounded(),
                    "box_stored": frame.to_stored(&px).rounded(),
                })
            })
            .collect::<Vec<_>>()
    } else {
        vec![]
    };
    let t = &out.timings;
    if json {
        let obj = serde_json::json!({
            "text": out.text,
            "tokens": out.tokens,
            "prompt_tokens": out.prompt_tokens,
            "finish_reason": out.finish_reason,
            "boxes": boxes,
            "timings": {
                "load_ms": engine.load_ms,
                "vision_ms": t.vision_ms,
                "prefill_ms": t.prefill_ms,
                "decode_ms": t.decode_ms,
            },
        });
        let _ = writeln!(stdout, "{obj}");
    } else {
        let _ = writeln!(stdout);
        for b in &boxes {
            let _ = writeln!(stdout, "box {b}");
        }
    }
    let prefill_tps = out.prompt_tokens as f64 / (t.prefill_ms / 1e3).max(1e-9);
    // The first token comes from the prefill; decode speed counts the ones after it.
    let decoded = out.tokens.len().saturating_sub(1);
    let decode_tps = decoded as f64 / (t.decode_ms / 1e3).max(1e-9);
    eprintln!(
        "image encode {:.0} ms | {} prompt tokens | prefill {:.1} tok/s | decode {:.1} tok/s ({} tokens, {})",
        t.vision_ms,
        out.prompt_tokens,
        prefill_tps,
        decode_tps,
        out.tokens.len(),
        match out.finish_reason {
            loupe_core::generate::FinishReason::Stop => "stop",
            loupe_core::generate::FinishReason::Length => "length",
        }
    );
    Ok(())
}
