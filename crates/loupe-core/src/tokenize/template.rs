//! Chat templates: the Jinja source shipped with the checkpoint, rendered with minijinja the way
//! transformers renders it (trim_blocks, lstrip_blocks, Python string methods).

use std::path::Path;

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::Serialize;
use serde_json::Value;

use crate::error::{read_json, Error, Result};

/// One part of a message's content, serialized as transformers' chat format expects.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Content {
    Image,
    Text { text: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub role: String,
    pub content: Vec<Content>,
}

impl Message {
    pub fn system(text: &str) -> Self {
        Message {
            role: "system".into(),
            content: vec![Content::Text { text: text.into() }],
        }
    }

    /// A user turn: the images first, in the order given, then the text (as Qwen's examples do).
    pub fn user(n_images: usize, text: &str) -> Self {
        let mut content = vec![Content::Image; n_images];
        if !text.is_empty() {
            content.push(Content::Text { text: text.into() });
        }
        Message {
            role: "user".into(),
            content,
        }
    }

    pub fn assistant(text: &str) -> Self {
        Message {
            role: "assistant".into(),
            content: vec![Content::Text { text: text.into() }],
        }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// `enable_thinking` for templates that read it (Qwen3, Qwen3.5): `None` leaves it undefined, so
    /// the template's own default applies.
    pub enable_thinking: Option<bool>,
    /// Text-only models' templates take each message's content as one string, not a list of parts.
    pub text_content: bool,
}

impl ChatTemplate {
    /// Finds the template: `chat_template.jinja`, `chat_template.json`, or `tokenizer_config.json`'s
    /// `chat_template` field, in transformers' order.
    pub fn find(chat_template: Option<&Path>, tokenizer_config: Option<&Path>) -> Result<Self> {
        let tok_cfg: Option<Value> = tokenizer_config.map(read_json).transpose()?;
        let special = |name: &str| -> Option<String> {
            let v = tok_cfg.as_ref()?.get(name)?;
            v.as_str()
                .map(str::to_owned)
                .or_else(|| v.get("content").and_then(Value::as_str).map(str::to_owned))
        };
        let source = match chat_template {
            Some(p) if p.extension().is_some_and(|e| e == "jinja") => {
                let bytes = crate::limits::read_file(p, crate::limits::get().text_bytes, "text-bytes")?;
                String::from_utf8(bytes)
                    .map_err(|_| Error::config(p, "chat_template", "is not UTF-8 text"))?
            }
            Some(p) => {
                let v: Value = read_json(p)?;
                template_field(&v)
                    .ok_or_else(|| Error::config(p, "chat_template", "missing or not a string"))?
            }
            None => tok_cfg.as_ref().and_then(template_field).ok_or_else(|| {
                Error::Template("the model has no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json)".into())
            })?,
        };
        let mut t = Self::from_source(source)?;
        t.bos_token = special("bos_token");
        t.eos_token = special("eos_token");
        Ok(t)
    }

    pub fn from_source(source: String) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // A template is code from the checkpoint: bound the steps it may take (nested loops would
        // otherwise run for hours) and, at render, the text it may write.
        env.set_fuel(Some(crate::limits::get().template_steps));
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source)
            .map_err(|e| Error::Template(format!("cannot parse the model's template: {e}")))?;
        Ok(ChatTemplate {
            env,
            bos_token: None,
            eos_token: None,
            enable_thinking: None,
            text_content: false,
        })
    }

    /// The `bos_token` and `eos_token` the template may write (from a GGUF's metadata).
    pub fn with_special_tokens(mut self, bos: Option<String>, eos: Option<String>) -> Self {
        self.bos_token = bos;
        self.eos_token = eos;
        self
    }

    /// Renders a conversation, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        let flat: Vec<Value>;
        let messages = if self.text_content {
            flat = messages
                .iter()
                .map(|m| {
                    let text: String = m
                        .content
                        .iter()
                        .filter_map(|c| match c {
                            Content::Text { text } => Some(text.as_str()),
                            Content::Image => None,
                        })
                        .collect();
                    serde_json::json!({"role": m.role, "content": text})
                })
                .collect();
            minijinja::Value::from_serialize(&flat)
        } else {
            minijinja::Value::from_serialize(messages)
        };
        let ctx = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        let ctx = match self.enable_thinking {
            Some(on) => context! { enable_thinking => on, ..ctx },
            None => ctx,
        };
        let limit = crate::limits::get();
        let mut out = BoundedText {
            text: Vec::new(),
            max: limit.template_bytes,
        };
        match tmpl.render_captured_to(ctx, &mut out) {
            Ok(_) => {}
            Err(_) if out.text.len() as u64 > limit.template_bytes => {
                return Err(Error::Limit {
                    what: "chat template".into(),
                    found: "the rendered prompt grew past the limit".into(),
                    limit: limit.template_bytes,
                    name: "template-bytes".into(),
                })
            }
            Err(e) if e.kind() == ErrorKind::OutOfFuel => {
                return Err(Error::Limit {
                    what: "chat template".into(),
                    found: "rendering ran out of steps".into(),
                    limit: limit.template_steps,
                    name: "template-steps".into(),
                })
            }
            Err(e) => return Err(Error::Template(format!("cannot render: {e}"))),
        }
        String::from_utf8(out.text)
            .map_err(|_| Error::Template("the rendered prompt is not UTF-8".into()))
    }
}

/// Collects rendered text, failing the render once it passes `max` bytes.
struct BoundedText {
    text: Vec<u8>,
    max: u64,
}

impl std::io::Write for BoundedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if (self.text.len() + buf.len()) as u64 > self.max {
            // Remember that the limit was hit (the length tells the caller why the render failed).
            self.text.resize(self.max as usize + 1, 0);
            return Err(std::io::Error::other("the rendered template is too large"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn template_field(v: &Value) -> Option<String> {
    match v.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        // A list of named templates: take "default".
        Value::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_loops_run_out_of_steps_instead_of_hanging() {
        let source =
            "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}";
        let t = ChatTemplate::from_source(source.into()).unwrap();
        let started = std::time::Instant::now();
        let e = t.render(&[Message::user(0, "Hi")], true).unwrap_err();
        assert!(
            matches!(e, Error::Limit { ref name, .. } if name == "template-steps"),
            "{e}"
        );
        // The bound is on steps, not time; this only shows the steps are few enough not to hang.
        assert!(started.elapsed().as_secs() < 60);
    }

    #[test]
    fn a_huge_rendered_prompt_is_refused() {
        // Few steps, much text: each step writes 100 MB.
        let source = "{% for a in range(50) %}{{ 'x' * 100000000 }}{% endfor %}";
        let t = ChatTemplate::from_source(source.into()).unwrap();
        let e = t.render(&[Message::user(0, "Hi")], true).unwrap_err();
        assert!(
            matches!(e, Error::Limit { ref name, .. } if name == "template-bytes"),
            "{e}"
        );
    }

    #[test]
    fn enable_thinking_is_passed_only_when_set() {
        // The generation-prompt tail of Qwen3's templates.
        let source = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content[0].text }}<|im_end|>\n\
                      {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n\
                      {% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n\
                      {% elif enable_thinking is defined %}<think>\n{% endif %}{% endif %}";
        let mut t = ChatTemplate::from_source(source.into()).unwrap();
        let msgs = [Message::user(0, "Hi")];
        let head = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(t.render(&msgs, true).unwrap(), head);
        t.enable_thinking = Some(false);
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            format!("{head}<think>\n\n</think>\n\n")
        );
        t.enable_thinking = Some(true);
        assert_eq!(t.render(&msgs, true).unwrap(), format!("{head}<think>\n"));
    }
}
