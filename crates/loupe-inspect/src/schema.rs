//! The JSON schema of an answer, derived from the spec: the model cannot write invalid JSON, a class
//! the spec does not name, a box with other than four coordinates, or a coordinate out of range.

use serde_json::{json, Value};

use crate::spec::Spec;

/// `{"verdict": "pass"|"fail", "defects": [{"class", "box": [x1, y1, x2, y2], "note"}]}`, keys in
/// that order, coordinates integers in `0..=max_coordinate`.
pub fn verdict_schema(spec: &Spec, max_coordinate: u32) -> Value {
    let classes: Vec<&str> = spec.defects.iter().map(|d| d.name.as_str()).collect();
    json!({
        "type": "object",
        "properties": {
            "verdict": {"enum": ["pass", "fail"]},
            "defects": {
                "type": "array",
                "maxItems": spec.decoding.max_defects,
                "items": {
                    "type": "object",
                    "properties": {
                        "class": {"enum": classes},
                        "box": {
                            "type": "array",
                            "items": {"type": "integer", "minimum": 0, "maximum": max_coordinate},
                            "minItems": 4,
                            "maxItems": 4
                        },
                        "note": {"type": "string", "maxLength": spec.decoding.max_note_chars}
                    },
                    "required": ["class", "box", "note"],
                    "additionalProperties": false
                }
            }
        },
        "required": ["verdict", "defects"],
        "additionalProperties": false
    })
}
