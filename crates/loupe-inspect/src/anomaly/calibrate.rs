//! Thresholds from held-out good images, by order statistics: no guess, and a stated confidence.
//!
//! With `n` held-out good scores sorted `s_0 <= ... <= s_(n-1)` and the threshold at `s_(n-1-j)` (an
//! image is flagged when its score is above it, so `j` held-out images are), the false-alarm rate `p`
//! of a fresh good image is a Beta(j + 1, n - j) variable whatever the score distribution, and
//! `P(p <= a) = P(Binomial(n, a) >= j + 1)`. The threshold kept is the lowest one (the most `j`)
//! whose confidence reaches the one asked for: with 29 images, `j = 0` (the largest score) holds a 10%
//! false-alarm rate at 95% confidence (1 - 0.9^29 = 0.953).

use serde::{Deserialize, Serialize};

/// One row of the calibration table.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The false-alarm rate bounded.
    pub far: f64,
    /// The confidence asked for.
    pub confidence: f64,
    /// The threshold: an image scoring above it is flagged.
    pub threshold: f32,
    /// Held-out good images above the threshold.
    pub exceedances: usize,
    /// The confidence this threshold reaches (at least `confidence`).
    pub achieved: f64,
    /// Held-out good images.
    pub n: usize,
}

/// `P(Binomial(n, a) >= k)`, summed in log space.
pub fn binomial_tail(n: usize, a: f64, k: usize) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n {
        return 0.0;
    }
    if a <= 0.0 {
        return 0.0;
    }
    if a >= 1.0 {
        return 1.0;
    }
    // 1 - P(X <= k - 1).
    let (la, lb) = (a.ln(), (1.0 - a).ln());
    let mut log_c = 0.0f64; // ln C(n, 0)
    let mut below = 0.0f64;
    for i in 0..k {
        if i > 0 {
            log_c += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        below += (log_c + i as f64 * la + (n - i) as f64 * lb).exp();
    }
    (1.0 - below).clamp(0.0, 1.0)
}

/// The fewest held-out good images with which any threshold bounds `far` at `confidence`.
pub fn images_needed(far: f64, confidence: f64) -> usize {
    ((1.0 - confidence).ln() / (1.0 - far).ln()).ceil().max(1.0) as usize
}

/// The threshold for `far` at `confidence` from the held-out good `scores`, or `None` when there are
/// too few of them ([`images_needed`]).
pub fn calibrate(scores: &[f32], far: f64, confidence: f64) -> Option<Calibration> {
    let n = scores.len();
    if n == 0 || !(0.0..1.0).contains(&far) || !(0.0..1.0).contains(&confidence) {
        return None;
    }
    let mut sorted = scores.to_vec();
    sorted.sort_by(f32::total_cmp);
    let mut best = None;
    for j in 0..n {
        let achieved = binomial_tail(n, far, j + 1);
        if achieved < confidence {
            break;
        }
        let threshold = sorted[n - 1 - j];
        best = Some(Calibration {
            far,
            confidence,
            threshold,
            exceedances: sorted.iter().filter(|&&s| s > threshold).count(),
            achieved,
            n,
        });
    }
    best
}

/// With fewer held-out good images than `far` needs, the one honest statement they allow: their
/// largest score as the threshold, and the smallest false-alarm rate it bounds at `confidence`
/// (`1 - (1 - confidence)^(1/n)`: 78% with 2 images at 95%, 26% with 10). `None` without scores.
pub fn weakest(scores: &[f32], confidence: f64) -> Option<Calibration> {
    let n = scores.len();
    let threshold = scores.iter().copied().max_by(f32::total_cmp)?;
    if !(0.0..1.0).contains(&confidence) {
        return None;
    }
    Some(Calibration {
        far: 1.0 - (1.0 - confidence).powf(1.0 / n as f64),
        confidence,
        threshold,
        exceedances: 0,
        achieved: confidence,
        n,
    })
}

/// The table `loupe learn` prints: the usual false-alarm rates at `confidence`.
pub fn table(scores: &[f32], confidence: f64) -> Vec<Result<Calibration, (f64, usize)>> {
    [0.01, 0.02, 0.05, 0.1, 0.2]
        .into_iter()
        .map(|far| calibrate(scores, far, confidence).ok_or((far, images_needed(far, confidence))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binomial_tail_matches_closed_forms() {
        // P(X >= 1) = 1 - (1 - a)^n.
        assert!((binomial_tail(29, 0.1, 1) - (1.0 - 0.9f64.powi(29))).abs() < 1e-12);
        // P(X >= n) = a^n.
        assert!((binomial_tail(5, 0.3, 5) - 0.3f64.powi(5)).abs() < 1e-12);
        // Binomial(4, 0.5) >= 2: (6 + 4 + 1) / 16.
        assert!((binomial_tail(4, 0.5, 2) - 11.0 / 16.0).abs() < 1e-12);
        assert_eq!(binomial_tail(10, 0.2, 0), 1.0);
        assert_eq!(binomial_tail(10, 0.2, 11), 0.0);
    }

    #[test]
    fn the_issue_example_holds_and_too_few_images_are_refused() {
        // 29 held-out good images bound a 10% false-alarm rate at 95% with their largest score.
        let scores: Vec<f32> = (0..29).map(|i| i as f32).collect();
        let c = calibrate(&scores, 0.1, 0.95).unwrap();
        assert_eq!((c.threshold, c.exceedances), (28.0, 0));
        assert!(c.achieved >= 0.95 && c.achieved < 0.96, "{}", c.achieved);
        assert_eq!(images_needed(0.1, 0.95), 29);
        assert!(calibrate(&scores[..28], 0.1, 0.95).is_none());
        // More images allow a lower threshold (some held-out images above it).
        let many: Vec<f32> = (0..200).map(|i| i as f32).collect();
        let c = calibrate(&many, 0.1, 0.95).unwrap();
        assert!(c.exceedances > 5 && c.exceedances < 20, "{c:?}");
        assert_eq!(c.threshold, (199 - c.exceedances) as f32);
        // The next lower threshold would miss the confidence.
        assert!(binomial_tail(200, 0.1, c.exceedances + 2) < 0.95);
    }

    /// Too few images for the rate asked: the largest score, and the rate it does bound (at which
    /// the binomial tail reaches the confidence exactly).
    #[test]
    fn few_images_state_the_rate_they_bound() {
        let scores = [0.3f32, 0.9, 0.5];
        let c = weakest(&scores, 0.95).unwrap();
        assert_eq!((c.threshold, c.n, c.exceedances), (0.9, 3, 0));
        assert!((binomial_tail(3, c.far, 1) - 0.95).abs() < 1e-9, "{c:?}");
        assert!((weakest(&[1.0, 2.0], 0.95).unwrap().far - 0.776).abs() < 1e-3);
        assert!(weakest(&[], 0.95).is_none());
    }

    /// The bound holds over repeated draws: with the threshold from n good scores, the rate of fresh
    /// good scores above it exceeds `far` in at most about 1 - confidence of the draws.
    #[test]
    fn the_stated_false_alarm_rate_holds_on_fresh_scores() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (far, confidence, trials) = (0.05, 0.9, 400);
        let mut broken = 0;
        for _ in 0..trials {
            let held: Vec<f32> = (0..100).map(|_| rng.random::<f32>().powi(3)).collect();
            let c = calibrate(&held, far, confidence).unwrap();
            // The true rate of this threshold for the distribution u^3: P(u^3 > t) = 1 - t^(1/3).
            let rate = 1.0 - (c.threshold as f64).cbrt();
            if rate > far {
                broken += 1;
            }
        }
        let share = broken as f64 / trials as f64;
        assert!(
            share <= 1.0 - confidence + 0.04,
            "bound broken in {share} of draws"
        );
    }
}
