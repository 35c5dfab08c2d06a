//! Constrained decoding: a JSON schema or a Lark grammar decides which tokens may come next, so the
//! output always parses. llguidance does the grammar work (the field's choice: Earley parsing over a
//! token trie, tens of microseconds a token); this file adapts it to our tokenizer and sampler.
//!
//! **Forced tokens.** Where the grammar allows one continuation only (a JSON object's keys, quotes,
//! braces, the rest of an enum value once its first letters are out), llguidance's fast-forward
//! gives the bytes that continuation spells; they become the tokenizer's own (canonical) tokens, as
//! the model met such text in training, but for the tail that could start a longer token (the bytes
//! after the forced ones could join it). The grammar advances over them as over sampled tokens;
//! they are appended without sampling (log probability 0: nothing else was allowed) and run
//! through the model as one batched forward ([`FastForward`]).

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
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

/// How an answer's forced tokens are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FastForward {
    /// Appended without sampling, run through the model as one batched forward.
    #[default]
    Batched,
    /// Appended without sampling, each run as its own decode step: the reference that
    /// [`FastForward::Batched`] must equal.
    Stepwise,
    /// Not forced: every token sampled under the grammar's mask (the model may then spell a
    /// forced text in other tokens than the tokenizer would).
    Off,
}

/// The tokenizer environment llguidance reads: the token trie, and the tokenizer's own
/// tokenization of byte strings (so forced text gets the tokens the model was trained on). A
/// tokenization that does not spell exactly the bytes asked (a normalizer that adds a leading
/// space, bytes that are not UTF-8) gives way to the trie's greedy one (which spells them where
/// the vocabulary has a token for every byte).
/// llguidance is told it is not canonical, so that its masks work as for any tokenizer: the
/// forced tokens are made here ([`Constraint::take_forced`]).
struct CanonicalEnv {
    trie: TokTrie,
    tokenizer: Arc<tokenizers::Tokenizer>,
}

impl CanonicalEnv {
    /// How many of the last `tokens` (a tokenization of forced bytes) to leave to the model: the
    /// fewest whose bytes cover the longest tail of the forced bytes that is the start of a longer
    /// token (the bytes after the forced ones could join it: the model would write `":""}]}` in
    /// one token where the forced `":""` ends). Looks back 4 tokens, as llguidance does; every
    /// token counts as a possible extension, not only those the grammar allows next.
    fn extendable_tail(&self, tokens: &[u32]) -> usize {
        let back = &tokens[tokens.len().saturating_sub(4)..];
        let bytes = self.trie.decode_raw(back);
        let bytes = &bytes[bytes.len().saturating_sub(self.trie.max_token_len())..];
        let Some(start) = (0..bytes.len()).find(|&i| self.trie.has_extensions(&bytes[i..])) else {
            return 0;
        };
        let need = bytes.len() - start;
        let mut covered = 0;
        for (n, &t) in back.iter().rev().enumerate() {
            covered += self.trie.token_len(t);
            if covered >= need {
                return n + 1;
            }
        }
        back.len()
    }
}

impl TokenizerEnv for CanonicalEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        let canonical = std::str::from_utf8(s)
            .ok()
            .and_then(|text| self.tokenizer.encode(text, false).ok())
            .map(|e| e.get_ids().to_vec())
            .filter(|ids| self.trie.decode_raw(ids) == s);
        canonical.unwrap_or_else(|| self.trie.greedy_tokenize(s))
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// The tokenizer-wide part of constrained decoding (the token trie); built once per model.
pub struct ConstraintFactory {
    factory: ParserFactory,
    env: Arc<CanonicalEnv>,
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
        let env = Arc::new(CanonicalEnv {
            trie,
            tokenizer: tokenizer.shared(),
        });
        let tok_env: TokEnv = env.clone();
        let mut factory =
            ParserFactory::new_simple(&tok_env).map_err(|e| Error::Grammar(first_line(&e)))?;
        factory.quiet();
        Ok(ConstraintFactory { factory, env })
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
        Ok(Constraint {
            matcher,
            fast_forward: FastForward::default(),
            env: self.env.clone(),
        })
    }
}

/// The state of one constrained answer.
pub struct Constraint {
    matcher: Matcher,
    fast_forward: FastForward,
    env: Arc<CanonicalEnv>,
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

    /// The same constraint, its forced tokens decoded as `mode` says.
    pub fn with_fast_forward(mut self, mode: FastForward) -> Self {
        self.fast_forward = mode;
        self
    }

    pub fn fast_forward(&self) -> FastForward {
        self.fast_forward
    }

    /// The tokens the grammar forces next, already advanced over (none with
    /// [`FastForward::Off`]): the canonical tokens of the forced bytes but their extendable tail
    /// ([`CanonicalEnv::extendable_tail`]), as far as the grammar takes them.
    pub fn take_forced(&mut self) -> Result<Vec<u32>> {
        if self.fast_forward == FastForward::Off {
            return Ok(Vec::new());
        }
        let bytes = self.matcher.compute_ff_bytes();
        if bytes.is_empty() {
            return Ok(Vec::new());
        }
        let mut tokens = self.env.tokenize_bytes(&bytes);
        // Tokens that spell the forced bytes exactly, or none (a vocabulary without a token for
        // some byte can spell it only inside a longer token: the model then samples it).
        if self.env.trie.decode_raw(&tokens) != bytes {
            return Ok(Vec::new());
        }
        tokens.truncate(tokens.len() - self.env.extendable_tail(&tokens));
        let valid = self
            .matcher
            .validate_tokens(&tokens)
            .map_err(|e| Error::Grammar(first_line(&e)))?;
        tokens.truncate(valid);
        self.matcher
            .consume_tokens(&tokens)
            .map_err(|e| Error::Grammar(first_line(&e)))?;
        Ok(tokens)
    }

    /// The grammar is complete and allows nothing more.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}
