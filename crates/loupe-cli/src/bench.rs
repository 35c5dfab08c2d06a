//! `loupe bench`: load time, image encode time, prefill and decode speed, peak memory, as JSON.

use std::time::Instant;

use loupe_core::image::{ImageInput, RgbImage};
use loupe_core::{Error, Result};

use crate::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text tokens in the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prefill_tokens: usize,
    /// Tokens in the decode measurement.
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Square image sizes to encode, in pixels (give the flag with no value to skip images).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "448,896")]
    pub image_sizes: Vec<usize>,
    /// Also decode this many answers at once, as `loupe serve` batches them (e.g. `2,4,16`): each
    /// continues a copy of the prefill's cache; reports all answers' tokens per second.
    #[arg(long, value_delimiter = ',', num_args = 0..)]
    pub batch_sizes: Vec<usize>,
    /// Repetitions of each measurement (the best is reported).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
}

/// A deterministic test card: gradients and stripes, so nothing is constant.
fn test_image(side: usize) -> RgbImage {
    let mut data = Vec::with_capacity(side * side * 3);
    for y in 0..side {
        for x in 0..side {
            data.push((x * 255 / side) as u8);
            data.push((y * 255 / side) as u8);
            data.push((((x / 7) ^ (y / 5)) & 0xff) as u8);
        }
    }
    RgbImage {
        width: side,
        height: side,
        data,
        orientation: 1,
    }
}

fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn best_ms(repeat: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(best)
}

pub fn bench(args: BenchArgs) -> Result<()> {
    if args.prefill_tokens == 0 || args.decode_tokens == 0 {
        return Err(Error::InvalidInput(
            "--prefill-tokens and --decode-tokens must be at least 1".into(),
        ));
    }
    let engine = args.model.load()?;
    let model = engine.model.as_ref();
    let mut images = serde_json::Map::new();
    for &side in &args.image_sizes {
        let pre = engine.preprocessor.clone().with_pixels(
            None,
            Some(engine.preprocessor.cfg.max_pixels.max(side * side)),
        )?;
        let input = ImageInput {
            source: format!("<test card {side}x{side}>").into(),
            image: test_image(side),
        };
        let mut tokens = 0;
        let ms = best_ms(args.repeat, || {
            let px = pre.preprocess(std::slice::from_ref(&input))?;
            tokens = px.grids.iter().map(|g| pre.tokens_for(*g)).sum();
            model.encode_images(&px)?;
            Ok(())
        })?;
        images.insert(
            format!("{side}"),
            serde_json::json!({ "ms": ms, "image_tokens": tokens }),
        );
    }

    // Prefill: ordinary text token ids (below the special tokens), no images.
    let ordinary = model
        .vocab_size()
        .min(model.image_token_id() as usize)
        .max(1);
    let ids: Vec<u32> = (0..args.prefill_tokens)
        .map(|i| ((i * 7919 + 13) % ordinary) as u32)
        .collect();
    let mut cache = model.new_cache();
    let prefill_ms = best_ms(args.repeat, || {
        cache = model.new_cache();
        let (pos, delta) = model.prompt_positions(&ids, &[])?;
        cache.rope_delta = delta;
        let embeds = model.embed(&ids, None)?;
        model.forward(&embeds, &pos, &mut cache, false)?;
        Ok(())
    })?;

    // Decode: one token at a time after the prefill, the greedy token fed back (EOS ignored).
    let prefilled = (!args.batch_sizes.is_empty()).then(|| cache.clone());
    let mut next = ids[ids.len() - 1];
    let t = Instant::now();
    for _ in 0..args.decode_tokens {
        let pos = cache.len() as i64 + cache.rope_delta;
        let embeds = model.embed(&[next], None)?;
        let logits = model.forward(&embeds, &[[pos; 3]], &mut cache, false)?;
        next = logits
            .argmax(candle_core::D::Minus1)?
            .flatten_all()?
            .to_vec1::<u32>()?[0];
    }
    let decode_ms = t.elapsed().as_secs_f64() * 1e3;

    // Batched decode: n answers, each on its own copy of the prefilled cache, one forward per step.
    let mut batched = serde_json::Map::new();
    for (&n, prefilled) in args
        .batch_sizes
        .iter()
        .zip(std::iter::repeat(&prefilled).flatten())
    {
        if n == 0 || n > 256 {
            return Err(Error::InvalidInput(format!(
                "--batch-sizes: {n} is not between 1 and 256"
            )));
        }
        let mut caches: Vec<_> = (0..n).map(|_| prefilled.clone()).collect();
        let mut tokens: Vec<u32> = (0..n).map(|i| ids[i % ids.len()]).collect();
        let t = Instant::now();
        for _ in 0..args.decode_tokens {
            let mut refs: Vec<_> = caches.iter_mut().collect();
            let logits = model.forward_decode(&tokens, &mut refs)?;
            tokens = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
        }
        let ms = t.elapsed().as_secs_f64() * 1e3;
        batched.insert(
            format!("{n}"),
            serde_json::json!({
                "ms_per_step": ms / args.decode_tokens as f64,
                "tok_s": (n * args.decode_tokens) as f64 / (ms / 1e3),
            }),
        );
    }

    let out = serde_json::json!({
        "model": engine.files.dir.display().to_string(),
        "dtype": format!("{:?}", engine.dtype).to_lowercase(),
        "quant": engine.quant.map(|q| format!("{q:?}").to_lowercase()),
        "threads": candle_core::utils::get_num_threads(),
        "kernels": loupe_core::kernels::Isa::detect().name(),
        "load_ms": engine.load_ms,
        "image_encode": images,
        "prefill_tokens": args.prefill_tokens,
        "prefill_ms": prefill_ms,
        "prefill_tok_s": args.prefill_tokens as f64 / (prefill_ms / 1e3),
        "decode_tokens": args.decode_tokens,
        "decode_ms": decode_ms,
        "decode_tok_s": args.decode_tokens as f64 / (decode_ms / 1e3),
        "batched_decode": batched,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    Ok(())
}
