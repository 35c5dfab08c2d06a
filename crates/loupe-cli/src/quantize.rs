//! `loupe quantize`: write a quantized copy of a model that loads without re-quantizing.

use std::path::PathBuf;

use loupe_core::Result;

#[derive(clap::Args, Debug)]
pub struct QuantizeArgs {
    /// A model directory, a hub id in the local Hugging Face cache, or llama.cpp GGUF files (a text
    /// model file, or a folder holding it and its vision file).
    #[arg(long, short = 'm')]
    pub model: String,
    /// The vision file (mmproj) of a llama.cpp GGUF vision model (default: the one mmproj*.gguf
    /// beside the model file).
    #[arg(long)]
    pub mmproj: Option<PathBuf>,
    /// q8_0, q6_k, q5_k, q4_k or q4_0.
    #[arg(long)]
    pub quant: String,
    /// Directory to write (created; must not hold a model).
    #[arg(long)]
    pub out: PathBuf,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn quantize(args: QuantizeArgs) -> Result<()> {
    crate::set_threads(args.threads)?;
    let q = loupe_core::engine::parse_quant(&args.quant)?;
    let bar = crate::progress_bar(0, "quantizing {bar:40} {pos}/{len} tensors ({elapsed})");
    let report = loupe_core::load::quantize::quantize_model(
        &args.model,
        args.mmproj.as_deref(),
        q,
        &args.out,
        &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {} ({} tensors, {} quantized, {:.1} MiB)",
        report.out.join("model.gguf").display(),
        report.tensors,
        report.quantized,
        report.bytes as f64 / (1u64 << 20) as f64
    );
    Ok(())
}
