//! GGUF (versions 2 and 3) read over a memory map.
//!
//! Opening a file parses and validates the header, the metadata and the tensor table, and nothing else: tensor data
//! stays in the page cache until a caller reads it. Every count and length read from the file is checked against the
//! bytes that remain before anything is allocated, so a corrupt or hostile file gives an error, never a panic or a
//! huge allocation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use shardline_kernels::{DType, HostBytes};

use crate::error::{ModelError, Result};
use crate::formats::mapped::MappedFile;
pub use crate::formats::mapped::SharedBytes;
use crate::model::config::ModelConfig;
use crate::model::source::{TensorEntry, TensorMeta, WeightSource};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Data alignment in bytes when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// Metadata key that overrides [`DEFAULT_ALIGNMENT`].
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// ggml tensors have at most this many dimensions.
pub const MAX_DIMS: usize = 4;
/// Arrays nest at most this deep; deeper nesting is treated as corruption (it bounds the parser's recursion).
const MAX_ARRAY_DEPTH: usize = 8;

/// Type tag of a metadata value, as numbered in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, num_enum::TryFromPrimitive)]
#[repr(u32)]
pub enum GgufValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl GgufValueType {
    /// The fewest bytes one value of this type occupies in the file (a string is at least its 8-byte length, an
    /// array at least its 4-byte element type and 8-byte count). Used to bound counts before allocating.
    pub const fn min_encoded_len(self) -> usize {
        use GgufValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// One metadata value. Arrays carry their element type so that empty arrays keep it and nested arrays (arrays of
/// arrays, each with its own element type) are represented exactly.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(GgufValueType, Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    pub fn value_type(&self) -> GgufValueType {
        match self {
            GgufValue::U8(_) => GgufValueType::U8,
            GgufValue::I8(_) => GgufValueType::I8,
            GgufValue::U16(_) => GgufValueType::U16,
            GgufValue::I16(_) => GgufValueType::I16,
            GgufValue::U32(_) => GgufValueType::U32,
            GgufValue::I32(_) => GgufValueType::I32,
            GgufValue::F32(_) => GgufValueType::F32,
            GgufValue::Bool(_) => GgufValueType::Bool,
            GgufValue::String(_) => GgufValueType::String,
            GgufValue::Array(..) => GgufValueType::Array,
            GgufValue::U64(_) => GgufValueType::U64,
            GgufValue::I64(_) => GgufValueType::I64,
            GgufValue::F64(_) => GgufValueType::F64,
        }
    }

    /// Any integer of any width, when it is non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            _ => self.as_i64().and_then(|v| u64::try_from(v).ok()),
        }
    }

    /// Any integer of any width, when it fits an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => i64::try_from(v).ok(),
            _ => None,
        }
    }

    /// A float of either width, or an integer (some writers store e.g. a RoPE base as an integer).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(_, items) => Some(items),
            _ => None,
        }
    }

    /// An array of strings, as GGUF stores token lists and merges.
    pub fn from_strs<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> Self {
        GgufValue::Array(
            GgufValueType::String,
            items.into_iter().map(|s| GgufValue::String(s.as_ref().to_owned())).collect(),
        )
    }
}

macro_rules! value_from {
    ($($t:ty => $v:ident),* $(,)?) => {$(
        impl From<$t> for GgufValue {
            fn from(v: $t) -> Self {
                GgufValue::$v(v)
            }
        }
        impl From<Vec<$t>> for GgufValue {
            fn from(v: Vec<$t>) -> Self {
                GgufValue::Array(GgufValueType::$v, v.into_iter().map(GgufValue::$v).collect())
            }
        }
    )*};
}

value_from!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32, bool => Bool,
    String => String, u64 => U64, i64 => I64, f64 => F64);

impl From<&str> for GgufValue {
    fn from(v: &str) -> Self {
        GgufValue::String(v.to_owned())
    }
}

impl From<Vec<&str>> for GgufValue {
    fn from(v: Vec<&str>) -> Self {
        GgufValue::from_strs(v)
    }
}

/// A ggml tensor type id, as numbered in GGUF tensor infos. Only some of them map to a [`DType`] shardline computes
/// with; the rest are still known by name and block size, so the file layout can be validated and errors name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q5_0: GgmlType = GgmlType(6);
    pub const Q5_1: GgmlType = GgmlType(7);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const Q2_K: GgmlType = GgmlType(10);
    pub const Q3_K: GgmlType = GgmlType(11);
    pub const Q4_K: GgmlType = GgmlType(12);
    pub const Q5_K: GgmlType = GgmlType(13);
    pub const Q6_K: GgmlType = GgmlType(14);
    pub const IQ2_XXS: GgmlType = GgmlType(16);
    pub const IQ4_NL: GgmlType = GgmlType(20);
    pub const IQ4_XS: GgmlType = GgmlType(23);
    pub const BF16: GgmlType = GgmlType(30);

    /// Name, elements per block and bytes per block of every type in ggml's table (ids 4, 5 and 31..=33, 36..=38
    /// were removed from ggml and are unknown here).
    fn info(self) -> Option<(&'static str, usize, usize)> {
        Some(match self.0 {
            0 => ("F32", 1, 4),
            1 => ("F16", 1, 2),
            2 => ("Q4_0", 32, 18),
            3 => ("Q4_1", 32, 20),
            6 => ("Q5_0", 32, 22),
            7 => ("Q5_1", 32, 24),
            8 => ("Q8_0", 32, 34),
            9 => ("Q8_1", 32, 40),
            10 => ("Q2_K", 256, 84),
            11 => ("Q3_K", 256, 110),
            12 => ("Q4_K", 256, 144),
            13 => ("Q5_K", 256, 176),
            14 => ("Q6_K", 256, 210),
            15 => ("Q8_K", 256, 292),
            16 => ("IQ2_XXS", 256, 66),
            17 => ("IQ2_XS", 256, 74),
            18 => ("IQ3_XXS", 256, 98),
            19 => ("IQ1_S", 256, 50),
            20 => ("IQ4_NL", 32, 18),
            21 => ("IQ3_S", 256, 110),
            22 => ("IQ2_S", 256, 82),
            23 => ("IQ4_XS", 256, 136),
            24 => ("I8", 1, 1),
            25 => ("I16", 1, 2),
            26 => ("I32", 1, 4),
            27 => ("I64", 1, 8),
            28 => ("F64", 1, 8),
            29 => ("IQ1_M", 256, 56),
            30 => ("BF16", 1, 2),
            34 => ("TQ1_0", 256, 54),
            35 => ("TQ2_0", 256, 66),
            39 => ("MXFP4", 32, 17),
            _ => return None,
        })
    }

    /// The ggml name (`Q6_K`, `BF16`, ...) or `type N` for an id ggml does not define.
    pub fn name(self) -> String {
        match self.info() {
            Some((name, _, _)) => name.to_owned(),
            None => format!("type {}", self.0),
        }
    }

    /// `(elements, bytes)` of one storage block, `None` for an unknown id.
    pub fn block(self) -> Option<(usize, usize)> {
        self.info().map(|(_, e, b)| (e, b))
    }

    /// The compute dtype of this storage type, `None` when shardline does not compute with it.
    pub fn dtype(self) -> Option<DType> {
        Some(match self.0 {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::Q4_0,
            3 => DType::Q4_1,
            6 => DType::Q5_0,
            7 => DType::Q5_1,
            8 => DType::Q8_0,
            10 => DType::Q2_K,
            11 => DType::Q3_K,
            12 => DType::Q4_K,
            13 => DType::Q5_K,
            14 => DType::Q6_K,
            20 => DType::IQ4_NL,
            23 => DType::IQ4_XS,
            30 => DType::BF16,
            _ => return None,
        })
    }

    pub fn from_dtype(dtype: DType) -> Self {
        match dtype {
            DType::F32 => GgmlType::F32,
            DType::F16 => GgmlType::F16,
            DType::Q4_0 => GgmlType::Q4_0,
            DType::Q4_1 => GgmlType::Q4_1,
            DType::Q8_0 => GgmlType::Q8_0,
            DType::BF16 => GgmlType::BF16,
            DType::Q5_0 => GgmlType::Q5_0,
            DType::Q5_1 => GgmlType::Q5_1,
            DType::Q2_K => GgmlType::Q2_K,
            DType::Q3_K => GgmlType::Q3_K,
            DType::Q4_K => GgmlType::Q4_K,
            DType::Q5_K => GgmlType::Q5_K,
            DType::Q6_K => GgmlType::Q6_K,
            DType::IQ4_NL => GgmlType::IQ4_NL,
            DType::IQ4_XS => GgmlType::IQ4_XS,
        }
    }

    /// Bytes of `elems` elements, `None` when `elems` is not a whole number of blocks, the id is unknown, or the
    /// size overflows.
    pub fn bytes_for(self, elems: u64) -> Option<u64> {
        let (be, bb) = self.block()?;
        let (be, bb) = (be as u64, bb as u64);
        if !elems.is_multiple_of(be) {
            return None;
        }
        (elems / be).checked_mul(bb)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub name: String,
    pub ggml_type: GgmlType,
    /// Dimensions in ggml order: `ne[0]` is the innermost (contiguous) one.
    pub ne: Vec<u64>,
    /// Offset of the data from the start of the data section, in bytes (a multiple of the alignment).
    pub offset: u64,
    /// Size of the data in bytes.
    pub byte_len: usize,
}

impl GgufTensorInfo {
    /// Row-major shape, outermost first: `ne` reversed (`[out_features, in_features]` for a matrix).
    pub fn shape(&self) -> Vec<usize> {
        // Every dimension was checked to fit a usize when the file was opened.
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn elem_count(&self) -> u64 {
        self.ne.iter().product()
    }

    /// The compute dtype, or [`ModelError::UnsupportedTensorType`] naming this tensor and its ggml type.
    pub fn dtype(&self) -> Result<DType> {
        self.ggml_type.dtype().ok_or_else(|| ModelError::UnsupportedTensorType {
            tensor: self.name.clone(),
            type_name: self.ggml_type.name(),
        })
    }
}

/// A parsed GGUF file: metadata, tensor table, and the mapped bytes that tensor views borrow.
pub struct GgufFile {
    path: PathBuf,
    bytes: SharedBytes,
    version: u32,
    alignment: usize,
    /// Absolute file offset of the data section.
    data_offset: usize,
    metadata: Vec<(String, GgufValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl MappedFile for GgufFile {
    fn parse(path: &Path, bytes: SharedBytes) -> Result<Self> {
        let label = path.display().to_string();
        let buf: &[u8] = (*bytes).as_ref();
        let mut r = Reader { buf, pos: 0, path: &label };

        let magic: [u8; 4] = match buf.get(..4) {
            Some(m) => [m[0], m[1], m[2], m[3]],
            None => return Err(r.corrupt(format!("file of {} bytes has no GGUF header", buf.len()))),
        };
        if magic != GGUF_MAGIC {
            return Err(ModelError::BadMagic { path: label, found: magic });
        }
        r.pos = 4;
        let version = r.u32("version")?;
        if version != 2 && version != 3 {
            return Err(ModelError::UnsupportedVersion { path: label, version });
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;

        // A key-value pair takes at least 8 (key length) + 4 (type) + 1 bytes.
        let n_kv = r.bounded_count(n_kv, 13, "metadata count")?;
        let mut metadata = Vec::with_capacity(n_kv);
        let mut metadata_index = HashMap::with_capacity(n_kv);
        for i in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32("metadata value type")?;
            let value = r.value(ty, 0, &key)?;
            if metadata_index.insert(key.clone(), i).is_some() {
                return Err(r.corrupt(format!("metadata key {key} appears twice")));
            }
            metadata.push((key, value));
        }

        let alignment = match metadata_index.get(ALIGNMENT_KEY) {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => {
                let a = metadata[i].1.as_u64().and_then(|a| usize::try_from(a).ok());
                match a {
                    Some(a) if a.is_power_of_two() => a,
                    _ => {
                        return Err(ModelError::BadMetadata {
                            key: ALIGNMENT_KEY.into(),
                            detail: format!("{:?} is not a power of two", metadata[i].1),
                        });
                    }
                }
            }
        };

        // A tensor info takes at least 8 (name length) + 4 (dims) + 4 (type) + 8 (offset) bytes.
        let n_tensors = r.bounded_count(n_tensors, 24, "tensor count")?;
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor dimension count")? as usize;
            if n_dims > MAX_DIMS {
                return Err(r.corrupt(format!("tensor {name} has {n_dims} dimensions (at most {MAX_DIMS})")));
            }
            let mut ne = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                ne.push(r.u64("tensor dimension")?);
            }
            let ggml_type = GgmlType(r.u32("tensor type")?);
            let offset = r.u64("tensor offset")?;
            infos.push((name, ne, ggml_type, offset));
        }
        let header_end = r.pos;
        let data_offset = header_end.checked_next_multiple_of(alignment).unwrap_or(usize::MAX);
        if n_tensors > 0 && data_offset > buf.len() {
            return Err(r.corrupt(format!("data section at byte {data_offset} is past the end ({} bytes)", buf.len())));
        }
        let data_len = buf.len().saturating_sub(data_offset) as u64;

        let mut tensors = Vec::with_capacity(n_tensors);
        let mut tensor_index = HashMap::with_capacity(n_tensors);
        for (name, ne, ggml_type, offset) in infos {
            let (block_elems, _) = ggml_type.block().ok_or_else(|| ModelError::UnsupportedTensorType {
                tensor: name.clone(),
                type_name: ggml_type.name(),
            })?;
            let elems = ne.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            let elems = elems
                .filter(|&e| usize::try_from(e).is_ok())
                .ok_or_else(|| r.corrupt(format!("tensor {name} dimensions {ne:?} overflow")))?;
            let inner = ne.first().copied().unwrap_or(1);
            if inner % block_elems as u64 != 0 {
                return Err(r.corrupt(format!(
                    "tensor {name}: inner dimension {inner} is not a multiple of the {ggml_type} block of {block_elems}"
                )));
            }
            let byte_len = ggml_type
                .bytes_for(elems)
                .filter(|&b| usize::try_from(b).is_ok())
                .ok_or_else(|| r.corrupt(format!("tensor {name} byte size overflows")))?;
            if offset % alignment as u64 != 0 {
                return Err(r.corrupt(format!("tensor {name} offset {offset} is not aligned to {alignment} bytes")));
            }
            match offset.checked_add(byte_len) {
                Some(end) if end <= data_len => {}
                _ => {
                    return Err(r.corrupt(format!(
                        "tensor {name} data {offset}..+{byte_len} lies beyond the data section of {data_len} bytes"
                    )));
                }
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(r.corrupt(format!("tensor {name} appears twice")));
            }
            tensors.push(GgufTensorInfo { name, ggml_type, ne, offset, byte_len: byte_len as usize });
        }

        Ok(Self {
            path: path.to_path_buf(),
            bytes,
            version,
            alignment,
            data_offset,
            metadata,
            metadata_index,
            tensors,
            tensor_index,
        })
    }
}

/// Each `opt_x, get_x -> T: "what", conversion;` line defines the metadata getter `opt_x` (absent is `None`, a value
/// of another type a [`ModelError::BadMetadata`] saying it expected "what") and `get_x` (absent is
/// [`ModelError::MissingMetadata`]).
macro_rules! typed_getters {
    ($($(#[$doc:meta])* $opt:ident, $get:ident -> $t:ty: $want:literal, $conv:expr;)*) => {$(
        $(#[$doc])*
        pub fn $opt(&self, key: &str) -> Result<Option<$t>> {
            self.typed(key, $want, $conv)
        }

        $(#[$doc])*
        pub fn $get(&self, key: &str) -> Result<$t> {
            Self::required(key, self.$opt(key))
        }
    )*};
}

impl GgufFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of tensor data in bytes.
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Absolute file offset of the data section in bytes.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// Size of the whole file in bytes.
    pub fn file_len(&self) -> usize {
        (*self.bytes).as_ref().len()
    }

    /// Metadata in file order.
    pub fn metadata(&self) -> impl Iterator<Item = (&str, &GgufValue)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    /// The value of `key` converted by `conv`: `Ok(None)` when absent, `BadMetadata` when present but not convertible.
    fn typed<'a, T>(&'a self, key: &str, want: &str, conv: impl Fn(&'a GgufValue) -> Option<T>) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => conv(v).map(Some).ok_or_else(|| ModelError::BadMetadata {
                key: key.to_owned(),
                detail: format!("expected {want}, found {}", describe(v)),
            }),
        }
    }

    fn required<T>(key: &str, v: Result<Option<T>>) -> Result<T> {
        v?.ok_or_else(|| ModelError::MissingMetadata(key.to_owned()))
    }

    typed_getters! {
        /// Any integer width holding a value that fits a `u32`.
        opt_u32, get_u32 -> u32: "an integer that fits u32", |v| v.as_u64().and_then(|x| u32::try_from(x).ok());
        opt_u64, get_u64 -> u64: "a non-negative integer", GgufValue::as_u64;
        /// A count or size: any integer width holding a non-negative value that fits a `usize`.
        opt_usize, get_usize -> usize: "a non-negative integer", |v| v.as_u64().and_then(|x| usize::try_from(x).ok());
        opt_i64, get_i64 -> i64: "an integer", GgufValue::as_i64;
        /// A float of either width, or an integer.
        opt_f32, get_f32 -> f32: "a number", |v| v.as_f64().map(|x| x as f32);
        opt_bool, get_bool -> bool: "a bool", GgufValue::as_bool;
        opt_str, get_str -> &str: "a string", GgufValue::as_str;
        opt_array, get_array -> &[GgufValue]: "an array", GgufValue::as_array;
    }

    /// An array of strings (token lists, merges).
    pub fn opt_str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        self.typed(key, "an array of strings", |v| v.as_array()?.iter().map(GgufValue::as_str).collect())
    }

    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        Self::required(key, self.opt_str_array(key))
    }

    /// An array of integers of any width whose values fit an `i32` (token types).
    pub fn opt_i32_array(&self, key: &str) -> Result<Option<Vec<i32>>> {
        self.typed(key, "an array of integers that fit i32", |v| {
            v.as_array()?.iter().map(|x| x.as_i64().and_then(|x| i32::try_from(x).ok())).collect()
        })
    }

    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>> {
        Self::required(key, self.opt_i32_array(key))
    }

    /// An array of numbers (token scores).
    pub fn opt_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        self.typed(key, "an array of numbers", |v| v.as_array()?.iter().map(|x| x.as_f64().map(|x| x as f32)).collect())
    }

    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        Self::required(key, self.opt_f32_array(key))
    }

    /// The tensor table in file order.
    pub fn tensor_infos(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The stored bytes of a tensor of any ggml type, borrowed from the map (nothing is read).
    pub fn tensor_bytes(&self, name: &str) -> Result<HostBytes> {
        let info = self.tensor_info(name).ok_or_else(|| ModelError::MissingTensor(name.to_owned()))?;
        // Ranges were checked against the file when it was opened, so these additions cannot overflow.
        let start = self.data_offset + info.offset as usize;
        Ok(HostBytes::try_new(self.bytes.clone(), start..start + info.byte_len)?)
    }

    /// A tensor in a dtype shardline computes with, row-major shape, bytes borrowed from the map.
    pub fn tensor(&self, name: &str) -> Result<TensorEntry> {
        let info = self.tensor_info(name).ok_or_else(|| ModelError::MissingTensor(name.to_owned()))?;
        let dtype = info.dtype()?;
        Ok(TensorEntry { name: info.name.clone(), dtype, shape: info.shape(), bytes: self.tensor_bytes(name)? })
    }

    /// A small tensor decoded to f32 (F32, F16 or BF16 only): used for metadata-like tensors such as
    /// `rope_freqs.weight`.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let entry = self.tensor(name)?;
        decode_floats(&entry.name, entry.dtype, entry.bytes.as_slice())
    }
}

/// Decodes little-endian F32/F16/BF16 bytes; quantised dtypes are refused.
pub(crate) fn decode_floats(name: &str, dtype: DType, bytes: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DType::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        DType::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => {
            return Err(ModelError::UnsupportedTensorType {
                tensor: name.to_owned(),
                type_name: format!("{other} (a float type is needed here)"),
            });
        }
    })
}

fn describe(v: &GgufValue) -> String {
    match v {
        GgufValue::String(s) if s.len() > 40 => format!("a string of {} bytes", s.len()),
        GgufValue::Array(t, items) => format!("an array of {} {t:?}", items.len()),
        other => format!("{other:?}"),
    }
}

/// A bounds-checked cursor over the header.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a str,
}

impl<'a> Reader<'a> {
    fn corrupt(&self, detail: String) -> ModelError {
        ModelError::Corrupt { path: self.path.to_owned(), detail }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.corrupt(format!(
                "{what} at byte {} needs {n} bytes but only {} remain",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// `count` items of at least `min_len` bytes each must fit in what remains; returns it as a usize.
    fn bounded_count(&self, count: u64, min_len: usize, what: &str) -> Result<usize> {
        let fits =
            usize::try_from(count).ok().and_then(|c| c.checked_mul(min_len)).is_some_and(|b| b <= self.remaining());
        if fits {
            Ok(count as usize)
        } else {
            Err(self.corrupt(format!(
                "{what} {count} at byte {} cannot fit in the {} bytes that remain",
                self.pos,
                self.remaining()
            )))
        }
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let at = self.pos;
        let len = self.u64(what)?;
        let len = self.bounded_count(len, 1, what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.corrupt(format!("{what} at byte {at} is not UTF-8")))
    }

    fn value(&mut self, ty: u32, depth: usize, key: &str) -> Result<GgufValue> {
        let ty = GgufValueType::try_from(ty)
            .map_err(|_| self.corrupt(format!("metadata {key} has unknown value type {ty}")))?;
        Ok(match ty {
            GgufValueType::U8 => GgufValue::U8(u8::from_le_bytes(self.array(key)?)),
            GgufValueType::I8 => GgufValue::I8(i8::from_le_bytes(self.array(key)?)),
            GgufValueType::U16 => GgufValue::U16(u16::from_le_bytes(self.array(key)?)),
            GgufValueType::I16 => GgufValue::I16(i16::from_le_bytes(self.array(key)?)),
            GgufValueType::U32 => GgufValue::U32(u32::from_le_bytes(self.array(key)?)),
            GgufValueType::I32 => GgufValue::I32(i32::from_le_bytes(self.array(key)?)),
            GgufValueType::F32 => GgufValue::F32(f32::from_le_bytes(self.array(key)?)),
            GgufValueType::U64 => GgufValue::U64(u64::from_le_bytes(self.array(key)?)),
            GgufValueType::I64 => GgufValue::I64(i64::from_le_bytes(self.array(key)?)),
            GgufValueType::F64 => GgufValue::F64(f64::from_le_bytes(self.array(key)?)),
            GgufValueType::Bool => match self.take(1, key)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(self.corrupt(format!("metadata {key} has bool byte {b}"))),
            },
            GgufValueType::String => GgufValue::String(self.string(key)?),
            GgufValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.corrupt(format!("metadata {key} nests arrays deeper than {MAX_ARRAY_DEPTH}")));
                }
                let elem = self.u32(key)?;
                let elem_ty = GgufValueType::try_from(elem)
                    .map_err(|_| self.corrupt(format!("metadata {key} has unknown array element type {elem}")))?;
                let count = self.u64(key)?;
                let count = self.bounded_count(count, elem_ty.min_encoded_len(), key)?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(self.value(elem, depth + 1, key)?);
                }
                GgufValue::Array(elem_ty, items)
            }
        })
    }
}

/// A GGUF model seen as a [`WeightSource`]: the file plus the configuration read from its metadata.
#[derive(Debug)]
pub struct GgufWeights {
    file: Arc<GgufFile>,
    config: ModelConfig,
    table: Vec<TensorMeta>,
}

impl GgufWeights {
    /// Reads the configuration and checks that every tensor has a dtype shardline computes with, so an unsupported
    /// file (for example one with IQ2_XXS tensors) is refused when it is opened, naming the first such tensor.
    pub fn new(file: Arc<GgufFile>) -> Result<Self> {
        let config = ModelConfig::from_gguf(&file)?;
        let mut table = Vec::with_capacity(file.tensors.len());
        for info in &file.tensors {
            table.push(TensorMeta {
                name: info.name.clone(),
                dtype: info.dtype()?,
                shape: info.shape(),
                byte_len: info.byte_len,
            });
        }
        table.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self { file, config, table })
    }

    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::new(Arc::new(GgufFile::open(path)?))
    }

    pub fn file(&self) -> &Arc<GgufFile> {
        &self.file
    }
}

impl WeightSource for GgufWeights {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn tensor_table(&self) -> Vec<TensorMeta> {
        self.table.clone()
    }

    fn tensor(&self, name: &str) -> Result<TensorEntry> {
        self.file.tensor(name)
    }
}
