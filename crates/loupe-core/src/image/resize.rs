//! Antialiased separable resampling of 8-bit RGB, bit-exact with torchvision's uint8 path
//! (`resize(..., antialias=True)` on a uint8 tensor), which is what transformers' default Qwen2-VL
//! image processor runs. The algorithm is Pillow's (horizontal pass, then vertical, each rounded to
//! 8 bits); torchvision differs from Pillow only in quantizing the weights to 16 bits with a precision
//! chosen from the largest weight, and that is reproduced here. Pillow's own resize differs from this
//! by at most 2 levels on some pixels.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Bilinear,
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => (1.0 - x).max(0.0),
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// For each output index: the first input index and the integer weights of its window.
struct Coeffs {
    starts: Vec<usize>,
    lens: Vec<usize>,
    ksize: usize,
    weights: Vec<i32>,
    precision: u32,
}

/// The window of every output index: its first input index and its weights, normalized to sum to
/// 1 (the antialiased filter of Pillow and of PyTorch's `antialias=True`, widened by the scale when
/// shrinking), at most `2 ceil(support) + 1` of them.
pub fn windows(in_size: usize, out_size: usize, filter: Filter) -> Vec<(usize, Vec<f64>)> {
    let scale = in_size as f64 / out_size as f64;
    let (support, inv) = if scale >= 1.0 {
        (filter.support() * scale, 1.0 / scale)
    } else {
        (filter.support(), 1.0)
    };
    let ksize = support.ceil() as usize * 2 + 1;
    (0..out_size)
        .map(|i| {
            let center = scale * (i as f64 + 0.5);
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin).min(ksize);
            let mut w: Vec<f64> = (0..n)
                .map(|j| filter.weight((j as f64 + xmin as f64 - center + 0.5) * inv))
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|w| *w /= total);
            }
            (xmin, w)
        })
        .collect()
}

fn coeffs(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let windows = windows(in_size, out_size, filter);
    let scale = in_size as f64 / out_size as f64;
    let ksize = (filter.support() * scale.max(1.0)).ceil() as usize * 2 + 1;
    let mut starts = Vec::with_capacity(out_size);
    let mut lens = Vec::with_capacity(out_size);
    let mut wf = vec![0.0f64; out_size * ksize];
    let mut wmax = 0.0f64;
    for (i, (xmin, w)) in windows.into_iter().enumerate() {
        wf[i * ksize..i * ksize + w.len()].copy_from_slice(&w);
        wmax = w.iter().fold(wmax, |m, &x| m.max(x));
        starts.push(xmin);
        lens.push(w.len());
    }
    // torchvision: the largest precision (< 22 bits) at which the largest weight still fits in i16.
    let mut precision = 0u32;
    while precision < 22 {
        let next = (0.5 + wmax * f64::from(1u32 << (precision + 1))) as i64;
        if next >= (1 << 15) {
            break;
        }
        precision += 1;
    }
    let one = f64::from(1u32 << precision);
    let weights = wf
        .iter()
        .map(|&w| {
            let v = w * one;
            (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i16 as i32
        })
        .collect();
    Coeffs {
        starts,
        lens,
        ksize,
        weights,
        precision,
    }
}

#[inline]
fn clip8(acc: i32, precision: u32) -> u8 {
    (acc >> precision).clamp(0, 255) as u8
}

fn horizontal(src: &[u8], w: usize, h: usize, out_w: usize, filter: Filter) -> Vec<u8> {
    let c = coeffs(w, out_w, filter);
    let init = 1i32 << (c.precision.max(1) - 1);
    let mut out = vec![0u8; out_w * h * 3];
    for y in 0..h {
        let row = &src[y * w * 3..(y + 1) * w * 3];
        let orow = &mut out[y * out_w * 3..(y + 1) * out_w * 3];
        for x in 0..out_w {
            let ws = &c.weights[x * c.ksize..x * c.ksize + c.lens[x]];
            let base = c.starts[x] * 3;
            let (mut r, mut g, mut b) = (init, init, init);
            for (j, &wj) in ws.iter().enumerate() {
                let p = base + j * 3;
                r += i32::from(row[p]) * wj;
                g += i32::from(row[p + 1]) * wj;
                b += i32::from(row[p + 2]) * wj;
            }
            orow[x * 3] = clip8(r, c.precision);
            orow[x * 3 + 1] = clip8(g, c.precision);
            orow[x * 3 + 2] = clip8(b, c.precision);
        }
    }
    out
}

fn vertical(src: &[u8], w: usize, h: usize, out_h: usize, filter: Filter) -> Vec<u8> {
    let c = coeffs(h, out_h, filter);
    let init = 1i32 << (c.precision.max(1) - 1);
    let stride = w * 3;
    let mut out = vec![0u8; out_h * stride];
    let mut acc = vec![0i32; stride];
    for y in 0..out_h {
        acc.fill(init);
        let ws = &c.weights[y * c.ksize..y * c.ksize + c.lens[y]];
        for (j, &wj) in ws.iter().enumerate() {
            let row = &src[(c.starts[y] + j) * stride..(c.starts[y] + j + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += i32::from(p) * wj;
            }
        }
        for (o, &a) in out[y * stride..(y + 1) * stride].iter_mut().zip(&acc) {
            *o = clip8(a, c.precision);
        }
    }
    out
}

/// Resizes packed RGB8 (`w * h * 3` bytes) to `out_w x out_h`. A dimension whose size is unchanged is
/// not resampled, as in the reference.
pub fn resize_rgb(
    src: &[u8],
    w: usize,
    h: usize,
    out_w: usize,
    out_h: usize,
    filter: Filter,
) -> Vec<u8> {
    assert_eq!(
        src.len(),
        w * h * 3,
        "resize_rgb: buffer does not match {w}x{h} RGB"
    );
    let horiz = if out_w != w {
        horizontal(src, w, h, out_w, filter)
    } else {
        src.to_vec()
    };
    if out_h != h {
        vertical(&horiz, out_w, h, out_h, filter)
    } else {
        horiz
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(97, 84), (211, 196), (33, 56), (640, 28), (5, 980)] {
            for f in [Filter::Bilinear, Filter::Bicubic] {
                let c = coeffs(i, o, f);
                let one = 1i32 << c.precision;
                for x in 0..o {
                    let s: i32 = c.weights[x * c.ksize..x * c.ksize + c.lens[x]].iter().sum();
                    assert!(
                        (s - one).abs() <= c.lens[x] as i32,
                        "{i}->{o} {f:?} x={x} sum={s} one={one}"
                    );
                    assert!(c.starts[x] + c.lens[x] <= i);
                }
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![77u8; 37 * 23 * 3];
        for (ow, oh) in [(56, 28), (14, 14), (37, 100)] {
            let out = resize_rgb(&src, 37, 23, ow, oh, Filter::Bicubic);
            assert!(out.iter().all(|&v| v == 77), "{ow}x{oh}");
        }
    }
}
