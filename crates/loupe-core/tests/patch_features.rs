//! `patch_features` (what anomaly detection learns from): block `L`'s output of the vision tower,
//! run only up to that block, equals the same block's output inside the full forward, in the
//! preprocessor's patch order, on every family.

mod common;

use candle_core::{DType, Tensor};
use loupe_core::{Engine, LoadOptions};

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap()
}

fn check(name: &str, window_order: bool) {
    let e = Engine::load(
        common::fixtures().join(name).to_str().unwrap(),
        &LoadOptions::default(),
    )
    .unwrap();
    let images = Engine::load_images(&[common::fixtures().join("images/odd_97x211.png")]).unwrap();
    let px = e.preprocessor.preprocess(&images).unwrap();
    let depth = e.model.vision_depth();
    assert!(depth >= 2, "{name}: depth {depth}");
    for layer in [0, depth - 1] {
        let tap = format!("vision.block.{layer}");
        e.model.taps().capture(&[&tap]);
        e.model.encode_images(&px).unwrap();
        let full = e.model.taps().take();
        assert_eq!(full.len(), 1, "{name}: {tap} captured once");
        let want = rows(&full[0].1);
        let got = rows(&e.model.patch_features(&px, layer).unwrap());
        assert_eq!(got.len(), px.n_patches(), "{name} layer {layer}");
        if window_order {
            // Qwen2.5-VL runs its blocks in window order and hands back the preprocessor's: the
            // same rows, permuted.
            let key = |r: &Vec<f32>| r.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let mut a: Vec<_> = got.iter().map(key).collect();
            let mut b: Vec<_> = want.iter().map(key).collect();
            assert_ne!(
                a, b,
                "{name}: the window order differs from the preprocessor's here"
            );
            a.sort();
            b.sort();
            assert_eq!(a, b, "{name} layer {layer}");
        } else {
            assert_eq!(got, want, "{name} layer {layer}");
        }
    }
    let err = e.model.patch_features(&px, depth).unwrap_err().to_string();
    assert!(
        err.contains(&format!("vision layer {depth} does not exist")),
        "{err}"
    );
}

#[test]
fn block_features_equal_the_full_forward_on_every_family() {
    check("qwen2_vl/gqa2_tied_published", false);
    check("qwen2_5_vl/win56_gqa2_tied_v5", true);
    check("qwen3_vl/ds2_gqa2_tied_v5", false);
    check("qwen3_5/hybrid_lla_l_gqa2_tied_v5", false);
}
