//! Scores that match anomalib: Loupe's published PatchCore against anomalib 2.7.0's own
//! `PatchcoreModel` (tools/make_patchcore_reference.py, pinned in tools/requirements-anomalib.txt) on
//! the same backbone weights (loupe-core's tiny random ResNet-18 fixture), the same images and the
//! full bank of patch features: every image score (the paper's reweighting included) and every pixel
//! of the smoothed anomaly map within 1e-4 of anomalib's, relative to the largest.

use std::path::{Path, PathBuf};

use loupe_core::models::backbone::Backbone;
use loupe_inspect::anomaly::patchcore::{backbone_features, published_score};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn image(path: &Path) -> loupe_core::image::RgbImage {
    loupe_core::image::decode(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn published_patchcore_scores_as_anomalib_does() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/patchcore_anomalib");
    let backbone =
        Backbone::load(&root().join("crates/loupe-core/tests/fixtures/backbones/resnet18_tiny"))
            .unwrap();
    let stages = backbone.patchcore_stages();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("reference.json")).unwrap())
            .unwrap();
    let maps = candle_core::safetensors::load(
        fixture.join("reference.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let maps: Vec<Vec<f32>> = maps["maps"]
        .to_vec3::<f32>()
        .unwrap()
        .into_iter()
        .map(|m| m.concat())
        .collect();
    let (w, h) = (64, 64);

    let mut bank = Vec::new();
    let mut dim = 0;
    for i in 0..6 {
        let g = backbone_features(
            &backbone,
            &stages,
            &image(&fixture.join(format!("train_{i}.png"))),
            w,
            h,
        )
        .unwrap();
        assert_eq!((g.gh, g.gw), (8, 8));
        dim = g.dim;
        bank.extend(g.v);
    }
    assert_eq!(dim as u64, reference["feature_dim"].as_u64().unwrap());
    assert_eq!(
        (bank.len() / dim) as u64,
        reference["bank_size"].as_u64().unwrap()
    );

    let scores = reference["scores"].as_array().unwrap();
    let mut got_scores = Vec::new();
    for (i, (want_score, want_map)) in scores.iter().zip(&maps).enumerate() {
        let img = image(&fixture.join(format!("test_{i}.png")));
        let g = backbone_features(&backbone, &stages, &img, w, h).unwrap();
        let (score, map) = published_score(&bank, &g, w, h).unwrap();
        let want_score = want_score.as_f64().unwrap() as f32;
        assert!(
            (score - want_score).abs() <= 1e-4 * want_score,
            "image {i}: score {score} vs anomalib's {want_score}"
        );
        let scale = want_map.iter().fold(0f32, |a, v| a.max(v.abs()));
        let worst = map
            .iter()
            .zip(want_map)
            .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
        assert!(
            worst <= 1e-4 * scale,
            "image {i}: map off by {worst} (largest {scale})"
        );
        got_scores.push(score);
    }
    // The dented parts score above the good one, as anomalib says.
    assert!(got_scores[1] > got_scores[0] && got_scores[2] > got_scores[0]);
}
