//! Boxes land on the right pixels: for every EXIF orientation, both conventions, non-square images and
//! resized model inputs, a perfect answer maps back onto the marked block of the shown image and of the
//! file's stored pixels. The orientation itself is applied by the `image` crate (what decoding uses),
//! so the inverse mapping is checked against an independent implementation.

use image::metadata::Orientation;
use image::{DynamicImage, Rgb, RgbImage};
use loupe_core::image::smart_resize;
use loupe_inspect::boxes::{BoxConvention, Frame, PixelBox};

/// The bounding box of the red pixels.
fn red_box(img: &RgbImage) -> PixelBox {
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for (x, y, p) in img.enumerate_pixels() {
        if p.0 == [255, 0, 0] {
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x + 1);
            y1 = y1.max(y + 1);
        }
    }
    PixelBox::ordered(x0 as f64, y0 as f64, x1 as f64, y1 as f64)
}

fn close(a: &PixelBox, b: &PixelBox, tol: f64) -> bool {
    (a.x1 - b.x1).abs() <= tol
        && (a.y1 - b.y1).abs() <= tol
        && (a.x2 - b.x2).abs() <= tol
        && (a.y2 - b.y2).abs() <= tol
}

#[test]
fn every_orientation_and_convention_maps_back_to_the_marked_pixels() {
    let (sw, sh) = (300u32, 170u32);
    let mut stored = RgbImage::from_pixel(sw, sh, Rgb([40, 40, 40]));
    let truth_stored = PixelBox::ordered(30.0, 20.0, 110.0, 61.0);
    for y in 20..61 {
        for x in 30..110 {
            stored.put_pixel(x, y, Rgb([255, 0, 0]));
        }
    }
    for exif in 1u8..=8 {
        let mut img = DynamicImage::ImageRgb8(stored.clone());
        img.apply_orientation(Orientation::from_exif(exif).unwrap());
        let shown = img.to_rgb8();
        let truth_shown = red_box(&shown);
        let (uw, uh) = (shown.width() as usize, shown.height() as usize);
        let (mh, mw) = smart_resize(uh, uw, 28, 3136, 40_000).unwrap();
        let frame = Frame::new((uw, uh), exif, (mw, mh));
        assert_eq!(
            frame.stored,
            (sw as usize, sh as usize),
            "orientation {exif}"
        );
        for conv in [BoxConvention::Rel1000, BoxConvention::ResizedPixels] {
            // What a perfect model writes: the shown box in its own numbers, rounded to integers.
            let written = conv.from_pixels(&truth_shown, &frame).map(f64::round);
            let px = conv.to_pixels(written, &frame);
            // Rounding to integers in the convention costs at most one unit of its scale.
            let tol = match conv {
                BoxConvention::Rel1000 => uw.max(uh) as f64 / 1000.0,
                BoxConvention::ResizedPixels => uw.max(uh) as f64 / mw.min(mh) as f64,
            };
            assert!(
                close(&px, &truth_shown, tol),
                "{exif} {conv:?}: {px:?} vs {truth_shown:?}"
            );
            let back = frame.to_stored(&px);
            assert!(
                close(&back, &truth_stored, tol),
                "{exif} {conv:?}: stored {back:?} vs {truth_stored:?}"
            );
        }
    }
}

#[test]
fn conventions_differ_as_documented() {
    // A 640x480 photo resized to 644x476 for the model: the same box in each convention's numbers.
    let frame = Frame::new((640, 480), 1, (644, 476));
    let px = BoxConvention::Rel1000.to_pixels([250.0, 500.0, 750.0, 1000.0], &frame);
    assert_eq!(px.rounded(), [160, 240, 480, 480]);
    let px = BoxConvention::ResizedPixels.to_pixels([161.0, 238.0, 483.0, 476.0], &frame);
    assert_eq!(px.rounded(), [160, 240, 480, 480]);
    // Out-of-range and reversed numbers are ordered and clamped to the image.
    let px = BoxConvention::Rel1000.to_pixels([1200.0, 900.0, -5.0, 100.0], &frame);
    assert_eq!(px.rounded(), [0, 48, 640, 432]);
}

#[test]
fn exif_rotated_jpeg_reports_its_orientation() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/images/rotated_exif6.jpg");
    let img = loupe_core::image::load(&p).unwrap();
    assert_eq!(img.orientation, 6);
    let frame = Frame::new(
        (img.width, img.height),
        img.orientation,
        (img.width, img.height),
    );
    assert_eq!(frame.stored, (img.height, img.width));
    // The shown image's top-left corner is the stored image's bottom-left (rotated 90 clockwise).
    let corner = frame.to_stored(&PixelBox::ordered(0.0, 0.0, 10.0, 10.0));
    assert_eq!(
        corner.rounded(),
        [0, img.width as i64 - 10, 10, img.width as i64]
    );
}
