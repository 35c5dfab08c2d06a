//! `loupe info`: what a model is and what it needs.

use loupe_core::engine::ModelInfo;
use loupe_core::Result;

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    /// A model directory or a hub id in the local Hugging Face cache.
    #[arg(long, short = 'm')]
    pub model: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Accept stored tensors that the model does not read (by default an error: a checkpoint of
    /// another architecture under a known model_type).
    #[arg(long)]
    pub allow_unused_tensors: bool,
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn bytes(n: u64) -> String {
    let gib = n as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.2} GiB")
    } else {
        format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
    }
}

pub fn info(args: InfoArgs) -> Result<()> {
    let i = ModelInfo::read(&args.model, args.allow_unused_tensors)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&i).unwrap_or_default());
        return Ok(());
    }
    let dtype = i.stored_dtype.clone().unwrap_or_else(|| "unknown".into());
    println!("model         {}", i.path);
    println!("model_type    {}", i.model_type);
    println!("architecture  {}", i.architecture);
    println!(
        "parameters    {} total: vision {}, text {}",
        human(i.params_vision + i.params_text),
        human(i.params_vision),
        human(i.params_text)
    );
    println!(
        "text          {} layers, hidden {}, {} heads / {} KV heads, vocab {}",
        i.layers, i.hidden_size, i.attention_heads, i.kv_heads, i.vocab_size
    );
    if i.vision_depth == 0 {
        println!("vision        none (a text-only model)");
    } else {
        println!(
            "vision        {} blocks, width {}, patch {}; images {}..{} pixels",
            i.vision_depth, i.vision_width, i.patch_size, i.min_pixels, i.max_pixels
        );
    }
    println!("dtype         {dtype} (stored)");
    println!(
        "memory        weights {}, KV cache {} per 1k tokens (at {dtype})",
        bytes(i.weights_bytes),
        bytes(i.kv_bytes_per_token * 1000)
    );
    println!("kernels       {} (this CPU)", i.kernels);
    Ok(())
}
