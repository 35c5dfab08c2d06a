//! `loupe learn` from the command line: good images in, a bank file and the calibration table out,
//! the spec's `[anomaly]` then used by `loupe inspect`; bad flags and too few images are one clear line.

mod common;

use std::path::Path;

use common::{fails_clearly, loupe, root, s};
use image::{Rgb, RgbImage};

/// A bright ring on a dark background, shifted by `(dx, dy)`, with a seeded speckle; with `dent`, a
/// dark spot on the ring.
fn ring(dx: i32, dy: i32, seed: u32, dent: bool) -> RgbImage {
    RgbImage::from_fn(112, 112, |x, y| {
        let (fx, fy) = (x as i32 - 56 - dx, y as i32 - 56 - dy);
        let r2 = fx * fx + fy * fy;
        let mut v: i32 = if (169..1296).contains(&r2) { 200 } else { 60 };
        if dent && (fx + 25).pow(2) + fy * fy < 25 {
            v = 60;
        }
        let h = (x.wrapping_mul(73) ^ y.wrapping_mul(151) ^ seed.wrapping_mul(977)) % 7;
        let g = (v + h as i32 - 3) as u8;
        Rgb([g, g, g])
    })
}

/// The cells of a CSV file written by Loupe (quoted cells may hold commas).
fn csv_rows(path: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .map(|line| {
            let (mut cells, mut cell, mut quoted) = (Vec::new(), String::new(), false);
            let mut chars = line.chars().peekable();
            while let Some(c) = chars.next() {
                match c {
                    '"' if quoted && chars.peek() == Some(&'"') => {
                        cell.push('"');
                        chars.next();
                    }
                    '"' => quoted = !quoted,
                    ',' if !quoted => cells.push(std::mem::take(&mut cell)),
                    c => cell.push(c),
                }
            }
            cells.push(cell);
            cells
        })
        .collect()
}

fn write_goods(dir: &Path, n: u32) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        let (dx, dy) = ((i % 7) as i32 - 3, (i % 5) as i32 - 2);
        ring(dx, dy, i, false)
            .save(dir.join(format!("{i:03}.png")))
            .unwrap();
    }
}

/// `rings.toml` in `dir`: the demonstration model, one class, the detector alone.
fn rings_spec(dir: &Path) -> std::path::PathBuf {
    let spec = dir.join("rings.toml");
    let demo = root().join("models/loupe-parts-demo");
    std::fs::write(
        &spec,
        format!(
            "name = \"rings\"\nmodel = \"{}\"\ninstructions = \"Inspect the ring.\"\n[[defects]]\nname = \"dent\"\n\
             [anomaly]\ncombine = \"anomaly\"\n",
            demo.display()
        ),
    )
    .unwrap();
    spec
}

#[test]
fn learn_writes_a_bank_that_inspect_uses() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    write_goods(&good, 44);
    let spec = rings_spec(tmp.path());
    let out = loupe(&[
        "learn",
        "--spec",
        s(&spec),
        "--method",
        "variation",
        "--size",
        "112",
        "--holdout",
        "0.7",
        "--far",
        "0.1",
        s(&good),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    // 44 images, 31 held out: a 10% bound at 95% needs 29.
    assert!(
        out.stdout
            .contains("calibration on 31 held-out good images"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("| 5% | - | - | needs 59 held-out images |"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("at most 10% false alarms"),
        "{}",
        out.stdout
    );
    let bank = tmp.path().join("rings.anomaly.safetensors");
    assert!(bank.is_file(), "the default bank path beside the spec");
    // The bank is as readable as any file this user writes (a service may run as another user).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let plain = tmp.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&bank), mode(&plain), "bank mode {:o}", mode(&bank));
    }
    assert!(
        out.stderr.contains("13 learned from, 31 held out"),
        "{}",
        out.stderr
    );

    // The spec's [anomaly] names that bank by default: inspect flags the dent, passes a good ring.
    let dented = tmp.path().join("dented.png");
    ring(1, 0, 99, true).save(&dented).unwrap();
    let fine = tmp.path().join("fine.png");
    ring(-1, 1, 98, false).save(&fine).unwrap();
    let out_dir = tmp.path().join("out");
    let out = loupe(&[
        "inspect",
        "--spec",
        s(&spec),
        "--no-audit",
        "--json",
        "--out",
        s(&out_dir),
        s(&dented),
        s(&fine),
    ]);
    assert_eq!(out.code, 1, "one part fails: {}", out.stderr);
    let recs: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let by = |name: &str| {
        recs.iter()
            .find(|r| r["image"].as_str().unwrap().ends_with(name))
            .unwrap()
    };
    assert_eq!(by("dented.png")["verdict"], "fail");
    // The report shows each overlay with and without the heatmap, behind one toggle.
    let html = std::fs::read_to_string(out_dir.join("report.html")).unwrap();
    assert!(html.contains("<input type=\"checkbox\" id=\"heat\" checked>"));
    assert_eq!(html.matches("<img class=\"heat\"").count(), 2);
    assert_eq!(html.matches("<img class=\"hv\"").count(), 2);
    assert!(html.contains("anomaly ") && html.contains("(flagged)"));
    let heat = out_dir.join("overlays").read_dir().unwrap().filter(|e| {
        e.as_ref()
            .unwrap()
            .path()
            .to_string_lossy()
            .ends_with(".heat.png")
    });
    assert_eq!(heat.count(), 2);
    assert_eq!(by("dented.png")["anomaly"]["anomalous"], true);
    // Why it failed is in the terminal line's place, the CSV's anomaly columns and the overlay.
    let a = &by("dented.png")["anomaly"];
    let (score, threshold) = (
        a["score"].as_f64().unwrap(),
        a["threshold"].as_f64().unwrap(),
    );
    let mut csv = csv_rows(&out_dir.join("results.csv"));
    let header = csv.remove(0);
    let col = |name: &str| header.iter().position(|h| h == name).expect(name);
    let row = csv.iter().find(|r| r[0].ends_with("dented.png")).unwrap();
    assert_eq!(row[col("verdict")], "fail");
    assert_eq!(row[col("anomaly_flagged")], "true");
    assert!((row[col("anomaly_score")].parse::<f64>().unwrap() - score).abs() < 1e-3);
    assert!((row[col("anomaly_threshold")].parse::<f64>().unwrap() - threshold).abs() < 1e-3);
    assert!(row[col("anomaly_regions")].starts_with('['), "{row:?}");
    assert_eq!(
        row[col("reason")],
        format!("anomaly {score:.3} > {threshold:.3}")
    );
    let overlay = out_dir.join(&row[col("overlay")]);
    let img = image::open(&overlay).unwrap();
    assert!(
        img.width() >= 384,
        "a 112-px part is drawn enlarged: {}",
        img.width()
    );
    let fine = csv.iter().find(|r| r[0].ends_with("fine.png")).unwrap();
    assert_eq!(fine[col("anomaly_flagged")], "false");
    assert!(fine[col("reason")].contains(" <= "), "{fine:?}");
    assert_eq!(by("fine.png")["verdict"], "pass");
    assert_eq!(
        by("fine.png")["output_tokens"],
        0,
        "combine = anomaly runs no VLM"
    );

    // Bad input: one clear line each.
    fails_clearly(
        &loupe(&["learn", "--spec", s(&spec), "--method", "magic", s(&good)]),
        "method `magic` is not one of variation, patchcore",
    );
    // Too few held out for 1%: it learns, and says which rate its threshold does bound.
    let weak = loupe(&[
        "learn",
        "--spec",
        s(&spec),
        "--method",
        "variation",
        "--far",
        "0.01",
        s(&good),
    ]);
    assert_eq!(weak.code, 0, "{}", weak.stderr);
    assert!(
        weak.stderr
            .contains("warning: 13 held-out good images bound false alarms at 21% only")
            && weak.stderr.contains("not the 1% asked: 299 would"),
        "{}",
        weak.stderr
    );
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    fails_clearly(
        &loupe(&[
            "learn",
            "--spec",
            s(&spec),
            "--method",
            "variation",
            s(&empty),
        ]),
        "no good images",
    );
}

/// A class-folder dataset with masks: `loupe learn --dataset --split` learns from half its good
/// rings, and `loupe eval` with the same split scores the rest and the dents, image and pixel level,
/// with the curves drawn in eval.html.
#[test]
fn learn_and_eval_share_a_seeded_split_and_score_the_maps() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("rings");
    write_goods(&data.join("good"), 80);
    std::fs::create_dir_all(data.join("dent")).unwrap();
    std::fs::create_dir_all(data.join("ground_truth/dent")).unwrap();
    for i in 0..10u32 {
        let (dx, dy) = ((i % 5) as i32 - 2, (i % 3) as i32 - 1);
        ring(dx, dy, 500 + i, true)
            .save(data.join(format!("dent/{i:03}.png")))
            .unwrap();
        let mask = image::GrayImage::from_fn(112, 112, |x, y| {
            let (fx, fy) = (x as i32 - 56 - dx + 25, y as i32 - 56 - dy);
            image::Luma([if fx * fx + fy * fy < 25 { 255 } else { 0 }])
        });
        mask.save(data.join(format!("ground_truth/dent/{i:03}_mask.png")))
            .unwrap();
    }
    let spec = rings_spec(tmp.path());
    let out = loupe(&[
        "learn",
        "--spec",
        s(&spec),
        "--method",
        "variation",
        "--size",
        "112",
        "--holdout",
        "0.75",
        "--far",
        "0.1",
        "--dataset",
        s(&data),
        "--split",
        "0.5",
        "--seed",
        "3",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("40 good images (10 learned from, 30 held out)"),
        "{}",
        out.stderr
    );
    let o = tmp.path().join("eval");
    let out = loupe(&[
        "eval",
        "--spec",
        s(&spec),
        "--no-audit",
        "--out",
        s(&o),
        "--split",
        "0.5",
        "--seed",
        "3",
        s(&data),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(o.join("eval.json")).unwrap()).unwrap();
    let m = &e["metrics"];
    assert_eq!(
        (m["good"].as_u64(), m["defective"].as_u64()),
        (Some(40), Some(10))
    );
    // None of the 40 images learned from is scored.
    let scored: Vec<String> = e["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["image"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(scored.len(), 50);
    for key in ["anomaly_auroc", "anomaly_auprc", "pixel_auroc", "pro"] {
        let v = m[key].as_f64().unwrap_or(-1.0);
        assert!(v > 0.8 && v <= 1.0, "{key} = {v}: {m}");
    }
    let at = &m["anomaly_at_threshold"];
    assert!(at["miss_rate"].as_f64().unwrap() <= 0.2, "{at}");
    let html = std::fs::read_to_string(o.join("eval.html")).unwrap();
    assert!(html.contains("<polyline class=\"roc\"") && html.contains("class=\"bar\""));
    assert!(html.contains("PRO up to 30% pixel FPR"));

    // A split share out of range is one clear line.
    fails_clearly(
        &loupe(&[
            "eval",
            "--spec",
            s(&spec),
            "--no-audit",
            "--split",
            "1.5",
            s(&data),
        ]),
        "--split 1.5 is not between 0 and 1",
    );
}

/// `examples/inspection.toml`'s `[anomaly]` section does what its comments say: uncommented, after
/// the `loupe learn` command they give, `loupe inspect` fails a dented part and says why.
#[test]
fn the_example_specs_anomaly_section_works_as_its_comments_say() {
    let tmp = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(root().join("examples/inspection.toml")).unwrap();
    let mut lines = Vec::new();
    let mut in_block = false;
    for line in example.lines() {
        if line == "# [anomaly]" {
            in_block = true;
        }
        if in_block && line.is_empty() {
            in_block = false;
        }
        lines.push(if in_block {
            line.strip_prefix("# ").unwrap_or(line).to_owned()
        } else {
            line.to_owned()
        });
    }
    assert!(
        lines.iter().any(|l| l == "[anomaly]"),
        "the example has an [anomaly] block"
    );
    // The example's paths are relative to examples/.
    let text = lines
        .join("\n")
        .replace("\"../", &format!("\"{}/", root().display()));
    let spec = tmp.path().join("inspection.toml");
    std::fs::write(&spec, text + "\n").unwrap();
    let good = tmp.path().join("good");
    write_goods(&good, 40);
    let learned = loupe(&[
        "learn",
        "--spec",
        s(&spec),
        "--method",
        "variation",
        "--size",
        "112",
        "--holdout",
        "0.5",
        "--far",
        "0.2",
        s(&good),
    ]);
    assert_eq!(learned.code, 0, "{}", learned.stderr);
    assert!(tmp
        .path()
        .join("parts-line-demo.anomaly.safetensors")
        .is_file());
    let dented = tmp.path().join("dented.png");
    ring(0, 0, 7, true).save(&dented).unwrap();
    let out = tmp.path().join("out");
    let r = loupe(&[
        "inspect",
        "--spec",
        s(&spec),
        "--no-audit",
        "--out",
        s(&out),
        s(&dented),
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stdout.contains("FAIL") && r.stdout.contains("anomaly "),
        "{}",
        r.stdout
    );
    let rows = csv_rows(&out.join("results.csv"));
    let col = rows[0].iter().position(|h| h == "anomaly_flagged").unwrap();
    assert_eq!(rows[1][col], "true");
}

/// `loupe learn --backbone DIR`: PatchCore as published on a pretrained backbone in timm's layout
/// (here loupe-core's tiny random ResNet-18 fixture), no VLM loaded; the bank names the backbone and
/// `loupe inspect` scores with it; misuses are one clear line.
#[test]
fn learn_on_a_pretrained_backbone() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    write_goods(&good, 44);
    let spec = rings_spec(tmp.path());
    let backbone = root().join("crates/loupe-core/tests/fixtures/backbones/resnet18_tiny");
    let bank = tmp.path().join("rings.anomaly.safetensors");
    let out = loupe(&[
        "learn",
        "--spec",
        s(&spec),
        "--backbone",
        s(&backbone),
        "--size",
        "112",
        "--holdout",
        "0.7",
        "--far",
        "0.1",
        s(&good),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("features (resnet18 layer2 + layer3)"),
        "{}",
        out.stderr
    );
    let header = loupe_inspect::anomaly::Bank::load(&bank).unwrap().header;
    let r = header.backbone.unwrap();
    assert_eq!(r.architecture, "resnet18");
    assert_eq!(r.stages, ["layer2", "layer3"]);
    assert_eq!(r.dir, backbone.canonicalize().unwrap());
    let fine = tmp.path().join("fine.png");
    ring(-1, 1, 98, false).save(&fine).unwrap();
    let out = loupe(&[
        "inspect",
        "--spec",
        s(&spec),
        "--no-audit",
        "--json",
        s(&fine),
    ]);
    let rec: serde_json::Value = serde_json::from_str(out.stdout.lines().next().unwrap()).unwrap();
    assert!(rec["anomaly"]["score"].as_f64().unwrap() > 0.0, "{rec}");
    assert_eq!(
        rec["anomaly"]["threshold"].as_f64().unwrap() as f32,
        header.threshold
    );

    fails_clearly(
        &loupe(&[
            "learn",
            "--spec",
            s(&spec),
            "--backbone",
            s(&backbone),
            "--layer",
            "2",
            s(&good),
        ]),
        "--backbone is for --method patchcore",
    );
    let nowhere = tmp.path().join("nowhere");
    fails_clearly(
        &loupe(&[
            "learn",
            "--spec",
            s(&spec),
            "--backbone",
            s(&nowhere),
            s(&good),
        ]),
        "nowhere",
    );
}

/// `loupe learn --method padim`: a Gaussian per position of the backbone's stride-4, 8 and 16
/// stages, named in the output and the bank; the bank scores a dented part above a good one through
/// `loupe inspect`; PaDiM without a backbone, and --channels without PaDiM, fail clearly.
#[test]
fn learn_padim_on_a_pretrained_backbone() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    write_goods(&good, 44);
    let spec = rings_spec(tmp.path());
    let backbone = root().join("crates/loupe-core/tests/fixtures/backbones/resnet18_tiny");
    let bank = tmp.path().join("rings.anomaly.safetensors");
    let learn = |extra: &[&str]| {
        let mut args = vec!["learn", "--spec", s(&spec), "--method", "padim"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--holdout", "0.7", "--far", "0.1", s(&good)]);
        loupe(&args)
    };
    let out = learn(&[
        "--backbone",
        s(&backbone),
        "--size",
        "64",
        "--channels",
        "30",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains(
            "padim bank of 256 Gaussians of 30 channels (resnet18 layer1 + layer2 + layer3)"
        ),
        "{}",
        out.stderr
    );
    let header = loupe_inspect::anomaly::Bank::load(&bank).unwrap().header;
    assert_eq!(header.grid, Some([16, 16]));
    let channels = header.channels.unwrap();
    assert_eq!(channels.len(), 30);
    assert!(channels.windows(2).all(|w| w[0] < w[1]) && channels[29] < 48);
    // The same weights as torchvision's `.pth` state dict, read directly: the same threshold.
    let pth_bank = tmp.path().join("pth.anomaly.safetensors");
    let pth = root().join("crates/loupe-core/tests/fixtures/backbones/resnet18_tiny.pth");
    let out = learn(&[
        "--backbone",
        s(&pth),
        "--size",
        "64",
        "--channels",
        "30",
        "--out",
        s(&pth_bank),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let from_pth = loupe_inspect::anomaly::Bank::load(&pth_bank)
        .unwrap()
        .header;
    assert_eq!(from_pth.threshold, header.threshold);
    let r = from_pth.backbone.unwrap();
    assert_eq!(r.architecture, "resnet (basic blocks 1-2-1-1)");
    assert!(r.dir.ends_with("resnet18_tiny.pth"), "{:?}", r.dir);
    let score = |name: &str, dent: bool| {
        let path = tmp.path().join(name);
        ring(1, -1, 99, dent).save(&path).unwrap();
        let out = loupe(&[
            "inspect",
            "--spec",
            s(&spec),
            "--no-audit",
            "--json",
            s(&path),
        ]);
        let rec: serde_json::Value =
            serde_json::from_str(out.stdout.lines().next().unwrap()).unwrap();
        // Exit status 1 when the part fails: the anomaly decides here.
        assert_eq!(
            out.code,
            i32::from(rec["verdict"] == "fail"),
            "{}",
            out.stderr
        );
        (
            rec["anomaly"]["score"].as_f64().unwrap(),
            rec["anomaly"]["anomalous"].clone(),
        )
    };
    let (fine, dented) = (score("fine.png", false), score("dented.png", true));
    // Measured: 6.7 and 24.5 against a threshold of 12.4.
    assert!(dented.0 > fine.0, "dented {dented:?} vs fine {fine:?}");
    assert_eq!((&fine.1, &dented.1), (&false.into(), &true.into()));

    fails_clearly(&learn(&[]), "--method padim runs on a pretrained backbone");
    fails_clearly(
        &loupe(&["learn", "--spec", s(&spec), "--channels", "10", s(&good)]),
        "--channels is for --method padim",
    );
}

/// `loupe learn --backbone DINO_DIR` (DINOv2 with registers, DINOv3): PatchCore on a ViT's
/// multi-layer patch tokens (not pooled), named in the output and the bank, scoring through
/// `loupe inspect`; PaDiM refuses a ViT clearly.
#[test]
fn learn_on_a_dino_backbone() {
    for (fixture, stages) in [
        (
            "dinov2_registers_tiny",
            "features (dinov2_with_registers encoder.layer.1 + encoder.layer.2)",
        ),
        ("dinov3_tiny", "features (dinov3_vit layer.1 + layer.2)"),
    ] {
        learn_on_a_vit(fixture, stages);
    }
}

fn learn_on_a_vit(fixture: &str, stages: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    write_goods(&good, 44);
    let spec = rings_spec(tmp.path());
    let backbone = root()
        .join("crates/loupe-core/tests/fixtures/backbones")
        .join(fixture);
    let bank = tmp.path().join("rings.anomaly.safetensors");
    let learn = |method: &str| {
        loupe(&[
            "learn",
            "--spec",
            s(&spec),
            "--method",
            method,
            "--backbone",
            s(&backbone),
            "--size",
            "56",
            "--holdout",
            "0.7",
            "--far",
            "0.1",
            s(&good),
        ])
    };
    let out = learn("patchcore");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains(stages), "{}", out.stderr);
    let header = loupe_inspect::anomaly::Bank::load(&bank).unwrap().header;
    assert!(!header.pool);
    assert_eq!(header.feature_dim, Some(64));
    let fine = tmp.path().join("fine.png");
    ring(1, -1, 99, false).save(&fine).unwrap();
    let out = loupe(&[
        "inspect",
        "--spec",
        s(&spec),
        "--no-audit",
        "--json",
        s(&fine),
    ]);
    let rec: serde_json::Value = serde_json::from_str(out.stdout.lines().next().unwrap()).unwrap();
    assert!(rec["anomaly"]["score"].as_f64().unwrap() > 0.0, "{rec}");
    fails_clearly(&learn("padim"), "is a ViT with one grid");
}
