//! Image files to model pixels: decode, EXIF orientation, RGB conversion, resize, normalize, patchify.

mod preprocess;
mod resize;

pub use preprocess::{smart_resize, ImageInput, PixelBatch, Preprocessor};
pub use resize::{resize_rgb, windows as resize_windows, Filter};

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use crate::error::{Error, Result};

/// An 8-bit RGB image in row-major order, upright (EXIF orientation applied).
#[derive(Debug, Clone)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
    /// The EXIF orientation (1..=8) that was applied to the stored pixels; 1 when none. Boxes found on
    /// this upright image map back to the file's stored pixel grid through it.
    pub orientation: u8,
}

/// Reads an image file (JPEG, PNG, WebP, GIF, BMP, TIFF) the way the reference does: EXIF orientation
/// applied, transparency composited onto white, grayscale expanded to RGB.
pub fn load(path: &Path) -> Result<RgbImage> {
    let bytes = crate::limits::read_file(path, crate::limits::get().image_bytes, "image-bytes")
        .map_err(|e| match e {
            Error::Limit {
                found, limit, name, ..
            } => Error::Limit {
                what: format!("image {}", path.display()),
                found,
                limit,
                name,
            },
            e => e,
        })?;
    decode(&bytes).map_err(|msg| Error::image(path, msg))
}

/// Decodes image bytes; the error is a message for the caller to attach the source to.
pub fn decode(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    if bytes.is_empty() {
        return Err("the file is empty".into());
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    let format = reader.format();
    if format.is_none() {
        return Err("not a recognised image format (JPEG, PNG, WebP, GIF, BMP or TIFF)".into());
    }
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| format!("cannot decode: {e}"))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(format!("the image has no pixels ({w}x{h})"));
    }
    let max_pixels = crate::limits::get().image_pixels;
    if u64::from(w) * u64::from(h) > max_pixels {
        return Err(format!(
            "{w}x{h} is {} pixels, over the limit of {max_pixels} (raise it with --allow image-pixels=N)",
            u64::from(w) * u64::from(h)
        ));
    }
    // The decoder's own allocations (a frame buffer, ICC or EXIF chunks) are bounded too: the
    // decoded frame at 8 bytes a pixel (16-bit RGBA), plus room for its metadata.
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(u64::from(w) * u64::from(h) * 8 + (64 << 20));
    decoder
        .set_limits(limits)
        .map_err(|e| format!("cannot decode: {e}"))?;
    let orientation = decoder
        .orientation()
        .map_err(|e| format!("cannot read EXIF: {e}"))?;
    let exact_jpeg = if format == Some(ImageFormat::Jpeg) {
        decode_jpeg(bytes)?
    } else {
        None
    };
    let mut img = match exact_jpeg {
        Some(rgb) => DynamicImage::ImageRgb8(rgb),
        None => DynamicImage::from_decoder(decoder).map_err(|e| format!("cannot decode: {e}"))?,
    };
    img.apply_orientation(orientation);
    let mut rgb = to_rgb(img);
    rgb.orientation = orientation.to_exif();
    Ok(rgb)
}

/// Decodes a JPEG with libjpeg-turbo's decoder (default islow IDCT and fancy upsampling), the one
/// Pillow and torchvision use, so the pixels are the reference's bit for bit. `None` for colour spaces
/// it does not convert to RGB (CMYK, YCCK), which fall back to the `image` crate.
fn decode_jpeg(bytes: &[u8]) -> std::result::Result<Option<image::RgbImage>, String> {
    if is_truncated_jpeg(bytes) {
        return Err(
            "the JPEG data is truncated (no end-of-image marker after the last scan)".into(),
        );
    }
    let run = || -> std::io::Result<Option<image::RgbImage>> {
        let d = mozjpeg::Decompress::new_mem(bytes)?;
        if matches!(
            d.color_space(),
            mozjpeg::ColorSpace::JCS_CMYK | mozjpeg::ColorSpace::JCS_YCCK
        ) {
            return Ok(None);
        }
        let mut started = d.rgb()?;
        let (w, h) = (started.width() as u32, started.height() as u32);
        let data: Vec<u8> = started.read_scanlines::<u8>()?;
        started.finish()?;
        Ok(image::RgbImage::from_raw(w, h, data))
    };
    match crate::error::contain(run) {
        Ok(Ok(img)) => Ok(img),
        Ok(Err(e)) => Err(format!("cannot decode JPEG: {e}")),
        Err(msg) => Err(format!("cannot decode JPEG: {msg}")),
    }
}

/// A JPEG cut short: no end-of-image marker (FF D9) after the last start-of-scan (FF DA). Entropy-coded
/// data cannot contain either marker, so this holds for baseline and progressive files alike; Pillow
/// refuses such files too.
fn is_truncated_jpeg(bytes: &[u8]) -> bool {
    let last_sos = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    match last_sos {
        Some(i) => !bytes[i..].windows(2).any(|w| w == [0xFF, 0xD9]),
        None => true,
    }
}

/// RGB as the reference converts: images with an alpha channel are composited onto white with
/// Pillow's integer arithmetic (`Image.alpha_composite`), others converted directly.
fn to_rgb(img: DynamicImage) -> RgbImage {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let data = if img.color().has_alpha() {
        let rgba = img.to_rgba8();
        let mut out = Vec::with_capacity(width * height * 3);
        for px in rgba.pixels() {
            let a = u32::from(px[3]);
            for c in 0..3 {
                out.push(composite_on_white(u32::from(px[c]), a));
            }
        }
        out
    } else {
        img.to_rgb8().into_raw()
    };
    RgbImage {
        width,
        height,
        data,
        orientation: 1,
    }
}

/// Pillow's `alpha_composite` of (value, alpha) over an opaque white background, bit for bit.
fn composite_on_white(v: u32, a: u32) -> u8 {
    const PRECISION_BITS: u32 = 7;
    if a == 0 {
        return 255;
    }
    let coef1 = a << PRECISION_BITS;
    let coef2 = (255 << PRECISION_BITS) - coef1;
    let tmp = v * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
    (((tmp >> 8) + tmp) >> 8 >> PRECISION_BITS) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_matches_exact_blend_within_rounding() {
        // Property: the integer blend is within 1 of the exact blend, and opaque / transparent are exact.
        for v in 0..=255u32 {
            for a in 0..=255u32 {
                let exact = (v as f64 * a as f64 + 255.0 * (255 - a) as f64) / 255.0;
                let got = composite_on_white(v, a) as f64;
                assert!(
                    (got - exact).abs() <= 1.0,
                    "v={v} a={a} got={got} exact={exact}"
                );
            }
            assert_eq!(composite_on_white(v, 255), v as u8);
            assert_eq!(composite_on_white(v, 0), 255);
        }
    }

    #[test]
    fn rejects_empty_and_garbage() {
        assert!(decode(&[]).unwrap_err().contains("empty"));
        assert!(decode(b"hello world, not an image").is_err());
    }
}
