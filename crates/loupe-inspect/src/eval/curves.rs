//! Ranking metrics over scores: AUROC, the ROC curve, average precision, and pixel AUROC with
//! per-region overlap (PRO) for pixel maps. Exact, by one sort, with tied scores grouped (a tie counts half in AUROC,
//! and a curve takes a tie group in one step), so they scale to the millions of pixels of a dataset.

/// Per distinct score, highest first: `(score, positives, negatives)` with that score.
fn groups(pos: &[f64], neg: &[f64]) -> Vec<(f64, usize, usize)> {
    let mut all: Vec<(f64, bool)> = pos
        .iter()
        .map(|&s| (s, true))
        .chain(neg.iter().map(|&s| (s, false)))
        .collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut out: Vec<(f64, usize, usize)> = Vec::new();
    for (s, p) in all {
        match out.last_mut() {
            Some(g) if g.0 == s => {
                if p {
                    g.1 += 1
                } else {
                    g.2 += 1
                }
            }
            _ => out.push((s, p as usize, !p as usize)),
        }
    }
    out
}

/// Area under the ROC curve: the chance a positive scores above a negative, ties counted half.
/// `None` without both classes.
pub fn auroc(pos: &[f64], neg: &[f64]) -> Option<f64> {
    if pos.is_empty() || neg.is_empty() {
        return None;
    }
    let (mut above, mut wins) = (0usize, 0.0f64);
    for (_, p, n) in groups(pos, neg) {
        wins += n as f64 * (above as f64 + 0.5 * p as f64);
        above += p;
    }
    Some(wins / (pos.len() as f64 * neg.len() as f64))
}

/// The ROC curve from `(0, 0)` to `(1, 1)`: `(false-positive rate, true-positive rate)` at each
/// distinct score taken as the threshold (at or above fails).
pub fn roc(pos: &[f64], neg: &[f64]) -> Vec<(f64, f64)> {
    let (np, nn) = (pos.len().max(1) as f64, neg.len().max(1) as f64);
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut out = vec![(0.0, 0.0)];
    for (_, p, n) in groups(pos, neg) {
        tp += p;
        fp += n;
        out.push((fp as f64 / nn, tp as f64 / np));
    }
    out
}

/// Average precision (the area under the precision-recall curve as a step sum, as scikit-learn's
/// `average_precision_score`): the sum over thresholds of precision times the recall gained.
pub fn average_precision(pos: &[f64], neg: &[f64]) -> Option<f64> {
    if pos.is_empty() || neg.is_empty() {
        return None;
    }
    let (mut tp, mut fp, mut ap) = (0usize, 0usize, 0.0);
    for (_, p, n) in groups(pos, neg) {
        tp += p;
        fp += n;
        ap += (tp as f64 / (tp + fp) as f64) * (p as f64 / pos.len() as f64);
    }
    Some(ap)
}

/// One pixel for PRO: its score, and the ground-truth region it belongs to (`None`: a good pixel).
pub type RegionPixel = (f32, Option<u32>);

/// Pixel AUROC and PRO of one set of pixels, in one sort.
///
/// AUROC counts region pixels as positives and good pixels as negatives, ties half. PRO is the
/// normalised area under the per-region-overlap curve up to a false-positive rate of `max_fpr`
/// (0.3 in MVTec AD's protocol): at each threshold, the mean over ground-truth regions of the share
/// of the region's pixels at or above it, against the share of good pixels at or above it,
/// integrated by trapezoids over the false-positive rate, cut at `max_fpr` (interpolated) and
/// divided by it. `sizes[r]` is region `r`'s pixel count. Each is `None` where it is undefined
/// (no region pixels, no good pixels).
pub fn pixel_curves(
    pixels: &mut [RegionPixel],
    sizes: &[usize],
    max_fpr: f64,
) -> (Option<f64>, Option<f64>) {
    let good = pixels.iter().filter(|p| p.1.is_none()).count();
    let bad = pixels.len() - good;
    pixels.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut fp, mut tp, mut wins) = (0usize, 0usize, 0.0f64);
    let mut overlap_sum = 0.0f64;
    let (mut last_fpr, mut last_pro, mut area) = (0.0f64, 0.0f64, 0.0f64);
    let mut pro_done = false;
    let mut i = 0;
    while i < pixels.len() {
        let s = pixels[i].0;
        let (mut fp_g, mut tp_g) = (0usize, 0usize);
        while i < pixels.len() && pixels[i].0 == s {
            match pixels[i].1 {
                None => fp_g += 1,
                Some(r) => {
                    tp_g += 1;
                    overlap_sum += 1.0 / sizes[r as usize] as f64;
                }
            }
            i += 1;
        }
        wins += fp_g as f64 * (tp as f64 + 0.5 * tp_g as f64);
        (fp, tp) = (fp + fp_g, tp + tp_g);
        if pro_done || good == 0 || sizes.is_empty() {
            continue;
        }
        let fpr = fp as f64 / good as f64;
        let pro = overlap_sum / sizes.len() as f64;
        if fpr >= max_fpr {
            let t = if fpr > last_fpr {
                (max_fpr - last_fpr) / (fpr - last_fpr)
            } else {
                0.0
            };
            let cut = last_pro + t * (pro - last_pro);
            area += (max_fpr - last_fpr) * (last_pro + cut) / 2.0;
            pro_done = true;
            continue;
        }
        area += (fpr - last_fpr) * (last_pro + pro) / 2.0;
        (last_fpr, last_pro) = (fpr, pro);
    }
    let auroc = (good > 0 && bad > 0).then(|| wins / (good as f64 * bad as f64));
    let pro = (good > 0 && !sizes.is_empty() && max_fpr > 0.0 && max_fpr <= 1.0)
        .then_some(area / max_fpr);
    (auroc, pro)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The O(n^2) definition: every positive against every negative.
    fn auroc_pairs(pos: &[f64], neg: &[f64]) -> f64 {
        let mut w = 0.0;
        for p in pos {
            for n in neg {
                w += if p > n {
                    1.0
                } else if p == n {
                    0.5
                } else {
                    0.0
                };
            }
        }
        w / (pos.len() * neg.len()) as f64
    }

    #[test]
    fn auroc_by_sorting_equals_the_pairwise_definition() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..50 {
            // Coarse scores, so many ties.
            let pos: Vec<f64> = (0..rng.random_range(1..40))
                .map(|_| rng.random_range(0..12) as f64)
                .collect();
            let neg: Vec<f64> = (0..rng.random_range(1..40))
                .map(|_| rng.random_range(0..9) as f64)
                .collect();
            let a = auroc(&pos, &neg).unwrap();
            assert!((a - auroc_pairs(&pos, &neg)).abs() < 1e-12);
            // The trapezoid area under the ROC curve is the same number.
            let r = roc(&pos, &neg);
            let area: f64 = r
                .windows(2)
                .map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0)
                .sum();
            assert!((area - a).abs() < 1e-12, "{area} vs {a}");
            assert_eq!(*r.last().unwrap(), (1.0, 1.0));
        }
        assert_eq!(auroc(&[], &[1.0]), None);
    }

    #[test]
    fn average_precision_by_hand() {
        // Ranked: .9 P, .8 N, .7 P, .6 N, .5 P -> AP = (1/1 + 2/3 + 3/5) / 3.
        let ap = average_precision(&[0.9, 0.7, 0.5], &[0.8, 0.6]).unwrap();
        assert!((ap - (1.0 + 2.0 / 3.0 + 0.6) / 3.0).abs() < 1e-12, "{ap}");
        // Perfect ranking: 1. A tie of everything: the positive share.
        assert_eq!(average_precision(&[2.0, 3.0], &[1.0]), Some(1.0));
        let tie = average_precision(&[1.0], &[1.0, 1.0, 1.0]).unwrap();
        assert!((tie - 0.25).abs() < 1e-12);
    }

    #[test]
    fn pro_by_hand() {
        // Two regions (sizes 2 and 4) and 10 good pixels. Region 0 scores high, region 1 half high.
        let mut px: Vec<RegionPixel> = vec![
            (0.9, Some(0)),
            (0.9, Some(0)),
            (0.8, Some(1)),
            (0.8, Some(1)),
            (0.1, Some(1)),
            (0.1, Some(1)),
        ];
        px.extend((0..10).map(|i| (0.5 - 0.01 * i as f32, None)));
        // Thresholds .9 -> (fpr 0, pro .5), .8 -> (0, .75), then each good pixel adds fpr .1 at pro .75;
        // up to fpr 0.3 the curve is flat at .75 after the first step at fpr 0: area .75 * .3.
        let (roc_area, a) = pixel_curves(&mut px, &[2, 4], 0.3);
        let a = a.unwrap();
        assert!((a - 0.75).abs() < 1e-9, "{a}");
        // The same sweep's AUROC is the pairwise one: region pixels against good ones.
        let (pos, neg): (Vec<_>, Vec<_>) = px.iter().partition(|p| p.1.is_some());
        let f = |v: Vec<&RegionPixel>| v.iter().map(|p| p.0 as f64).collect::<Vec<_>>();
        assert_eq!(roc_area, auroc(&f(pos), &f(neg)));
        // A perfect map covers every region fully before any good pixel: 1.
        let mut perfect: Vec<RegionPixel> = vec![(1.0, Some(0)), (0.0, None), (0.0, None)];
        assert!((pixel_curves(&mut perfect, &[1], 0.3).1.unwrap() - 1.0).abs() < 1e-9);
        // A map that ranks good pixels first scores near 0.
        let mut worst: Vec<RegionPixel> = (0..10).map(|_| (1.0, None)).collect();
        worst.push((0.0, Some(0)));
        assert!(pixel_curves(&mut worst, &[1], 0.3).1.unwrap() < 1e-9);
        assert_eq!(pixel_curves(&mut [(1.0, None)], &[], 0.3), (None, None));
    }
}
