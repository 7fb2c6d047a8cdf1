//! OpenAI request bodies and their validation into engine parameters.
//!
//! Bodies are parsed from raw bytes (not axum's `Json` extractor) so that every malformed body
//! gets an OpenAI-style 400 that says what is wrong.

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::error::ApiError;
use crate::engine::SamplingParams;
use crate::tokenizer::ChatMessage;

/// A string or a list of strings (`stop`, `prompt`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// Message content: a string or a list of typed parts (only `text` parts are accepted).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Common {
    pub model: Option<String>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub stop: Option<OneOrMany>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: OneOrMany,
    #[serde(flatten)]
    pub common: Common,
}

/// Parses a JSON body, mapping serde's message to a 400.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "the request body is not valid JSON"
        } else {
            "the request body does not match the expected schema"
        };
        ApiError::invalid(format!("{what}: {e}"), None)
    })
}

impl ChatRequest {
    /// Messages for the chat template.
    pub fn chat_messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                "`messages` must contain at least one message",
                Some("messages"),
            ));
        }
        self.messages
            .iter()
            .map(|m| {
                if !matches!(
                    m.role.as_str(),
                    "system" | "user" | "assistant" | "developer" | "tool"
                ) {
                    return Err(ApiError::invalid(
                        format!(
                            "unknown message role `{}` (expected system, user, assistant)",
                            m.role
                        ),
                        Some("messages"),
                    ));
                }
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(s)) => s.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut s = String::new();
                        for p in parts {
                            if p.kind != "text" {
                                return Err(ApiError::invalid(
                                    format!(
                                        "content part type `{}` is not supported; only text",
                                        p.kind
                                    ),
                                    Some("messages"),
                                ));
                            }
                            s.push_str(p.text.as_deref().unwrap_or(""));
                        }
                        s
                    }
                };
                let role = if m.role == "developer" {
                    "system"
                } else {
                    &m.role
                };
                Ok(ChatMessage {
                    role: role.to_string(),
                    content,
                })
            })
            .collect()
    }
}

impl CompletionRequest {
    pub fn prompt_text(&self) -> Result<String, ApiError> {
        match &self.prompt {
            OneOrMany::One(s) => Ok(s.clone()),
            OneOrMany::Many(v) if v.len() == 1 => Ok(v[0].clone()),
            OneOrMany::Many(_) => Err(ApiError::invalid(
                "`prompt` must be one string; send one request per prompt",
                Some("prompt"),
            )),
        }
    }
}

/// Limits the validation needs from the server.
#[derive(Debug, Clone)]
pub struct Limits {
    pub served_name: String,
    pub context_length: usize,
}

impl Common {
    /// Checks the model name and sampling fields, and derives the engine's parameters for a
    /// prompt of `prompt_len` tokens.
    pub fn validate(&self, limits: &Limits, prompt_len: usize) -> Result<SamplingParams, ApiError> {
        if let Some(m) = &self.model {
            if m != &limits.served_name {
                return Err(ApiError::model_not_found(m));
            }
        }
        let range = |v: Option<f32>, lo: f32, hi: f32, name: &'static str, default: f32| {
            let v = v.unwrap_or(default);
            if !v.is_finite() || v < lo || v > hi {
                Err(ApiError::invalid(
                    format!("`{name}` must be between {lo} and {hi}, got {v}"),
                    Some(name),
                ))
            } else {
                Ok(v)
            }
        };
        let temperature = range(self.temperature, 0.0, 2.0, "temperature", 1.0)?;
        let top_p = range(self.top_p, 0.0, 1.0, "top_p", 1.0)?;
        if top_p == 0.0 {
            return Err(ApiError::invalid(
                "`top_p` must be greater than 0",
                Some("top_p"),
            ));
        }
        let presence_penalty = range(self.presence_penalty, -2.0, 2.0, "presence_penalty", 0.0)?;
        let frequency_penalty = range(self.frequency_penalty, -2.0, 2.0, "frequency_penalty", 0.0)?;
        let top_k = match self.top_k {
            None => 0,
            Some(k) if k >= 0 => k as usize,
            Some(k) => {
                return Err(ApiError::invalid(
                    format!("`top_k` must be 0 (off) or positive, got {k}"),
                    Some("top_k"),
                ))
            }
        };
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::invalid(
                    format!("`n` must be 1 on this server, got {n}"),
                    Some("n"),
                ));
            }
        }
        let ctx = limits.context_length;
        if prompt_len == 0 {
            return Err(ApiError::invalid("the prompt is empty", Some("prompt")));
        }
        if prompt_len >= ctx {
            return Err(ApiError::invalid(
                format!("the prompt has {prompt_len} tokens; this model's context length is {ctx} tokens, including the completion"),
                Some("messages"),
            )
            .with_code("context_length_exceeded"));
        }
        let room = ctx - prompt_len;
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => room,
            Some(m) if m < 1 => {
                return Err(ApiError::invalid(
                    format!("`max_tokens` must be at least 1, got {m}"),
                    Some("max_tokens"),
                ))
            }
            Some(m) if m as u64 > room as u64 => {
                return Err(ApiError::invalid(
                    format!("`max_tokens` is {m} but only {room} tokens are left in the context of {ctx} after the {prompt_len}-token prompt"),
                    Some("max_tokens"),
                )
                .with_code("context_length_exceeded"))
            }
            Some(m) => m as usize,
        };
        let stop = self
            .stop
            .clone()
            .map(OneOrMany::into_vec)
            .unwrap_or_default();
        if stop.len() > 4 {
            return Err(ApiError::invalid(
                "at most 4 `stop` sequences are allowed",
                Some("stop"),
            ));
        }
        Ok(SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: self.seed.map(|s| s as u64),
            max_tokens,
            stop,
            presence_penalty,
            frequency_penalty,
        })
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            served_name: "m".into(),
            context_length: 100,
        }
    }

    fn chat(body: &str) -> Result<SamplingParams, ApiError> {
        let r: ChatRequest = parse(body.as_bytes())?;
        r.chat_messages()?;
        r.common.validate(&limits(), 10)
    }

    #[test]
    fn rejects_bad_inputs_with_400() {
        for (body, needle) in [
            ("{not json", "not valid JSON"),
            (r#"{"messages": "hi"}"#, "schema"),
            (r#"{"messages": []}"#, "at least one"),
            (
                r#"{"model":"x","messages":[{"role":"user","content":"a"}]}"#,
                "does not exist",
            ),
            (
                r#"{"messages":[{"role":"user","content":"a"}],"temperature":-1}"#,
                "temperature",
            ),
            (
                r#"{"messages":[{"role":"user","content":"a"}],"max_tokens":1000}"#,
                "only 90 tokens",
            ),
            (
                r#"{"messages":[{"role":"user","content":"a"}],"max_tokens":0}"#,
                "at least 1",
            ),
            (
                r#"{"messages":[{"role":"user","content":"a"}],"n":2}"#,
                "`n`",
            ),
            (r#"{"messages":[{"role":"wizard","content":"a"}]}"#, "role"),
        ] {
            let e = chat(body).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
    }

    #[test]
    fn accepts_openai_shapes() {
        let p = chat(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"}]}],"stop":"x","temperature":0,"seed":3,"max_tokens":5}"#).unwrap();
        assert_eq!(p.stop, vec!["x"]);
        assert_eq!(p.max_tokens, 5);
        assert_eq!(p.seed, Some(3));
        let p = chat(r#"{"messages":[{"role":"user","content":"a"}]}"#).unwrap();
        assert_eq!(p.max_tokens, 90);
    }

    #[test]
    fn prompt_longer_than_context_is_rejected() {
        let r: CompletionRequest = parse(br#"{"prompt":"x"}"#).unwrap();
        let e = r.common.validate(&limits(), 100).unwrap_err();
        assert_eq!(e.code, Some("context_length_exceeded"));
    }

    /// Random bytes and mutated valid bodies never panic the parser.
    #[test]
    fn fuzz_parser_never_panics() {
        let seed = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stop":["a"],"max_tokens":3,"temperature":0.5}"#;
        let mut state = 0x2545F4914F6CDD1Du64;
        for i in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut b = seed.to_vec();
            let pos = (state as usize) % b.len();
            match i % 3 {
                0 => b[pos] = (state >> 40) as u8,
                1 => b.truncate(pos),
                _ => b.insert(pos, (state >> 48) as u8),
            }
            if let Ok(r) = parse::<ChatRequest>(&b) {
                if r.chat_messages().is_ok() {
                    let _ = r.common.validate(&limits(), 5);
                }
            }
        }
    }
}
