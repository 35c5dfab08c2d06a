//! Learning from good parts: on synthetic washers (drawn here, seeded: position, size, light and
//! noise vary), a detector learned from good images only flags a drawn defect and places it, its
//! calibrated threshold holds its stated false-alarm rate on fresh good images, and a saved bank
//! scores as the learned one. Both methods: the variation model, and the patch-feature bank on the
//! demonstration model's own vision tower.

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use loupe_inspect::anomaly::{self, Bank, LearnOptions, Method};
use loupe_inspect::spec::Augment;
use rand::{Rng, SeedableRng};

const SIZE: u32 = 112;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A washer on a conveyor; with `dent`, a dark spot at that point (on the washer's ring).
fn washer(rng: &mut impl Rng, dent: Option<(f32, f32)>) -> RgbImage {
    let (cx, cy) = (
        56.0 + rng.random_range(-5.0..5.0),
        56.0 + rng.random_range(-5.0..5.0),
    );
    let r_out = 36.0 + rng.random_range(-1.5..1.5);
    let r_in = 13.0 + rng.random_range(-1.0..1.0);
    let light = rng.random_range(0.9..1.1);
    let bg = 60.0 + rng.random_range(-8.0..8.0);
    RgbImage::from_fn(SIZE, SIZE, |x, y| {
        let (fx, fy) = (x as f32, y as f32);
        let r = ((fx - cx).powi(2) + (fy - cy).powi(2)).sqrt();
        let mut v = if r < r_out && r > r_in {
            200.0 * light
        } else {
            bg + 10.0 * fx / SIZE as f32
        };
        if let Some((dx, dy)) = dent {
            if ((fx - cx - dx).powi(2) + (fy - cy - dy).powi(2)).sqrt() < 5.0 {
                v *= 0.35;
            }
        }
        let n: f32 = (0..3).map(|_| rng.random_range(-3.0f32..3.0)).sum();
        let g = (v + n).clamp(0.0, 255.0) as u8;
        Rgb([g, g, (g as f32 * 0.97) as u8])
    })
}

/// Writes `n` good washers under `dir`, returns their paths.
fn goods(dir: &Path, n: usize, seed: u64) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let p = dir.join(format!("good_{i:03}.png"));
            washer(&mut rng, None).save(&p).unwrap();
            p
        })
        .collect()
}

fn to_loupe(img: &RgbImage) -> loupe_core::image::RgbImage {
    loupe_core::image::RgbImage {
        width: img.width() as usize,
        height: img.height() as usize,
        data: img.as_raw().clone(),
        orientation: 1,
    }
}

fn opts(method: Method) -> LearnOptions {
    LearnOptions {
        method,
        layer: None,
        width: SIZE as usize,
        height: SIZE as usize,
        coreset_fraction: 0.25,
        pool: false,
        backbone: None,
        channels: None,
        holdout: 0.5,
        calibrate_on: None,
        augment: Vec::new(),
        far: 0.1,
        confidence: 0.95,
        seed: 3,
        max_rotation: 2.0,
    }
}

fn check(method: Method, engine: Option<&loupe_core::Engine>) {
    let tmp = tempfile::tempdir().unwrap();
    let train = goods(&tmp.path().join("good"), 64, 1);
    let learned = anomaly::learn(engine, &train, &opts(method), &mut |_, _, _| {}).unwrap();
    let bank = &learned.bank;
    let h = &bank.header;
    assert_eq!((h.trained_on, h.calibrated_on), (32, 32));
    assert_eq!(h.threshold, h.calibration.threshold);
    assert!(h.calibration.achieved >= 0.95, "{:?}", h.calibration);

    // Fresh good parts (another seed): the false-alarm rate keeps to the stated bound.
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let fresh: Vec<f32> = (0..60)
        .map(|_| {
            bank.score(engine, &to_loupe(&washer(&mut rng, None)))
                .unwrap()
                .score
        })
        .collect();
    let alarms = fresh.iter().filter(|&&s| s > h.threshold).count();
    assert!(
        alarms as f64 / fresh.len() as f64 <= 0.1 + 0.05,
        "{method:?}: {alarms} of 60 fresh good parts flagged (threshold {}, scores {fresh:?})",
        h.threshold
    );

    // Dented parts: flagged, the map's peak at the dent.
    let mut flagged = 0;
    for k in 0..12 {
        let a = k as f32 * 0.52;
        let dent = (25.0 * a.cos(), 25.0 * a.sin());
        let mut rng = rand::rngs::StdRng::seed_from_u64(500 + k);
        let img = washer(&mut rng, Some(dent));
        let s = bank.score(engine, &to_loupe(&img)).unwrap();
        if s.score > h.threshold {
            flagged += 1;
        }
        // The peak of the map, in image pixels, lies near the dent (the part's centre moves by at
        // most 5 px; a patch-grid map is coarse: one cell is SIZE / grid pixels).
        let (mw, mh) = (s.map.w, s.map.h);
        let at = s
            .map
            .v
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0;
        let (px, py) = (
            ((at % mw) as f32 + 0.5) * SIZE as f32 / mw as f32,
            ((at / mw) as f32 + 0.5) * SIZE as f32 / mh as f32,
        );
        let (tx, ty) = (56.0 + dent.0, 56.0 + dent.1);
        let cell = SIZE as f32 / mw as f32;
        let dist = ((px - tx).powi(2) + (py - ty).powi(2)).sqrt();
        assert!(
            dist <= 7.0 + 1.5 * cell,
            "{method:?} dent {k}: peak at ({px}, {py}), dent at ({tx}, {ty})"
        );
    }
    assert!(
        flagged >= 11,
        "{method:?}: only {flagged} of 12 dents flagged"
    );

    // Saved and read back, the bank scores the same.
    let file = tmp.path().join("bank.safetensors");
    bank.save(&file).unwrap();
    let back = Bank::load(&file).unwrap();
    assert_eq!(back.header.threshold, h.threshold);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let img = to_loupe(&washer(&mut rng, Some((20.0, 10.0))));
    assert_eq!(
        back.score(engine, &img).unwrap().score,
        bank.score(engine, &img).unwrap().score
    );
}

#[test]
fn variation_model_flags_a_dent_and_keeps_its_false_alarm_rate() {
    check(Method::Variation, None);
}

#[test]
fn patch_bank_on_the_vlm_tower_flags_a_dent_and_keeps_its_false_alarm_rate() {
    let demo = root().join("models/loupe-parts-demo");
    let engine = loupe_core::Engine::load(demo.to_str().unwrap(), &Default::default()).unwrap();
    check(Method::Patchcore, Some(&engine));
}

/// The tiny random ResNet-18 of loupe-core's backbone fixtures (timm's layout).
fn tiny_backbone() -> PathBuf {
    root().join("crates/loupe-core/tests/fixtures/backbones/resnet18_tiny")
}

/// PatchCore as published on a pretrained-backbone folder, no VLM loaded at all. The backbone here
/// is a tiny random ResNet-18 (loupe-core's fixture): a weak feature extractor, so this checks the
/// pipeline's properties, not its accuracy: its calibrated threshold keeps the false-alarm rate on
/// fresh good parts, dented parts score above good ones on average, the map covers the image at
/// its size with finite values, and the bank scores the same once saved and read back.
/// (tests/backbone_patchcore.rs checks the numbers against anomalib's.)
#[test]
fn patch_bank_on_a_backbone_keeps_its_false_alarm_rate() {
    let tmp = tempfile::tempdir().unwrap();
    let train = goods(&tmp.path().join("good"), 64, 1);
    let o = LearnOptions {
        backbone: Some(tiny_backbone()),
        ..opts(Method::Patchcore)
    };
    let learned = anomaly::learn(None, &train, &o, &mut |_, _, _| {}).unwrap();
    let bank = &learned.bank;
    let h = &bank.header;
    assert!(h.calibration.achieved >= 0.95, "{:?}", h.calibration);
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let fresh: Vec<f32> = (0..60)
        .map(|_| {
            bank.score(None, &to_loupe(&washer(&mut rng, None)))
                .unwrap()
                .score
        })
        .collect();
    let alarms = fresh.iter().filter(|&&s| s > h.threshold).count();
    assert!(alarms <= 9, "{alarms} of 60 fresh good parts flagged");
    let dented: Vec<f32> = (0..12)
        .map(|k| {
            let a = k as f32 * 0.52;
            let mut rng = rand::rngs::StdRng::seed_from_u64(500 + k);
            let img = washer(&mut rng, Some((25.0 * a.cos(), 25.0 * a.sin())));
            let s = bank.score(None, &to_loupe(&img)).unwrap();
            assert_eq!((s.map.w, s.map.h), (SIZE as usize, SIZE as usize));
            assert!(s.map.v.iter().all(|v| v.is_finite() && *v >= 0.0));
            s.score
        })
        .collect();
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    assert!(
        mean(&dented) > mean(&fresh),
        "dents {dented:?} vs good {fresh:?}"
    );
    let file = tmp.path().join("bank.safetensors");
    bank.save(&file).unwrap();
    let back = Bank::load(&file).unwrap();
    let img = to_loupe(&washer(
        &mut rand::rngs::StdRng::seed_from_u64(7),
        Some((20.0, 10.0)),
    ));
    assert_eq!(
        back.score(None, &img).unwrap().score,
        bank.score(None, &img).unwrap().score
    );
}

/// A bank learned on a backbone names it in its header; read back with other weights in that
/// folder, it refuses to score rather than give numbers on features it was not learned on.
#[test]
fn a_backbone_bank_refuses_other_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("backbone");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny_backbone().join(f), dir.join(f)).unwrap();
    }
    let train = goods(&tmp.path().join("good"), 40, 5);
    let o = LearnOptions {
        backbone: Some(dir.clone()),
        holdout: 0.8,
        ..opts(Method::Patchcore)
    };
    let learned = anomaly::learn(None, &train, &o, &mut |_, _, _| {}).unwrap();
    let r = learned.bank.header.backbone.clone().unwrap();
    assert_eq!(
        (r.architecture.as_str(), r.stages.clone()),
        ("resnet18", vec!["layer2".into(), "layer3".into()])
    );
    assert_eq!(learned.bank.header.feature_dim, Some(16 + 24));
    let file = tmp.path().join("bank.safetensors");
    learned.bank.save(&file).unwrap();
    assert!(Bank::load(&file).is_ok());
    // Other weights of the same architecture in the same place.
    let other = root().join("crates/loupe-core/tests/fixtures/backbones/wide_resnet50_2_tiny");
    std::fs::copy(
        other.join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let e = Bank::load(&file).err().unwrap().to_string();
    assert!(
        e.contains("SHA-256") && e.contains("learn the bank again"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    let e = Bank::load(&file).err().unwrap().to_string();
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn bad_banks_and_too_few_images_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let few = goods(&tmp.path().join("few"), 20, 2);
    // Too few held out for 10% at 95%: it learns, and states the rate 10 images bound (26%).
    let weak = anomaly::learn(None, &few, &opts(Method::Variation), &mut |_, _, _| {}).unwrap();
    let c = weak.bank.header.calibration;
    assert_eq!((c.n, c.exceedances), (10, 0));
    assert!((c.far - (1.0 - 0.05f64.powf(0.1))).abs() < 1e-12, "{c:?}");
    let top = weak
        .held_out_scores
        .iter()
        .copied()
        .fold(f32::MIN, f32::max);
    assert_eq!(c.threshold, top);
    let e = anomaly::learn(None, &few[..1], &opts(Method::Variation), &mut |_, _, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("one image cannot both be learned from") && e.contains("augment"),
        "{e}"
    );
    let not_bank = tmp.path().join("x.safetensors");
    std::fs::write(&not_bank, b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ").unwrap();
    let e = Bank::load(&not_bank).err().unwrap().to_string();
    assert!(
        e.contains("x.safetensors") && e.contains("not written by loupe learn"),
        "{e}"
    );
    std::fs::write(&not_bank, b"junk").unwrap();
    let e = Bank::load(&not_bank).err().unwrap().to_string();
    assert!(e.contains("not a safetensors file"), "{e}");
}

/// The spec's `[anomaly]` in the inspector: the record carries score, threshold and the region
/// boxes, and `combine` decides the verdict (`anomaly` without running the VLM at all).
#[test]
fn inspector_records_the_anomaly_and_combines_it_with_the_vlm() {
    use loupe_inspect::inspector::{Inspector, ReuseMode};
    use loupe_inspect::verdict::Outcome;
    let demo = root().join("models/loupe-parts-demo");
    let engine = loupe_core::Engine::load(demo.to_str().unwrap(), &Default::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let train = goods(&tmp.path().join("good"), 64, 1);
    let learned =
        anomaly::learn(None, &train, &opts(Method::Variation), &mut |_, _, _| {}).unwrap();
    learned
        .bank
        .save(&tmp.path().join("washers.anomaly.safetensors"))
        .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let good = tmp.path().join("part_good.png");
    washer(&mut rng, None).save(&good).unwrap();
    let dented = tmp.path().join("part_dent.png");
    washer(&mut rng, Some((-25.0, 0.0))).save(&dented).unwrap();
    let spec_for = |combine: &str| {
        let p = tmp.path().join(format!("{combine}.toml"));
        std::fs::write(
            &p,
            format!(
                "name = \"washers\"\ninstructions = \"Inspect the washer.\"\n[[defects]]\nname = \"dent\"\n\
                 [anomaly]\nbank = \"washers.anomaly.safetensors\"\ncombine = \"{combine}\"\n"
            ),
        )
        .unwrap();
        loupe_inspect::Spec::load(&p).unwrap()
    };

    let mut alone = Inspector::new(&engine, spec_for("anomaly"), ReuseMode::Prefix).unwrap();
    let (rec, _) = alone.inspect(&dented);
    let a = rec.anomaly.clone().expect("an anomaly finding");
    assert!(a.anomalous && a.score > a.threshold, "{a:?}");
    assert_eq!(rec.verdict, Some(Outcome::Fail));
    assert_eq!(
        (rec.model_verdict, rec.output_tokens),
        (None, 0),
        "the VLM did not run"
    );
    // The largest region covers the dent (its centre is 5 px from the part's, which moves 5 px).
    let r = a.regions[0];
    let (dx, dy) = (56.0 - 25.0, 56.0);
    assert!(
        (r[0] as f32) < dx + 6.0
            && (r[2] as f32) > dx - 6.0
            && (r[1] as f32) < dy + 6.0
            && (r[3] as f32) > dy - 6.0,
        "region {r:?} misses the dent at ({dx}, {dy})"
    );
    // The overlay outlines the region in the anomaly colour and tints the dent red.
    let (rec, upright) = alone.inspect(&dented);
    let ov = loupe_inspect::overlay::draw(
        upright.as_ref().unwrap(),
        &rec,
        true,
        &["dent".to_string()],
        "washers",
    );
    // The 112-px part is drawn enlarged, under a banner that says why it failed.
    let zoom = ov.width() / SIZE;
    assert!(zoom >= 3, "{} px across", ov.width());
    let banner = ov.height() - SIZE * zoom;
    let why = rec.anomaly.as_ref().unwrap().summary();
    assert!(why.contains(" > "), "{why}");
    assert_eq!(rec.reason(), why);
    let outlined = ov
        .enumerate_pixels()
        .filter(|(_, y, p)| *y >= banner && p.0 == loupe_inspect::overlay::ANOMALY.0)
        .count();
    assert!(outlined > 20, "{outlined} outline pixels");
    let centre = ov.get_pixel((56 - 25) * zoom, 56 * zoom + banner).0;
    assert!(
        centre[0] as i32 - centre[1] as i32 > 20,
        "the dent is not tinted: {centre:?}"
    );
    let (rec, _) = alone.inspect(&good);
    assert_eq!(rec.verdict, Some(Outcome::Pass), "{:?}", rec.anomaly);

    // `either` fails the dented part whatever the VLM says; `both` passes it unless the VLM fails it.
    let mut either = Inspector::new(&engine, spec_for("either"), ReuseMode::Prefix).unwrap();
    let (rec, _) = either.inspect(&dented);
    assert!(
        rec.model_verdict.is_some() && rec.output_tokens > 0,
        "the VLM ran: {:?}",
        rec.error
    );
    assert_eq!(rec.verdict, Some(Outcome::Fail));
    let mut vlm = Inspector::new(&engine, spec_for("vlm"), ReuseMode::Prefix).unwrap();
    let (by_vlm, _) = vlm.inspect(&dented);
    assert!(
        by_vlm.anomaly.as_ref().is_some_and(|a| a.anomalous),
        "vlm still records the score"
    );
    let mut both = Inspector::new(&engine, spec_for("both"), ReuseMode::Prefix).unwrap();
    let (rec, _) = both.inspect(&dented);
    assert_eq!(rec.verdict, by_vlm.verdict);
    let (rec, _) = both.inspect(&good);
    assert_eq!(rec.verdict, Some(Outcome::Pass));

    // `classify`: the detector decides, and the VLM names each flagged region from a close-up; a
    // good part costs no answer at all.
    let mut classify = Inspector::new(&engine, spec_for("classify"), ReuseMode::Prefix).unwrap();
    let (rec, _) = classify.inspect(&dented);
    assert_eq!(rec.error, None);
    assert_eq!(rec.verdict, Some(Outcome::Fail));
    let a = rec.anomaly.as_ref().unwrap();
    assert!(!rec.defects.is_empty() && rec.output_tokens > 0, "{rec:?}");
    assert_eq!(
        rec.defects.len(),
        a.regions.len().min(classify.spec.decoding.max_defects)
    );
    for (d, r) in rec.defects.iter().zip(&a.regions) {
        assert_eq!(d.box_px, *r, "each finding is its region");
        assert!(["dent", "other"].contains(&d.class.as_str()), "{}", d.class);
    }
    let (rec, _) = classify.inspect(&good);
    assert_eq!(
        (rec.verdict, rec.output_tokens),
        (Some(Outcome::Pass), 0),
        "{:?}",
        rec.anomaly
    );

    // A missing bank is refused with the spec named.
    std::fs::remove_file(tmp.path().join("washers.anomaly.safetensors")).unwrap();
    let e = Inspector::new(&engine, spec_for("either"), ReuseMode::Prefix)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("either.toml") && e.contains("loupe learn"),
        "{e}"
    );
}

/// A separate calibration set: every good image is learned from, the threshold set on the others
/// (the order statistic of their scores); an image in both sets is a clear error, and too few to
/// calibrate on state the weaker rate they bound.
#[test]
fn calibrating_on_a_separate_set() {
    let tmp = tempfile::tempdir().unwrap();
    let train = goods(&tmp.path().join("train"), 6, 5);
    let cal = goods(&tmp.path().join("cal"), 30, 6);
    let o = LearnOptions {
        calibrate_on: Some(cal.clone()),
        ..opts(Method::Variation)
    };
    let learned = anomaly::learn(None, &train, &o, &mut |_, _, _| {}).unwrap();
    let h = &learned.bank.header;
    assert_eq!((h.trained_on, h.calibrated_on), (6, 30));
    assert_eq!(learned.held_out_scores.len(), 30);
    // The threshold is one of the calibration images' own scores.
    assert!(
        learned.held_out_scores.contains(&h.threshold),
        "{}",
        h.threshold
    );
    let mut both = cal.clone();
    both.push(train[0].clone());
    let e = anomaly::learn(
        None,
        &train,
        &LearnOptions {
            calibrate_on: Some(both),
            ..opts(Method::Variation)
        },
        &mut |_, _, _| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("both learned from and calibrated on"), "{e}");
    let weak = anomaly::learn(
        None,
        &train,
        &LearnOptions {
            calibrate_on: Some(cal[..10].to_vec()),
            ..opts(Method::Variation)
        },
        &mut |_, _, _| {},
    )
    .unwrap();
    assert!(weak.bank.header.calibration.far > 0.25);
}

/// A few good images go further with the changes the spec allows: each is learned as it is and
/// flipped and turned (the full bank grows by that factor, and the header says which), and a
/// turned good part then scores like a good one, where without them it scores like a defect.
#[test]
fn few_good_images_learn_in_every_allowed_view() {
    let tmp = tempfile::tempdir().unwrap();
    let few = goods(&tmp.path().join("few"), 4, 8);
    let plain = LearnOptions {
        backbone: Some(tiny_backbone()),
        coreset_fraction: 1.0,
        ..opts(Method::Patchcore)
    };
    let views = [Augment::Hflip, Augment::Rot90, Augment::Rot180];
    let augmented = LearnOptions {
        augment: views.to_vec(),
        ..plain.clone()
    };
    let a = anomaly::learn(None, &few, &plain, &mut |_, _, _| {}).unwrap();
    let b = anomaly::learn(None, &few, &augmented, &mut |_, _, _| {}).unwrap();
    assert_eq!(b.bank.len(), 4 * a.bank.len());
    assert_eq!(b.bank.header.augment, views);
    assert!(a.bank.header.augment.is_empty());
    // 2 held out: the rate they bound at 95% (78%), not the 10% asked.
    assert!((b.bank.header.calibration.far - 0.776).abs() < 1e-3);
    // A good part turned a quarter: the augmented bank has seen that view.
    let mut rng = rand::rngs::StdRng::seed_from_u64(31);
    let turned = Augment::Rot90.apply(&to_loupe(&washer(&mut rng, None)));
    let (sa, sb) = (
        a.bank.score(None, &turned).unwrap().score,
        b.bank.score(None, &turned).unwrap().score,
    );
    assert!(sb <= sa, "augmented {sb} vs plain {sa}");
    // One image: learned in all 4 views; its threshold the largest score of each augmented view
    // against the bank learned without that view, stated as bounding nothing.
    let one = anomaly::learn(None, &few[..1], &augmented, &mut |_, _, _| {}).unwrap();
    let h = &one.bank.header;
    assert_eq!((h.trained_on, h.calibrated_on), (1, 0));
    assert_eq!(one.bank.len(), b.bank.len() / (few.len() - 2));
    assert_eq!(one.held_out_scores.len(), views.len());
    let top = one.held_out_scores.iter().copied().fold(f32::MIN, f32::max);
    assert!(top > 0.0 && top.is_finite(), "{top}");
    assert_eq!((h.threshold, h.calibration.threshold), (top, top));
    assert_eq!((h.calibration.far, h.calibration.n), (1.0, 0));
    assert_eq!(h.calibration.achieved, 0.0);
    assert!(one.table.iter().all(|row| row.is_err()));
    // Each view's score is against a bank without it: the full bank scores that view near 0
    // (the distances summed in f32).
    let first = to_loupe(&image::open(&few[0]).unwrap().to_rgb8());
    let full = one
        .bank
        .score(None, &Augment::Rot90.apply(&first))
        .unwrap()
        .score;
    assert!(full < 0.01 * top, "{full} vs {top}");
}
