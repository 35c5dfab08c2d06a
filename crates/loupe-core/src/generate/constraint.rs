//! Constrained decoding: a JSON schema or a Lark grammar decides which tokens may come next, so the
//! output always parses. llguidance does the grammar work (the field's choice: Earley parsing over a
//! token trie, tens of microseconds a token); this file adapts it to our tokenizer and sampler.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};

use crate::error::{first_line, Error, Result};
use crate::tokenize::Tokenizer;

/// What the output must match.
#[derive(Debug, Clone)]
pub enum Grammar {
    /// A JSON schema (draft 2020-12 subset: objects, arrays, enums, numbers with bounds, strings
    /// with lengths and patterns). Output is compact JSON unless the schema's `x-guidance` says
    /// otherwise.
    JsonSchema(serde_json::Value),
    /// A grammar in llguidance's Lark dialect.
    Lark(String),
}

impl Grammar {
    fn top_level(&self) -> TopLevelGrammar {
        match self {
            Grammar::JsonSchema(v) => {
                // Compact JSON unless the schema asks otherwise: free whitespace lets a model spend
                // its whole token budget on blanks.
                let mut v = v.clone();
                if let Some(obj) = v.as_object_mut() {
                    obj.entry("x-guidance")
                        .or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
                }
                TopLevelGrammar::from_json_schema(v)
            }
            Grammar::Lark(s) => TopLevelGrammar::from_lark(s.clone()),
        }
    }
}

/// The tokenizer-wide part of constrained decoding (the token trie); built once per model.
pub struct ConstraintFactory {
    factory: ParserFactory,
}

impl ConstraintFactory {
    /// `eos` are the ids that end the answer; the grammar allows them once it is complete.
    pub fn new(tokenizer: &Tokenizer, eos: &[u32]) -> Result<Self> {
        let words = tokenizer.token_bytes()?;
        let first_eos = *eos.first().ok_or_else(|| {
            Error::Grammar("constrained decoding needs an end-of-sequence token".into())
        })?;
        let info = TokRxInfo::new(words.len() as u32, first_eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| Error::Grammar(first_line(&e)))?;
        factory.quiet();
        Ok(ConstraintFactory { factory })
    }

    /// A fresh matcher for one answer; a grammar that does not compile is an error here, before any
    /// token is generated.
    pub fn constraint(&self, grammar: &Grammar) -> Result<Constraint> {
        let parser = self
            .factory
            .create_parser(grammar.top_level())
            .map_err(|e| Error::Grammar(first_line(&e)))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(Error::Grammar(first_line(&e)));
        }
        Ok(Constraint { matcher })
    }
}

/// The state of one constrained answer.
pub struct Constraint {
    matcher: Matcher,
}

impl Constraint {
    /// Sets the logits of every token the grammar forbids to minus infinity. Ids the tokenizer does not
    /// have (the padded tail of the embedding table) are forbidden too.
    pub fn mask_logits(&mut self, logits: &mut [f32]) -> Result<()> {
        let mask: SimpleVob = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| Error::Grammar(first_line(&e)))?;
        let n = mask.len();
        for (i, l) in logits.iter_mut().enumerate() {
            if i >= n || !mask.is_allowed(i as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances the grammar by a sampled token.
    pub fn commit(&mut self, token: u32) -> Result<()> {
        self.matcher
            .consume_token(token)
            .map_err(|e| Error::Grammar(first_line(&e)))
    }

    /// The grammar is complete and allows nothing more.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}
