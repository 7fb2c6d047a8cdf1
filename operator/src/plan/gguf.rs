//! Reading a model's shapes from a GGUF header, so `plan --model-config model.gguf` and the
//! operator can size a GGUF model exactly. Only the header is read (metadata and tensor shapes),
//! streaming, so a multi-gigabyte file costs a few megabytes of reading; large arrays such as the
//! tokenizer's vocabulary are skipped, their length kept.

use std::io::{self, Read};

use super::{ModelArch, PlanError};

const MAGIC: &[u8; 4] = b"GGUF";
/// Guards against corrupt lengths: no key, string or array in a real header comes near these.
const MAX_STRING: u64 = 1 << 24;
const MAX_ITEMS: u64 = 1 << 28;

/// A metadata value; arrays keep only their length.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Int(i128),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(u64),
}

struct Reader<R> {
    inner: R,
    offset: u64,
}

impl<R: Read> Reader<R> {
    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut buf = [0u8; N];
        self.inner.read_exact(&mut buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                format!("the file ends inside the header (at byte {} reading {what}); it is truncated", self.offset)
            }
            _ => format!("reading {what} at byte {}: {e}", self.offset),
        })?;
        self.offset += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<(), String> {
        let copied = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())
            .map_err(|e| format!("reading {what} at byte {}: {e}", self.offset))?;
        if copied < n {
            return Err(format!(
                "the file ends inside the header (at byte {} reading {what}); it is truncated",
                self.offset + copied
            ));
        }
        self.offset += n;
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.u64(what)?;
        if len > MAX_STRING {
            return Err(format!(
                "{what} at byte {} claims {len} bytes; the header is corrupt",
                self.offset
            ));
        }
        let mut buf = vec![0u8; len as usize];
        self.inner.read_exact(&mut buf).map_err(|_| {
            format!(
                "the file ends inside {what} at byte {}; it is truncated",
                self.offset
            )
        })?;
        self.offset += len;
        String::from_utf8(buf).map_err(|_| format!("{what} at byte {} is not UTF-8", self.offset))
    }

    fn value(&mut self, kind: u32, key: &str) -> Result<Value, String> {
        Ok(match kind {
            0 => Value::Int(i128::from(self.bytes::<1>(key)?[0])),
            1 => Value::Int(i128::from(i8::from_le_bytes(self.bytes(key)?))),
            2 => Value::Int(i128::from(u16::from_le_bytes(self.bytes(key)?))),
            3 => Value::Int(i128::from(i16::from_le_bytes(self.bytes(key)?))),
            4 => Value::Int(i128::from(self.u32(key)?)),
            5 => Value::Int(i128::from(i32::from_le_bytes(self.bytes(key)?))),
            6 => Value::Float(f64::from(f32::from_le_bytes(self.bytes(key)?))),
            7 => Value::Bool(self.bytes::<1>(key)?[0] != 0),
            8 => Value::Str(self.string(key)?),
            9 => {
                let item = self.u32(key)?;
                let len = self.u64(key)?;
                if len > MAX_ITEMS {
                    return Err(format!(
                        "array {key} claims {len} items; the header is corrupt"
                    ));
                }
                match item {
                    0 | 1 | 7 => self.skip(len, key)?,
                    2 | 3 => self.skip(len * 2, key)?,
                    4..=6 => self.skip(len * 4, key)?,
                    10..=12 => self.skip(len * 8, key)?,
                    8 => {
                        for _ in 0..len {
                            let n = self.u64(key)?;
                            if n > MAX_STRING {
                                return Err(format!(
                                    "a string in {key} claims {n} bytes; the header is corrupt"
                                ));
                            }
                            self.skip(n, key)?;
                        }
                    }
                    other => return Err(format!("array {key} has unknown item type {other}")),
                }
                Value::Array(len)
            }
            10 => Value::Int(i128::from(self.u64(key)?)),
            11 => Value::Int(i128::from(i64::from_le_bytes(self.bytes(key)?))),
            12 => Value::Float(f64::from_le_bytes(self.bytes(key)?)),
            other => return Err(format!("{key} has unknown value type {other}")),
        })
    }
}

impl ModelArch {
    /// Reads the shapes of a Llama-family model from a GGUF file's header.
    pub fn from_gguf(source: impl Read) -> Result<Self, PlanError> {
        read(source).map_err(|message| PlanError::Architecture {
            message: format!("GGUF: {message}"),
        })
    }
}

fn read(source: impl Read) -> Result<ModelArch, String> {
    let mut r = Reader {
        inner: io::BufReader::new(source),
        offset: 0,
    };
    if &r.bytes::<4>("the magic number")? != MAGIC {
        return Err("not a GGUF file (the first bytes are not \"GGUF\")".into());
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(format!("version {version} is not supported (2 and 3 are)"));
    }
    let tensors = r.u64("the tensor count")?;
    let entries = r.u64("the metadata count")?;
    if tensors > MAX_ITEMS || entries > MAX_ITEMS {
        return Err("the tensor or metadata count is implausible; the header is corrupt".into());
    }
    let mut meta = std::collections::HashMap::new();
    for _ in 0..entries {
        let key = r.string("a metadata key")?;
        let kind = r.u32(&key)?;
        let value = r.value(kind, &key)?;
        meta.insert(key, value);
    }
    let (mut parameters, mut embedding) = (0f64, 0f64);
    for _ in 0..tensors {
        let name = r.string("a tensor name")?;
        let dims = r.u32(&name)?;
        if dims > 8 {
            return Err(format!(
                "tensor {name} claims {dims} dimensions; the header is corrupt"
            ));
        }
        let mut elements = 1f64;
        for _ in 0..dims {
            elements *= r.u64(&name)? as f64;
        }
        r.u32(&name)?; // element type
        r.u64(&name)?; // data offset
        parameters += elements;
        if name == "token_embd.weight" || name == "output.weight" {
            embedding += elements;
        }
    }

    let arch = match meta.get("general.architecture") {
        Some(Value::Str(a)) => a.clone(),
        _ => return Err("general.architecture is missing".into()),
    };
    if !matches!(arch.as_str(), "llama" | "qwen2" | "mistral") {
        return Err(format!(
            "architecture {arch:?} is not a Llama-family model (llama, qwen2, mistral)"
        ));
    }
    let int = |key: &str| -> Result<u32, String> {
        match meta.get(&format!("{arch}.{key}")) {
            Some(Value::Int(v)) => {
                u32::try_from(*v).map_err(|_| format!("{arch}.{key} = {v} is out of range"))
            }
            _ => Err(format!("{arch}.{key} is missing")),
        }
    };
    let hidden = int("embedding_length")?;
    let heads = int("attention.head_count")?;
    let vocab = match (int("vocab_size"), meta.get("tokenizer.ggml.tokens")) {
        (Ok(v), _) => v,
        (Err(_), Some(Value::Array(n))) => u32::try_from(*n).unwrap_or(u32::MAX),
        (Err(e), _) => return Err(e),
    };
    let model = ModelArch {
        parameters,
        embedding_parameters: embedding,
        layers: int("block_count")?,
        hidden_size: hidden,
        intermediate_size: int("feed_forward_length")?,
        attention_heads: heads,
        kv_heads: int("attention.head_count_kv").unwrap_or(heads),
        head_dim: int("attention.key_length").unwrap_or(hidden / heads.max(1)),
        vocab_size: vocab,
        max_context: int("context_length").unwrap_or(4096),
    };
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a GGUF v3 header with the given metadata and tensor shapes.
    fn header(meta: &[(&str, u32, Vec<u8>)], tensors: &[(&str, &[u64])]) -> Vec<u8> {
        let s = |out: &mut Vec<u8>, text: &str| {
            out.extend((text.len() as u64).to_le_bytes());
            out.extend(text.as_bytes());
        };
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((meta.len() as u64).to_le_bytes());
        for (key, kind, value) in meta {
            s(&mut out, key);
            out.extend(kind.to_le_bytes());
            out.extend(value);
        }
        for (name, dims) in tensors {
            s(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in *dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(0u32.to_le_bytes());
            out.extend(0u64.to_le_bytes());
        }
        out
    }

    fn string(v: &str) -> Vec<u8> {
        let mut out = (v.len() as u64).to_le_bytes().to_vec();
        out.extend(v.as_bytes());
        out
    }

    fn tiny() -> Vec<u8> {
        let u32v = |v: u32| v.to_le_bytes().to_vec();
        let mut tokens = 8u32.to_le_bytes().to_vec(); // array of strings
        tokens.extend(3u64.to_le_bytes());
        for t in ["a", "bb", "ccc"] {
            tokens.extend(string(t));
        }
        header(
            &[
                ("general.architecture", 8, string("llama")),
                ("llama.block_count", 4, u32v(2)),
                ("llama.embedding_length", 4, u32v(64)),
                ("llama.feed_forward_length", 4, u32v(128)),
                ("llama.attention.head_count", 4, u32v(4)),
                ("llama.attention.head_count_kv", 4, u32v(2)),
                ("llama.context_length", 4, u32v(2048)),
                ("tokenizer.ggml.tokens", 9, tokens),
            ],
            &[
                ("token_embd.weight", &[64, 3]),
                ("blk.0.attn_q.weight", &[64, 64]),
                ("blk.1.attn_q.weight", &[64, 64]),
            ],
        )
    }

    #[test]
    fn reads_shapes_and_counts_parameters() {
        let a = ModelArch::from_gguf(&tiny()[..]).unwrap();
        assert_eq!(
            (a.layers, a.hidden_size, a.attention_heads, a.kv_heads),
            (2, 64, 4, 2)
        );
        assert_eq!((a.head_dim, a.vocab_size, a.max_context), (16, 3, 2048));
        assert_eq!(a.parameters, (64 * 3 + 2 * 64 * 64) as f64);
        assert_eq!(a.embedding_parameters, (64 * 3) as f64);
    }

    #[test]
    fn every_truncation_is_a_clear_error_never_a_panic() {
        let full = tiny();
        for cut in 0..full.len() {
            let err = ModelArch::from_gguf(&full[..cut]).unwrap_err().to_string();
            assert!(
                err.starts_with("model architecture: GGUF: "),
                "{cut}: {err}"
            );
            if cut >= 4 {
                assert!(err.contains("truncated"), "{cut}: {err}");
            }
        }
    }

    #[test]
    fn refuses_other_files_and_corrupt_lengths() {
        let err = ModelArch::from_gguf(&b"PK\x03\x04rest"[..])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a GGUF file"), "{err}");
        let mut bad = tiny();
        bad[24..32].copy_from_slice(&u64::MAX.to_le_bytes()); // first key's length
        let err = ModelArch::from_gguf(&bad[..]).unwrap_err().to_string();
        assert!(err.contains("corrupt"), "{err}");
    }

    #[test]
    fn reads_the_bundled_smollm2_model() {
        let path = std::env::var("LLMO_TEST_MODEL").unwrap_or_else(|_| {
            format!(
                "{}/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                std::env::var("LLMO_CACHE")
                    .unwrap_or_else(|_| format!("{}/.cache/llmo", std::env::var("HOME").unwrap()))
            )
        });
        let file = std::fs::File::open(&path).unwrap_or_else(|e| {
            panic!("{path}: {e}; run scripts/fetch-model.sh (make fetch-model) first")
        });
        let a = ModelArch::from_gguf(file).unwrap();
        assert_eq!(
            (a.layers, a.hidden_size, a.intermediate_size),
            (30, 576, 1536)
        );
        assert_eq!((a.attention_heads, a.kv_heads, a.head_dim), (9, 3, 64));
        assert_eq!((a.vocab_size, a.max_context), (49152, 8192));
        // Tied embeddings: the 28.3M-element embedding is counted once.
        assert!((a.parameters / 1e6 - 134.5).abs() < 1.0, "{}", a.parameters);
    }
}
