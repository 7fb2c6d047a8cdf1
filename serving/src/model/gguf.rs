//! A GGUF reader over a memory-mapped file.
//!
//! GGUF (llama.cpp's container) is a little-endian header of typed key/value metadata and tensor
//! descriptors, followed by an aligned data section. Every read here is bounds-checked against the
//! file length, so a truncated or corrupted file yields a [`GgufError`] that names the file and
//! what is wrong instead of a panic or a huge allocation.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// What went wrong while reading a GGUF file. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open model file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a GGUF file (magic bytes {found:?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, found: Vec<u8> },
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    Version { path: PathBuf, version: u32 },
    #[error("{path} is truncated or corrupt: needed {needed} bytes at offset {offset} while reading {what}, but the file has {len} bytes; download it again")]
    Truncated {
        path: PathBuf,
        what: String,
        offset: u64,
        needed: u64,
        len: u64,
    },
    #[error("{path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("{path}: metadata key `{key}` is missing or has the wrong type (expected {expected})")]
    Metadata {
        path: PathBuf,
        key: String,
        expected: &'static str,
    },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any integer value as u64 (negative values are rejected).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's descriptor: its shape in candle order (outermost first) and where its bytes are.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Shape, outermost dimension first (GGUF stores it innermost first).
    pub shape: Vec<usize>,
    /// ggml type id (0 = F32, 1 = F16, 2 = Q4_0, 3 = Q4_1, 8 = Q8_0, ...).
    pub ggml_type: u32,
    /// Which of the model's mapped files holds the bytes (always 0 for a GGUF file).
    pub file: usize,
    /// Absolute byte offset in that file.
    pub offset: u64,
    pub size: u64,
}

/// Where a model's tensors and metadata were read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One GGUF file, read as it is.
    Gguf,
    /// A Hugging Face checkpoint directory (`config.json`, `*.safetensors`, `tokenizer.json`),
    /// whose names and hyper-parameters were translated into GGUF's keys and tensor names (see
    /// [`super::hf`]). Its Q/K weights are in Hugging Face's order, not llama.cpp's permuted one.
    HuggingFace,
}

/// A model's metadata and tensor descriptors in GGUF's vocabulary, with the tensor data left
/// memory-mapped: a GGUF file, or a Hugging Face directory translated into the same keys.
#[derive(Debug)]
pub struct GgufFile {
    /// The GGUF file, or the checkpoint directory.
    pub path: PathBuf,
    pub version: u32,
    pub format: Format,
    pub metadata: HashMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    maps: Vec<Mmap>,
}

/// Bytes per block and elements per block for the ggml types this reader accepts.
pub fn ggml_type_layout(t: u32) -> Option<(u64, u64)> {
    Some(match t {
        0 => (4, 1),      // F32
        1 => (2, 1),      // F16
        30 => (2, 1),     // BF16
        2 => (18, 32),    // Q4_0
        3 => (20, 32),    // Q4_1
        6 => (22, 32),    // Q5_0
        7 => (24, 32),    // Q5_1
        8 => (34, 32),    // Q8_0
        9 => (36, 32),    // Q8_1
        10 => (84, 256),  // Q2K
        11 => (110, 256), // Q3K
        12 => (144, 256), // Q4K
        13 => (176, 256), // Q5K
        14 => (210, 256), // Q6K
        15 => (292, 256), // Q8K
        _ => return None,
    })
}

struct Cursor<'a> {
    path: &'a Path,
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        let remaining = (self.data.len() - self.pos) as u64;
        if n > remaining {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: what.to_string(),
                offset: self.pos as u64,
                needed: n,
                len: self.data.len() as u64,
            });
        }
        let n = n as usize;
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn corrupt(&self, detail: String) -> GgufError {
        GgufError::Corrupt {
            path: self.path.to_path_buf(),
            detail,
        }
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => Value::Bool(self.array::<1>(key)?[0] != 0),
            8 => Value::String(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(self.corrupt(format!("metadata `{key}` nests arrays too deeply")));
                }
                let elem = self.u32(key)?;
                let len = self.u64(key)?;
                // Every element takes at least one byte: a length beyond the remaining bytes is
                // corruption, and refusing it here avoids a huge allocation.
                if len > (self.data.len() - self.pos) as u64 {
                    return Err(GgufError::Truncated {
                        path: self.path.to_path_buf(),
                        what: format!("array `{key}` of {len} elements"),
                        offset: self.pos as u64,
                        needed: len,
                        len: self.data.len() as u64,
                    });
                }
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(self.corrupt(format!("metadata `{key}` has unknown value type {other}")))
            }
        })
    }
}

impl GgufFile {
    /// Opens and validates `path`: header, metadata, tensor descriptors, and that every tensor's
    /// bytes lie inside the file.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let file = File::open(path).map_err(|source| GgufError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the mapping is read-only and private to this process. Model files are treated
        // as immutable while served; a concurrent writer truncating the file could fault, which is
        // the same contract every mmap-based model loader (llama.cpp, safetensors) documents.
        #[allow(unsafe_code)]
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| GgufError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let (version, metadata, tensors) = Self::parse(path, &mmap)?;
        Ok(Self {
            path: path.to_path_buf(),
            version,
            format: Format::Gguf,
            metadata,
            tensors,
            maps: vec![mmap],
        })
    }

    /// A model assembled from translated metadata and tensors whose bytes lie in `maps`
    /// (`TensorInfo::file` indexes it). Every tensor's range must lie inside its map.
    pub(crate) fn assemble(
        path: PathBuf,
        format: Format,
        metadata: HashMap<String, Value>,
        tensors: Vec<TensorInfo>,
        maps: Vec<Mmap>,
    ) -> Self {
        debug_assert!(tensors.iter().all(|t| maps
            .get(t.file)
            .is_some_and(|m| t.offset + t.size <= m.len() as u64)));
        Self {
            path,
            version: 3,
            format,
            metadata,
            tensors,
            maps,
        }
    }

    /// Parses a GGUF image held in memory (used by `open` and by the fuzz tests).
    #[allow(clippy::type_complexity)]
    pub fn parse(
        path: &Path,
        data: &[u8],
    ) -> Result<(u32, HashMap<String, Value>, Vec<TensorInfo>), GgufError> {
        let mut c = Cursor { path, data, pos: 0 };
        let magic = c
            .take(4, "the magic bytes")
            .map_err(|_| GgufError::BadMagic {
                path: path.to_path_buf(),
                found: data.iter().take(4).copied().collect(),
            })?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic {
                path: path.to_path_buf(),
                found: magic.to_vec(),
            });
        }
        let version = c.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version {
                path: path.to_path_buf(),
                version,
            });
        }
        let n_tensors = c.u64("the tensor count")?;
        let n_kv = c.u64("the metadata count")?;
        let mut metadata = HashMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&key)?;
            let value = c.value(ty, &key, 0)?;
            metadata.insert(key, value);
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_ALIGNMENT);
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(c.corrupt(format!(
                "general.alignment {alignment} is not a power of two"
            )));
        }
        let mut tensors = Vec::new();
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor descriptor #{i}"))?;
            let n_dims = c.u32(&name)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(c.corrupt(format!("tensor `{name}` has {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&name)?);
            }
            let ggml_type = c.u32(&name)?;
            let offset = c.u64(&name)?;
            let (block_bytes, block_elems) = ggml_type_layout(ggml_type).ok_or_else(|| {
                c.corrupt(format!(
                    "tensor `{name}` has unsupported ggml type {ggml_type}"
                ))
            })?;
            let elems = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| {
                    c.corrupt(format!("tensor `{name}` has an absurd shape {dims:?}"))
                })?;
            if dims[0] % block_elems != 0 {
                return Err(c.corrupt(format!(
                    "tensor `{name}` row length {} is not a multiple of its block size {block_elems}",
                    dims[0]
                )));
            }
            let size = (elems / block_elems)
                .checked_mul(block_bytes)
                .ok_or_else(|| {
                    c.corrupt(format!("tensor `{name}` has an absurd shape {dims:?}"))
                })?;
            dims.reverse();
            tensors.push(TensorInfo {
                name,
                shape: dims.iter().map(|&d| d as usize).collect(),
                ggml_type,
                file: 0,
                offset,
                size,
            });
        }
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        for t in &mut tensors {
            let start = data_start.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.size));
            match end {
                Some(end) if end <= data.len() as u64 => t.offset += data_start,
                _ => {
                    return Err(GgufError::Truncated {
                        path: path.to_path_buf(),
                        what: format!("the data of tensor `{}`", t.name),
                        offset: data_start.saturating_add(t.offset),
                        needed: t.size,
                        len: data.len() as u64,
                    })
                }
            }
        }
        Ok((version, metadata, tensors))
    }

    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| GgufError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensors.iter().any(|t| t.name == name)
    }

    /// The tensor's raw bytes, borrowed from the mapping.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.maps[info.file][info.offset as usize..(info.offset + info.size) as usize]
    }

    fn missing(&self, key: &str, expected: &'static str) -> GgufError {
        GgufError::Metadata {
            path: self.path.clone(),
            key: key.to_string(),
            expected,
        }
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.metadata
            .get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| self.missing(key, "an unsigned integer"))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        self.metadata
            .get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| self.missing(key, "a number"))
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.metadata
            .get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| self.missing(key, "a string"))
    }

    pub fn get_array(&self, key: &str) -> Result<&[Value], GgufError> {
        self.metadata
            .get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| self.missing(key, "an array"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
        let mut v = b"GGUF".to_vec();
        v.extend(3u32.to_le_bytes());
        v.extend(n_tensors.to_le_bytes());
        v.extend(n_kv.to_le_bytes());
        v
    }

    #[test]
    fn rejects_wrong_magic() {
        let err = GgufFile::parse(Path::new("x.gguf"), b"PK\x03\x04rest").unwrap_err();
        assert!(matches!(err, GgufError::BadMagic { .. }), "{err}");
    }

    #[test]
    fn huge_array_length_is_truncation_not_allocation() {
        let mut v = header(0, 1);
        v.extend(3u64.to_le_bytes());
        v.extend(b"key");
        v.extend(9u32.to_le_bytes()); // array
        v.extend(4u32.to_le_bytes()); // of u32
        v.extend(u64::MAX.to_le_bytes());
        let err = GgufFile::parse(Path::new("x.gguf"), &v).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn tensor_past_end_of_file_is_reported() {
        let mut v = header(1, 0);
        v.extend(1u64.to_le_bytes());
        v.extend(b"w");
        v.extend(1u32.to_le_bytes());
        v.extend(64u64.to_le_bytes());
        v.extend(0u32.to_le_bytes()); // f32
        v.extend(0u64.to_le_bytes());
        let err = GgufFile::parse(Path::new("m.gguf"), &v).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("m.gguf") && msg.contains("tensor `w`"),
            "{msg}"
        );
    }

    /// Every prefix of a valid file and many single-byte corruptions must give an error or a
    /// parse, never a panic.
    #[test]
    fn fuzz_prefixes_and_bit_flips_never_panic() {
        let mut v = header(1, 2);
        v.extend(4u64.to_le_bytes());
        v.extend(b"name");
        v.extend(8u32.to_le_bytes());
        v.extend(2u64.to_le_bytes());
        v.extend(b"ok");
        v.extend(3u64.to_le_bytes());
        v.extend(b"arr");
        v.extend(9u32.to_le_bytes());
        v.extend(5u32.to_le_bytes());
        v.extend(2u64.to_le_bytes());
        v.extend(7i32.to_le_bytes());
        v.extend(8i32.to_le_bytes());
        v.extend(1u64.to_le_bytes());
        v.extend(b"w");
        v.extend(2u32.to_le_bytes());
        v.extend(4u64.to_le_bytes());
        v.extend(2u64.to_le_bytes());
        v.extend(0u32.to_le_bytes());
        v.extend(0u64.to_le_bytes());
        while !v.len().is_multiple_of(32) {
            v.push(0);
        }
        v.extend([0u8; 32]);
        let (_, md, ts) = GgufFile::parse(Path::new("f.gguf"), &v).unwrap();
        assert_eq!(md["name"].as_str(), Some("ok"));
        assert_eq!(ts[0].shape, vec![2, 4]);
        for cut in 0..v.len() {
            assert!(GgufFile::parse(Path::new("f.gguf"), &v[..cut]).is_err());
        }
        let mut state = 0x9e3779b97f4a7c15u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut w = v.clone();
            let i = (state as usize) % w.len();
            w[i] = (state >> 32) as u8;
            let _ = GgufFile::parse(Path::new("f.gguf"), &w);
        }
    }
}
