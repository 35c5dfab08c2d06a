//! Boxes on the right pixels. Each Qwen generation writes boxes in its own convention; this file maps
//! them to pixel coordinates of the image as the user sees it (EXIF orientation applied) and, through
//! the orientation, back to the file's stored pixel grid. It also finds grounding boxes in free text.
//!
//! | family | convention | written as |
//! |---|---|---|
//! | Qwen2-VL | 0..1000 relative to width and height | `<\|box_start\|>(x1,y1),(x2,y2)<\|box_end\|>` |
//! | Qwen2.5-VL | absolute pixels of the resized model input | JSON `{"bbox_2d": [x1, y1, x2, y2], "label"}` |
//! | Qwen3-VL, Qwen3.5 | 0..1000 relative | JSON `bbox_2d` |

use serde::Serialize;

/// How a model's box numbers relate to the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BoxConvention {
    /// Integers 0..=1000, relative to the image's width and height (Qwen2-VL, Qwen3-VL, Qwen3.5).
    Rel1000,
    /// Pixels of the image after the model's resize (Qwen2.5-VL).
    ResizedPixels,
}

impl BoxConvention {
    /// The convention a model family was trained with.
    pub fn for_model_type(model_type: &str) -> BoxConvention {
        match model_type {
            "qwen2_5_vl" => BoxConvention::ResizedPixels,
            _ => BoxConvention::Rel1000,
        }
    }

    /// Parses a spec's `boxes.convention`: a convention or a family name.
    pub fn parse(s: &str) -> Result<BoxConvention, String> {
        match s {
            "rel1000" | "qwen2-vl" | "qwen3-vl" | "qwen3.5" => Ok(BoxConvention::Rel1000),
            "resized-pixels" | "qwen2.5-vl" => Ok(BoxConvention::ResizedPixels),
            other => Err(format!(
                "box convention `{other}` is not one of auto, rel1000, resized-pixels, qwen2-vl, qwen2.5-vl, qwen3-vl, qwen3.5"
            )),
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            BoxConvention::Rel1000 => {
                "as integers from 0 to 1000 relative to the image width and height, (0,0) at the top left"
            }
            BoxConvention::ResizedPixels => "in pixels of the image as you see it, (0,0) at the top left",
        }
    }

    /// Largest coordinate a box may have for an image of `frame` (the schema's bound).
    pub fn max_coordinate(self, frame: &Frame) -> u32 {
        match self {
            BoxConvention::Rel1000 => 1000,
            BoxConvention::ResizedPixels => frame.model.0.max(frame.model.1) as u32,
        }
    }

    /// Maps `[x1, y1, x2, y2]` in this convention to pixels of the upright image, ordered and clamped.
    pub fn to_pixels(self, b: [f64; 4], frame: &Frame) -> PixelBox {
        let (w, h) = (frame.upright.0 as f64, frame.upright.1 as f64);
        let (sx, sy) = match self {
            BoxConvention::Rel1000 => (w / 1000.0, h / 1000.0),
            BoxConvention::ResizedPixels => (w / frame.model.0 as f64, h / frame.model.1 as f64),
        };
        PixelBox::ordered(b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy).clamped(w, h)
    }

    /// The inverse of `to_pixels`: what a perfect answer would write for a pixel box.
    pub fn from_pixels(self, b: &PixelBox, frame: &Frame) -> [f64; 4] {
        let (w, h) = (frame.upright.0 as f64, frame.upright.1 as f64);
        let (sx, sy) = match self {
            BoxConvention::Rel1000 => (1000.0 / w, 1000.0 / h),
            BoxConvention::ResizedPixels => (frame.model.0 as f64 / w, frame.model.1 as f64 / h),
        };
        [b.x1 * sx, b.y1 * sy, b.x2 * sx, b.y2 * sy]
    }
}

/// The geometry of one image: as stored in the file, as shown (EXIF applied), as given to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Frame {
    /// Width and height of the file's stored pixel grid.
    pub stored: (usize, usize),
    /// EXIF orientation 1..=8.
    pub orientation: u8,
    /// Width and height after orientation (what viewers show, what the model saw before resizing).
    pub upright: (usize, usize),
    /// Width and height of the resized model input.
    pub model: (usize, usize),
}

impl Frame {
    pub fn new(upright: (usize, usize), orientation: u8, model: (usize, usize)) -> Frame {
        let stored = if (5..=8).contains(&orientation) {
            (upright.1, upright.0)
        } else {
            upright
        };
        Frame {
            stored,
            orientation,
            upright,
            model,
        }
    }

    /// A point of the upright image in the stored grid (continuous coordinates, corners included).
    pub fn point_to_stored(&self, x: f64, y: f64) -> (f64, f64) {
        let (wu, hu) = (self.upright.0 as f64, self.upright.1 as f64);
        match self.orientation {
            2 => (wu - x, y),      // mirrored left-right
            3 => (wu - x, hu - y), // rotated 180
            4 => (x, hu - y),      // mirrored top-bottom
            5 => (y, x),           // transposed
            6 => (y, wu - x),      // stored rotated 90 clockwise to show
            7 => (hu - y, wu - x), // transverse
            8 => (hu - y, x),      // stored rotated 90 counter-clockwise to show
            _ => (x, y),
        }
    }

    /// A box of the upright image in the file's stored pixel grid.
    pub fn to_stored(&self, b: &PixelBox) -> PixelBox {
        let (ax, ay) = self.point_to_stored(b.x1, b.y1);
        let (bx, by) = self.point_to_stored(b.x2, b.y2);
        PixelBox::ordered(ax, ay, bx, by)
    }
}

/// A box in pixel coordinates: `(x1, y1)` top-left and `(x2, y2)` bottom-right corners, continuous
/// (a box covering pixel column 0 only spans x 0..1).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct PixelBox {
    pub x1: f64,
    pub y1: f64,
    pub x2: f64,
    pub y2: f64,
}

impl PixelBox {
    pub fn ordered(xa: f64, ya: f64, xb: f64, yb: f64) -> PixelBox {
        PixelBox {
            x1: xa.min(xb),
            y1: ya.min(yb),
            x2: xa.max(xb),
            y2: ya.max(yb),
        }
    }

    pub fn clamped(self, w: f64, h: f64) -> PixelBox {
        PixelBox {
            x1: self.x1.clamp(0.0, w),
            y1: self.y1.clamp(0.0, h),
            x2: self.x2.clamp(0.0, w),
            y2: self.y2.clamp(0.0, h),
        }
    }

    pub fn area(&self) -> f64 {
        (self.x2 - self.x1).max(0.0) * (self.y2 - self.y1).max(0.0)
    }

    pub fn iou(&self, o: &PixelBox) -> f64 {
        let inter = PixelBox {
            x1: self.x1.max(o.x1),
            y1: self.y1.max(o.y1),
            x2: self.x2.min(o.x2),
            y2: self.y2.min(o.y2),
        };
        let i = if inter.x2 > inter.x1 && inter.y2 > inter.y1 {
            inter.area()
        } else {
            0.0
        };
        let u = self.area() + o.area() - i;
        if u > 0.0 {
            i / u
        } else {
            0.0
        }
    }

    /// Rounded to whole pixels, as `[x1, y1, x2, y2]`.
    pub fn rounded(&self) -> [i64; 4] {
        [self.x1, self.y1, self.x2, self.y2].map(|v| v.round() as i64)
    }
}

/// A box found in a model's free-text answer, in the model's own numbers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Grounding {
    pub label: Option<String>,
    pub coords: [f64; 4],
}

/// Finds every grounding box in a model's text: Qwen2-VL's `(x1,y1),(x2,y2)` pairs (inside
/// `<|box_start|>`..`<|box_end|>` or bare), with the `<|object_ref_start|>` label before them, and JSON
/// objects with `bbox_2d` (or `box`, `bbox`) and `label` (Qwen2.5-VL, Qwen3-VL), fenced or not.
pub fn parse_groundings(text: &str) -> Vec<Grounding> {
    let mut out = json_groundings(text);
    if out.is_empty() {
        out = tuple_groundings(text);
    }
    out
}

fn json_groundings(text: &str) -> Vec<Grounding> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = text[i..].find(['{', '[']) {
        let at = i + off;
        let mut it =
            serde_json::Deserializer::from_str(&text[at..]).into_iter::<serde_json::Value>();
        match it.next() {
            Some(Ok(v)) => {
                collect_json(&v, &mut out);
                i = at + it.byte_offset().max(1);
            }
            _ => i = at + 1,
        }
    }
    out
}

fn collect_json(v: &serde_json::Value, out: &mut Vec<Grounding>) {
    match v {
        serde_json::Value::Array(items) => items.iter().for_each(|x| collect_json(x, out)),
        serde_json::Value::Object(map) => {
            let coords = ["bbox_2d", "box", "bbox"]
                .iter()
                .find_map(|k| map.get(*k))
                .and_then(|b| b.as_array())
                .filter(|b| b.len() == 4)
                .and_then(|b| {
                    let v: Option<Vec<f64>> = b.iter().map(|x| x.as_f64()).collect();
                    v
                });
            if let Some(c) = coords {
                let label = ["label", "class", "name"]
                    .iter()
                    .find_map(|k| map.get(*k))
                    .and_then(|l| l.as_str())
                    .map(str::to_owned);
                out.push(Grounding {
                    label,
                    coords: [c[0], c[1], c[2], c[3]],
                });
            } else {
                map.values().for_each(|x| collect_json(x, out));
            }
        }
        _ => {}
    }
}

/// Reads a number at the start of `s` (after spaces); returns it and the rest.
fn number(s: &str) -> Option<(f64, &str)> {
    let s = s.trim_start();
    let end = s
        .char_indices()
        .find(|(i, c)| !(c.is_ascii_digit() || *c == '.' || (*i == 0 && *c == '-')))
        .map_or(s.len(), |(i, _)| i);
    let v = s[..end].parse().ok()?;
    Some((v, &s[end..]))
}

fn expect(s: &str, c: char) -> Option<&str> {
    s.trim_start().strip_prefix(c)
}

/// `(x, y)` at the start of `s`.
fn pair(s: &str) -> Option<((f64, f64), &str)> {
    let s = expect(s, '(')?;
    let (x, s) = number(s)?;
    let s = expect(s, ',')?;
    let (y, s) = number(s)?;
    let s = expect(s, ')')?;
    Some(((x, y), s))
}

fn tuple_groundings(text: &str) -> Vec<Grounding> {
    const REF_START: &str = "<|object_ref_start|>";
    const REF_END: &str = "<|object_ref_end|>";
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = text[i..].find('(') {
        let at = i + off;
        let parsed = pair(&text[at..]).and_then(|(a, rest)| {
            let rest = expect(rest, ',')?;
            let (b, rest) = pair(rest)?;
            Some((a, b, rest))
        });
        match parsed {
            Some(((x1, y1), (x2, y2), rest)) => {
                // The label is the last object reference before the box.
                let before = &text[..at];
                let label = before.rfind(REF_END).and_then(|e| {
                    let s = before[..e].rfind(REF_START)? + REF_START.len();
                    let between = &before[e + REF_END.len()..];
                    let only_markers = between.replace("<|box_start|>", "").trim().is_empty();
                    only_markers.then(|| before[s..e].trim().to_owned())
                });
                out.push(Grounding {
                    label,
                    coords: [x1, y1, x2, y2],
                });
                i = text.len() - rest.len();
            }
            None => i = at + 1,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen2_vl_tuples_with_labels() {
        let t = "<|object_ref_start|>the scratch<|object_ref_end|><|box_start|>(120,340),(560,780)<|box_end|> and <|box_start|>(1, 2),(3,4)<|box_end|>";
        let g = parse_groundings(t);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].label.as_deref(), Some("the scratch"));
        assert_eq!(g[0].coords, [120.0, 340.0, 560.0, 780.0]);
        assert_eq!(g[1].label, None);
        assert_eq!(g[1].coords, [1.0, 2.0, 3.0, 4.0]);
        // Special tokens stripped by the decoder leave bare tuples, still found.
        let g = parse_groundings("the dent(10,20),(30,40) is here (not a box)");
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].coords, [10.0, 20.0, 30.0, 40.0]);
    }

    #[test]
    fn json_bbox_2d_fenced_and_bare() {
        let t = "Here:\n```json\n[\n  {\"bbox_2d\": [12, 30, 200, 180], \"label\": \"crack\"},\n  {\"bbox_2d\": [1.5, 2, 3, 4]}\n]\n```";
        let g = parse_groundings(t);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].label.as_deref(), Some("crack"));
        assert_eq!(g[0].coords, [12.0, 30.0, 200.0, 180.0]);
        assert_eq!(g[1].coords, [1.5, 2.0, 3.0, 4.0]);
        let g =
            parse_groundings(r#"{"verdict":"fail","defects":[{"class":"dent","box":[5,6,7,8]}]}"#);
        assert_eq!(
            g,
            vec![Grounding {
                label: Some("dent".into()),
                coords: [5.0, 6.0, 7.0, 8.0]
            }]
        );
        assert!(parse_groundings("no boxes [1, 2] {\"a\": 1}").is_empty());
    }

    #[test]
    fn iou_known_values() {
        let a = PixelBox::ordered(0.0, 0.0, 10.0, 10.0);
        let b = PixelBox::ordered(5.0, 0.0, 15.0, 10.0);
        assert!((a.iou(&b) - 50.0 / 150.0).abs() < 1e-12);
        assert_eq!(a.iou(&a), 1.0);
        assert_eq!(a.iou(&PixelBox::ordered(20.0, 20.0, 30.0, 30.0)), 0.0);
    }
}
