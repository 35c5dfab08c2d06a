//! From the model's JSON answer to a verdict: defects with boxes in pixels, and the spec's rule.

use serde::{Deserialize, Serialize};

use crate::boxes::{BoxConvention, Frame, PixelBox};
use crate::spec::Spec;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
        }
    }
}

/// One defect the model found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Finding {
    pub class: String,
    /// The box as the model wrote it, in its convention.
    pub box_model: [f64; 4],
    /// The box in pixels of the image as shown (EXIF orientation applied).
    #[serde(rename = "box")]
    pub box_px: [i64; 4],
    /// The box in the file's stored pixel grid (differs from `box` for EXIF-rotated files).
    pub box_stored: [i64; 4],
    pub note: String,
    /// Not written; a record read back (`--resume`) gets it from `box`.
    #[serde(skip)]
    pub pixel_box: PixelBox,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// The spec's rule applied to the answer.
    pub verdict: Outcome,
    /// What the model itself said.
    pub model_verdict: Outcome,
    pub defects: Vec<Finding>,
}

#[derive(Deserialize)]
struct Answer {
    verdict: Outcome,
    defects: Vec<AnswerDefect>,
}

#[derive(Deserialize)]
struct AnswerDefect {
    class: String,
    #[serde(rename = "box")]
    bbox: [f64; 4],
    #[serde(default)]
    note: String,
}

/// Parses a constrained answer; the message says what was wrong (an unfinished answer, mostly).
pub fn parse_answer(
    text: &str,
    spec: &Spec,
    convention: BoxConvention,
    frame: &Frame,
) -> Result<Verdict, String> {
    let a: Answer = serde_json::from_str(text).map_err(|e| {
        format!(
            "the answer is not a complete verdict ({e}); raise decoding.max_tokens if it was cut"
        )
    })?;
    let mut defects = Vec::with_capacity(a.defects.len());
    for d in a.defects {
        if !spec.defects.iter().any(|c| c.name == d.class) {
            return Err(format!(
                "the answer names an unknown defect class `{}`",
                d.class
            ));
        }
        let px = convention.to_pixels(d.bbox, frame);
        defects.push(Finding {
            class: d.class,
            box_model: d.bbox,
            box_px: px.rounded(),
            box_stored: frame.to_stored(&px).rounded(),
            note: d.note,
            pixel_box: px,
        });
    }
    let failing = defects
        .iter()
        .filter(|d| spec.rule.fail_on.contains(&d.class))
        .count();
    let fail = failing >= spec.rule.min_defects
        || (spec.rule.trust_model_verdict && a.verdict == Outcome::Fail);
    Ok(Verdict {
        verdict: if fail { Outcome::Fail } else { Outcome::Pass },
        model_verdict: a.verdict,
        defects,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn spec(rule: &str) -> Spec {
        let src = format!(
            "name = \"t\"\ninstructions = \"i\"\n[[defects]]\nname = \"scratch\"\n[[defects]]\nname = \"stain\"\n[rule]\n{rule}\n"
        );
        Spec::parse(&src, Path::new("t.toml")).unwrap()
    }

    #[test]
    fn rule_decides_and_boxes_map() {
        let frame = Frame::new((200, 100), 1, (224, 112));
        let s = spec("fail_on = [\"scratch\"]\ntrust_model_verdict = false");
        let v = parse_answer(
            r#"{"verdict":"pass","defects":[{"class":"scratch","box":[100,200,300,400],"note":"x"}]}"#,
            &s,
            BoxConvention::Rel1000,
            &frame,
        )
        .unwrap();
        assert_eq!(v.verdict, Outcome::Fail);
        assert_eq!(v.model_verdict, Outcome::Pass);
        assert_eq!(v.defects[0].box_px, [20, 20, 60, 40]);
        // A stain alone does not fail under this rule, and the model's "fail" is not trusted.
        let v = parse_answer(
            r#"{"verdict":"fail","defects":[{"class":"stain","box":[0,0,1000,1000],"note":""}]}"#,
            &s,
            BoxConvention::Rel1000,
            &frame,
        )
        .unwrap();
        assert_eq!(v.verdict, Outcome::Pass);
        let trusting = spec("min_defects = 2");
        let v = parse_answer(
            r#"{"verdict":"fail","defects":[]}"#,
            &trusting,
            BoxConvention::Rel1000,
            &frame,
        )
        .unwrap();
        assert_eq!(v.verdict, Outcome::Fail);
        let e = parse_answer(
            r#"{"verdict":"fail","defe"#,
            &trusting,
            BoxConvention::Rel1000,
            &frame,
        )
        .unwrap_err();
        assert!(e.contains("not a complete verdict"), "{e}");
        let e = parse_answer(
            r#"{"verdict":"fail","defects":[{"class":"rust","box":[1,2,3,4]}]}"#,
            &trusting,
            BoxConvention::Rel1000,
            &frame,
        )
        .unwrap_err();
        assert!(e.contains("`rust`"), "{e}");
    }
}
