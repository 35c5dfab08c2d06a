//! Scores that match anomalib: Loupe's published PatchCore and its PaDiM against anomalib 2.7.0's
//! own `PatchcoreModel` and `PadimModel` (tools/make_patchcore_reference.py and
//! tools/make_padim_reference.py, pinned in tools/requirements-anomalib.txt) on the same backbone
//! weights (loupe-core's tiny random ResNet-18 fixture) and the same images.
//! - PatchCore, the full bank of patch features: every image score (the paper's reweighting
//!   included) and every pixel of the smoothed anomaly map within 1e-4 of anomalib's, relative to
//!   the largest.
//! - PaDiM, the same 20 of the 48 channels: within 2e-5 (anomalib inverts each covariance in f32;
//!   Loupe factors it in f64; measured 3e-6).

use std::path::{Path, PathBuf};

use loupe_core::image::RgbImage;
use loupe_core::models::backbone::Backbone;
use loupe_inspect::anomaly::padim::{embedding, Gaussians};
use loupe_inspect::anomaly::patchcore::{backbone_features, published_score};

/// The images' side.
const SIZE: usize = 64;

/// A reference folder written by one of the tools: anomalib's figures and its images.
struct Reference {
    dir: PathBuf,
    json: serde_json::Value,
    /// anomalib's anomaly map of each test image, row-major.
    maps: Vec<Vec<f32>>,
}

impl Reference {
    fn load(name: &str) -> Reference {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let json =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        let maps = candle_core::safetensors::load(
            dir.join("reference.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()["maps"]
            .to_vec3::<f32>()
            .unwrap()
            .into_iter()
            .map(|m| m.concat())
            .collect();
        Reference { dir, json, maps }
    }

    fn image(&self, name: &str) -> RgbImage {
        loupe_core::image::decode(&std::fs::read(self.dir.join(name)).unwrap()).unwrap()
    }

    /// Checks each test image's score and map, from `score_of`, against anomalib's within
    /// `tolerance` (relative to the score and to the map's largest value), and that the dented
    /// parts score above the good one.
    fn check(&self, tolerance: f32, score_of: impl Fn(&RgbImage) -> (f32, Vec<f32>)) {
        let scores = self.json["scores"].as_array().unwrap();
        let mut got_scores = Vec::new();
        for (i, (want_score, want_map)) in scores.iter().zip(&self.maps).enumerate() {
            let (score, map) = score_of(&self.image(&format!("test_{i}.png")));
            let want_score = want_score.as_f64().unwrap() as f32;
            assert!(
                (score - want_score).abs() <= tolerance * want_score,
                "image {i}: score {score} vs anomalib's {want_score}"
            );
            let scale = want_map.iter().fold(0f32, |a, v| a.max(v.abs()));
            let worst = map
                .iter()
                .zip(want_map)
                .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
            assert!(
                worst <= tolerance * scale,
                "image {i}: map off by {worst} (largest {scale})"
            );
            got_scores.push(score);
        }
        assert!(got_scores[1] > got_scores[0] && got_scores[2] > got_scores[0]);
    }
}

fn tiny_resnet() -> Backbone {
    Backbone::load(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../crates/loupe-core/tests/fixtures/backbones/resnet18_tiny"),
    )
    .unwrap()
}

#[test]
fn published_patchcore_scores_as_anomalib_does() {
    let r = Reference::load("patchcore_anomalib");
    let backbone = tiny_resnet();
    let stages = backbone.patchcore_stages();
    let mut bank = Vec::new();
    let mut dim = 0;
    for i in 0..6 {
        let img = r.image(&format!("train_{i}.png"));
        let g = backbone_features(&backbone, &stages, &img, SIZE, SIZE).unwrap();
        assert_eq!((g.gh, g.gw), (8, 8));
        dim = g.dim;
        bank.extend(g.v);
    }
    assert_eq!(dim as u64, r.json["feature_dim"].as_u64().unwrap());
    assert_eq!(
        (bank.len() / dim) as u64,
        r.json["bank_size"].as_u64().unwrap()
    );
    r.check(1e-4, |img| {
        let g = backbone_features(&backbone, &stages, img, SIZE, SIZE).unwrap();
        published_score(&bank, &g, SIZE, SIZE).unwrap()
    });
}

#[test]
fn padim_scores_as_anomalib_does() {
    let r = Reference::load("padim_anomalib");
    let backbone = tiny_resnet();
    let stages = backbone.padim_stages();
    let names: Vec<&str> = stages
        .iter()
        .map(|&i| backbone.stages()[i].name.as_str())
        .collect();
    assert_eq!(names, ["layer1", "layer2", "layer3"]);
    let channels: Vec<usize> = r.json["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap() as usize)
        .collect();
    let goods: Vec<_> = (0..8)
        .map(|i| {
            let img = r.image(&format!("train_{i}.png"));
            embedding(&backbone, &stages, &channels, &img, SIZE, SIZE).unwrap()
        })
        .collect();
    let gaussians = Gaussians::fit(&goods).unwrap();
    assert_eq!(
        [gaussians.dim, gaussians.gh * gaussians.gw],
        [20, 256],
        "anomalib's mean is {}",
        r.json["mean_shape"]
    );
    r.check(2e-5, |img| {
        let g = embedding(&backbone, &stages, &channels, img, SIZE, SIZE).unwrap();
        gaussians.score(&g, SIZE, SIZE).unwrap()
    });
}
