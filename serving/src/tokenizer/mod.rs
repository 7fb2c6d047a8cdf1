//! Tokenizer read from GGUF metadata (`tokenizer.ggml.*`): GPT-2 byte-level BPE with the
//! model's special tokens, plus the chat template.

mod bpe;
mod chat;
mod pretokenize;

use std::collections::HashMap;

pub use chat::{ChatMessage, ChatTemplate};

use crate::model::gguf::{GgufFile, Value};
use bpe::{byte_to_char, Bpe};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{0}")]
    Metadata(#[from] crate::model::gguf::GgufError),
    #[error("tokenizer model `{0}` is not supported (only GPT-2 style byte-level BPE, `gpt2`)")]
    UnsupportedModel(String),
    #[error("chat template: {0}")]
    Template(String),
}

/// ggml token types: 3 = control, 4 = user defined; both are matched verbatim in input text.
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

#[derive(Debug)]
pub struct Tokenizer {
    tokens: Vec<String>,
    /// Special tokens, longest first, for verbatim matching.
    specials: Vec<(String, u32)>,
    is_special: Vec<bool>,
    bpe: Bpe,
    char_to_byte: HashMap<char, u8>,
    split_digits: bool,
    pub bos: Option<u32>,
    pub eos: u32,
    /// Tokens that end generation (EOS plus end-of-turn tokens).
    pub stop_tokens: Vec<u32>,
    pub chat_template: ChatTemplate,
}

impl Tokenizer {
    pub fn from_gguf(g: &GgufFile) -> Result<Self, TokenizerError> {
        let model = g.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.to_string()));
        }
        let tokens: Vec<String> = g
            .get_array("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .collect();
        let merges: Vec<(String, String)> = g
            .get_array("tokenizer.ggml.merges")?
            .iter()
            .filter_map(|v| {
                let (a, b) = v.as_str()?.split_once(' ')?;
                Some((a.to_string(), b.to_string()))
            })
            .collect();
        let types: Vec<i64> = g
            .metadata
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|v| v.as_f64().map(|f| f as i64).unwrap_or(1))
                    .collect()
            })
            .unwrap_or_default();
        let vocab: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bytes = byte_to_char();
        let char_to_byte = bytes
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let mut is_special = vec![false; tokens.len()];
        let mut specials = Vec::new();
        for (i, t) in types.iter().enumerate() {
            if (*t == CONTROL || *t == USER_DEFINED) && i < tokens.len() {
                is_special[i] = true;
                if !tokens[i].is_empty() {
                    specials.push((tokens[i].clone(), i as u32));
                }
            }
        }
        specials.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        let id = |k: &str| g.get_u64(k).ok().map(|v| v as u32);
        let eos = id("tokenizer.ggml.eos_token_id").unwrap_or(0);
        let add_bos = g
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .map(|v| matches!(v, Value::Bool(true)))
            .unwrap_or(false);
        let bos = if add_bos {
            id("tokenizer.ggml.bos_token_id")
        } else {
            None
        };
        let mut stop_tokens = vec![eos];
        for name in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"] {
            if let Some(&i) = vocab.get(name) {
                if !stop_tokens.contains(&i) {
                    stop_tokens.push(i);
                }
            }
        }
        let split_digits = matches!(
            g.get_str("tokenizer.ggml.pre").unwrap_or("default"),
            "smollm" | "smaug-bpe" | "deepseek-llm" | "qwen2" | "starcoder" | "refact"
        );
        let token_str = |i: Option<u32>| {
            i.and_then(|i| tokens.get(i as usize))
                .cloned()
                .unwrap_or_default()
        };
        let chat_template = ChatTemplate::new(
            g.get_str("tokenizer.chat_template")
                .ok()
                .map(str::to_string),
            token_str(id("tokenizer.ggml.bos_token_id")),
            token_str(Some(eos)),
        )?;
        Ok(Self {
            bpe: Bpe::new(&vocab, &merges, &bytes),
            tokens,
            specials,
            is_special,
            char_to_byte,
            split_digits,
            bos,
            eos,
            stop_tokens,
            chat_template,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Encodes text; special-token strings in it become their ids.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        if let Some(b) = self.bos {
            out.push(b);
        }
        let mut rest = text;
        while !rest.is_empty() {
            // next special token occurrence
            let next = self
                .specials
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|p| (p, s.len(), *id)))
                .min_by_key(|&(p, len, _)| (p, std::cmp::Reverse(len)));
            let (plain, special) = match next {
                Some((p, len, id)) => (&rest[..p], Some((len, id, p))),
                None => (rest, None),
            };
            for piece in pretokenize::pretokenize(plain, self.split_digits) {
                self.bpe.encode_piece(piece, &mut out);
            }
            match special {
                Some((len, id, p)) => {
                    out.push(id);
                    rest = &rest[p + len..];
                }
                None => break,
            }
        }
        out
    }

    /// The bytes a token stands for; special tokens give nothing (they are not shown).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let i = id as usize;
        if i >= self.tokens.len() || self.is_special[i] {
            return Vec::new();
        }
        self.tokens[i]
            .chars()
            .map(|c| self.char_to_byte.get(&c).copied().unwrap_or(b'?'))
            .collect()
    }

    /// Decodes tokens to text, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|&i| self.token_bytes(i)).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Turns a stream of token bytes into text, holding back an incomplete UTF-8 sequence until
/// the bytes that complete it arrive.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // incomplete sequence at the end: wait for more bytes
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is left at the end of generation.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_stream_waits_for_complete_chars() {
        let mut s = Utf8Stream::default();
        let e = "é".as_bytes();
        assert_eq!(s.push(&e[..1]), "");
        assert_eq!(s.push(&e[1..]), "é");
        assert_eq!(s.push(&[0xff, b'a']), "\u{FFFD}a");
        assert_eq!(s.push(&[0xe2, 0x82]), "");
        assert_eq!(s.finish(), "\u{FFFD}");
    }

    #[test]
    fn byte_table_is_a_bijection() {
        let t = byte_to_char();
        let set: std::collections::HashSet<_> = t.iter().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
    }
}
