//! Next-token choice: greedy, or sampling with transformers' processors in transformers' order
//! (repetition penalty, temperature, top-k, top-p, min-p), seeded for reproducible runs.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    /// 1.0 means none.
    pub repetition_penalty: f64,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

/// The sampling settings a caller asked for; what is left out comes from the checkpoint.
#[derive(Debug, Clone, Default)]
pub struct SamplingRequest {
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: u64,
}

impl SamplingParams {
    /// What is asked, completed from `generation_config.json`: sampling with its temperature, top-k
    /// and top-p when it says `do_sample` and no temperature is asked, else greedy; its repetition
    /// penalty unless one is asked.
    pub fn resolve(req: &SamplingRequest, gc: &crate::load::config::GenerationConfig) -> Self {
        let sample_default = gc.do_sample.unwrap_or(false);
        let temperature = req.temperature.unwrap_or(if sample_default {
            gc.temperature.unwrap_or(1.0)
        } else {
            0.0
        });
        let from_gc = req.temperature.is_none() && sample_default;
        SamplingParams {
            temperature,
            top_k: req.top_k.or(if from_gc { gc.top_k } else { None }),
            top_p: req.top_p.or(if from_gc { gc.top_p } else { None }),
            min_p: req.min_p,
            repetition_penalty: req
                .repetition_penalty
                .or(gc.repetition_penalty)
                .unwrap_or(1.0),
            seed: req.seed,
        }
    }

    /// Checks ranges, naming the flag at fault (`--top-p`).
    pub fn validate(&self) -> Result<(), String> {
        self.check(|field| format!("--{}", field.replace('_', "-")))
    }

    /// Checks ranges; `name` turns a field (`top_p`) into what the caller calls it.
    pub fn check(&self, name: impl Fn(&str) -> String) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "{} {} must be 0 or more",
                name("temperature"),
                self.temperature
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(format!("{} {p} must be in (0, 1]", name("top_p")));
            }
        }
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{} {p} must be in [0, 1]", name("min_p")));
            }
        }
        if self.top_k == Some(0) {
            return Err(format!(
                "{} 0 keeps no token; leave it out to disable top-k",
                name("top_k")
            ));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "{} {} must be greater than 0",
                name("repetition_penalty"),
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

/// Index of the largest value, the first one on ties (as `torch.argmax`).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    /// Picks the next token from `logits` given the ids seen so far (prompt and output).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let mut scores = logits.to_vec();
        if p.repetition_penalty != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            let pen = p.repetition_penalty as f32;
            for &id in &seen {
                if let Some(s) = scores.get_mut(id as usize) {
                    *s = if *s < 0.0 { *s * pen } else { *s / pen };
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(&scores);
        }
        let t = p.temperature as f32;
        for s in &mut scores {
            *s /= t;
        }
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        let mut keep = order.len();
        if let Some(k) = p.top_k {
            keep = keep.min(k);
        }
        // Probabilities of the kept candidates, best first.
        let max = scores[order[0]];
        let mut probs: Vec<f64> = order[..keep]
            .iter()
            .map(|&i| f64::from(scores[i] - max).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if let Some(top_p) = p.top_p {
            let mut cum = 0.0;
            let mut n = 0;
            for &q in &probs {
                n += 1;
                cum += q;
                if cum >= top_p {
                    break;
                }
            }
            keep = n.max(1);
        }
        if let Some(min_p) = p.min_p {
            let floor = min_p * probs[0];
            keep = probs[..keep]
                .iter()
                .take_while(|&&q| q >= floor)
                .count()
                .max(1);
        }
        let total: f64 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f64>() * total;
        for (i, &q) in probs[..keep].iter().enumerate() {
            if r < q {
                return order[i] as u32;
            }
            r -= q;
        }
        order[keep - 1] as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_max() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_follows_transformers() {
        // Positive logits are divided, negative multiplied: token 1 (3.0 -> 1.5) loses to token 2 (2.0).
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(params);
        assert_eq!(s.sample(&[0.0, 3.0, 2.0], &[1]), 2);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_reproduces() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_k: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        for _ in 0..20 {
            assert_eq!(s.sample(&logits, &[]), argmax(&logits));
        }
        let p = SamplingParams {
            temperature: 0.8,
            top_p: Some(0.9),
            seed: 7,
            ..Default::default()
        };
        let a: Vec<u32> = (0..30)
            .scan(Sampler::new(p.clone()), |s, _| Some(s.sample(&logits, &[])))
            .collect();
        let b: Vec<u32> = (0..30)
            .scan(Sampler::new(p), |s, _| Some(s.sample(&logits, &[])))
            .collect();
        assert_eq!(a, b);
        assert!(
            a.iter().any(|&x| x != a[0]),
            "sampling at T=0.8 should vary"
        );
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // Token 0 has ~0.87 of the mass: top-p 0.5 and min-p 0.5 both leave only it.
        let logits = [5.0f32, 3.0, 1.0, 0.0];
        for (top_p, min_p) in [(Some(0.5), None), (None, Some(0.5))] {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                top_p,
                min_p,
                seed: 3,
                ..Default::default()
            });
            for _ in 0..50 {
                assert_eq!(s.sample(&logits, &[]), 0);
            }
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = [0.25, 0.75]
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: 11,
            ..Default::default()
        });
        let ones = (0..4000).filter(|_| s.sample(&logits, &[]) == 1).count();
        assert!((2850..3150).contains(&ones), "{ones}");
    }
}
