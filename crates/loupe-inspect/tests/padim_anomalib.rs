//! Scores that match anomalib: Loupe's PaDiM against anomalib 2.7.0's own `PadimModel`
//! (tools/make_padim_reference.py, pinned in tools/requirements-anomalib.txt) on the same backbone
//! weights (loupe-core's tiny random ResNet-18 fixture), the same images and the same 20 of the 48
//! channels: every image score and every pixel of the smoothed anomaly map within 2e-5 of
//! anomalib's, relative to the largest (anomalib inverts each covariance in f32; Loupe factors it in
//! f64; measured 3e-6).

use std::path::{Path, PathBuf};

use loupe_core::models::backbone::Backbone;
use loupe_inspect::anomaly::padim::{embedding, Gaussians};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn image(path: &Path) -> loupe_core::image::RgbImage {
    loupe_core::image::decode(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn padim_scores_as_anomalib_does() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/padim_anomalib");
    let backbone =
        Backbone::load(&root().join("crates/loupe-core/tests/fixtures/backbones/resnet18_tiny"))
            .unwrap();
    let stages = backbone.padim_stages();
    let names: Vec<&str> = stages
        .iter()
        .map(|&i| backbone.stages()[i].name.as_str())
        .collect();
    assert_eq!(names, ["layer1", "layer2", "layer3"]);
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("reference.json")).unwrap())
            .unwrap();
    let channels: Vec<usize> = reference["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap() as usize)
        .collect();
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

    let goods: Vec<_> = (0..8)
        .map(|i| {
            let img = image(&fixture.join(format!("train_{i}.png")));
            embedding(&backbone, &stages, &channels, &img, w, h).unwrap()
        })
        .collect();
    let gaussians = Gaussians::fit(&goods).unwrap();
    assert_eq!(
        [gaussians.dim, gaussians.gh * gaussians.gw],
        [20, 256],
        "anomalib's mean is {}",
        reference["mean_shape"]
    );

    let scores = reference["scores"].as_array().unwrap();
    let mut got_scores = Vec::new();
    for (i, (want_score, want_map)) in scores.iter().zip(&maps).enumerate() {
        let img = image(&fixture.join(format!("test_{i}.png")));
        let g = embedding(&backbone, &stages, &channels, &img, w, h).unwrap();
        let (score, map) = gaussians.score(&g, w, h).unwrap();
        let want_score = want_score.as_f64().unwrap() as f32;
        assert!(
            (score - want_score).abs() <= 2e-5 * want_score,
            "image {i}: score {score} vs anomalib's {want_score}"
        );
        let worst = map
            .iter()
            .zip(want_map)
            .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
        assert!(
            worst <= 2e-5 * want_score,
            "image {i}: map off by {worst} (largest {want_score})"
        );
        got_scores.push(score);
    }
    // The dented parts score above the good one, as anomalib says.
    assert!(got_scores[1] > got_scores[0] && got_scores[2] > got_scores[0]);
}
