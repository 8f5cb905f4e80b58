//! A small, defensive reader for the metadata section of a GGUF file.
//!
//! GGUF (llama.cpp's model format) opens with a header (magic `GGUF`, version, tensor count,
//! key/value count) followed by typed key/value pairs: the tokenizer, the chat template and the
//! model's hyper-parameters. This reader parses only that section and stops before the tensor
//! infos, so reading the tokenizer of a 100 MB model touches a few megabytes. Every length read
//! from the file is checked against the bytes that remain before anything is allocated: a
//! truncated or corrupted file is a [`GgufError`], never a panic or a huge allocation.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// Arrays of arrays are legal GGUF but never deep in practice; the limit keeps a crafted file
/// from recursing the reader into a stack overflow.
const MAX_ARRAY_DEPTH: u32 = 4;

/// The smallest possible key/value entry: an empty key (8-byte length), the value type (4 bytes)
/// and a one-byte value.
const MIN_ENTRY_BYTES: u64 = 8 + 4 + 1;

/// Why the metadata of a GGUF file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or its size read.
    #[error("cannot open GGUF file {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// Reading failed for a reason other than running out of bytes.
    #[error("I/O error reading GGUF metadata at byte {offset}: {source}")]
    Io {
        /// Where in the file.
        offset: u64,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The file does not start with `GGUF`.
    #[error("not a GGUF file: it starts with bytes {found:02x?}, expected \"GGUF\"")]
    BadMagic {
        /// The first four bytes found.
        found: [u8; 4],
    },
    /// A GGUF version this reader does not understand (1 used 32-bit lengths; a byte-swapped
    /// number means a big-endian file).
    #[error("unsupported GGUF version {0} (supported: 2 and 3, little-endian)")]
    UnsupportedVersion(u32),
    /// The metadata ends before the header said it would.
    #[error("GGUF metadata is truncated: needed {needed} bytes at byte {offset}, but the file ends at byte {file_len}")]
    Truncated {
        /// Where the read started.
        offset: u64,
        /// How many bytes it needed.
        needed: u64,
        /// The length of the input.
        file_len: u64,
    },
    /// A count or length that cannot fit in what remains of the file.
    #[error("GGUF {what} at byte {offset} claims {len} elements/bytes, more than the {remaining} bytes left in the file")]
    LengthTooLarge {
        /// Which length (key, string, array, key/value count).
        what: &'static str,
        /// Where it was read.
        offset: u64,
        /// The value read.
        len: u64,
        /// The bytes that remain after it.
        remaining: u64,
    },
    /// A value type tag outside the thirteen GGUF defines.
    #[error("unknown GGUF value type {value_type} at byte {offset}")]
    UnknownValueType {
        /// The tag read.
        value_type: u32,
        /// Where it was read.
        offset: u64,
    },
    /// A boolean stored as something other than 0 or 1.
    #[error("invalid GGUF bool {value} at byte {offset}")]
    InvalidBool {
        /// The byte read.
        value: u8,
        /// Where it was read.
        offset: u64,
    },
    /// A key or string value that is not UTF-8.
    #[error("GGUF string at byte {offset} is not valid UTF-8")]
    InvalidUtf8 {
        /// Where the string's bytes start.
        offset: u64,
    },
    /// Arrays nested deeper than any real file uses.
    #[error("GGUF arrays nested more than {MAX_ARRAY_DEPTH} deep at byte {offset}")]
    TooDeep {
        /// Where the innermost array starts.
        offset: u64,
    },
    /// The same key appears twice.
    #[error("duplicate GGUF key {key:?}")]
    DuplicateKey {
        /// The repeated key.
        key: String,
    },
}

/// The type tag of a GGUF value, as numbered by the format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    fn from_tag(tag: u32, offset: u64) -> Result<Self, GgufError> {
        Ok(match tag {
            0 => Self::U8,
            1 => Self::I8,
            2 => Self::U16,
            3 => Self::I16,
            4 => Self::U32,
            5 => Self::I32,
            6 => Self::F32,
            7 => Self::Bool,
            8 => Self::String,
            9 => Self::Array,
            10 => Self::U64,
            11 => Self::I64,
            12 => Self::F64,
            value_type => return Err(GgufError::UnknownValueType { value_type, offset }),
        })
    }

    /// The fewest bytes one value of this type occupies; used to reject element counts that
    /// cannot fit in the rest of the file before allocating for them.
    fn min_size(self) -> u64 {
        match self {
            Self::U8 | Self::I8 | Self::Bool => 1,
            Self::U16 | Self::I16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 | Self::String => 8,
            // Element type tag plus element count.
            Self::Array => 12,
        }
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// `uint8`.
    U8(u8),
    /// `int8`.
    I8(i8),
    /// `uint16`.
    U16(u16),
    /// `int16`.
    I16(i16),
    /// `uint32`.
    U32(u32),
    /// `int32`.
    I32(i32),
    /// `float32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// `string`.
    String(String),
    /// `array`: a typed, homogeneous list.
    Array(GgufArray),
    /// `uint64`.
    U64(u64),
    /// `int64`.
    I64(i64),
    /// `float64`.
    F64(f64),
}

/// A GGUF array, stored per element type so that a 49,152-entry `int32` array costs 192 KiB, not
/// 49,152 enum values.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufArray {
    /// `uint8` elements.
    U8(Vec<u8>),
    /// `int8` elements.
    I8(Vec<i8>),
    /// `uint16` elements.
    U16(Vec<u16>),
    /// `int16` elements.
    I16(Vec<i16>),
    /// `uint32` elements.
    U32(Vec<u32>),
    /// `int32` elements.
    I32(Vec<i32>),
    /// `float32` elements.
    F32(Vec<f32>),
    /// `bool` elements.
    Bool(Vec<bool>),
    /// `string` elements.
    String(Vec<String>),
    /// Nested arrays.
    Array(Vec<GgufArray>),
    /// `uint64` elements.
    U64(Vec<u64>),
    /// `int64` elements.
    I64(Vec<i64>),
    /// `float64` elements.
    F64(Vec<f64>),
}

impl GgufArray {
    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::U8(v) => v.len(),
            Self::I8(v) => v.len(),
            Self::U16(v) => v.len(),
            Self::I16(v) => v.len(),
            Self::U32(v) => v.len(),
            Self::I32(v) => v.len(),
            Self::F32(v) => v.len(),
            Self::Bool(v) => v.len(),
            Self::String(v) => v.len(),
            Self::Array(v) => v.len(),
            Self::U64(v) => v.len(),
            Self::I64(v) => v.len(),
            Self::F64(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The GGUF name of the element type, for error messages.
    pub fn element_type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "uint8",
            Self::I8(_) => "int8",
            Self::U16(_) => "uint16",
            Self::I16(_) => "int16",
            Self::U32(_) => "uint32",
            Self::I32(_) => "int32",
            Self::F32(_) => "float32",
            Self::Bool(_) => "bool",
            Self::String(_) => "string",
            Self::Array(_) => "array",
            Self::U64(_) => "uint64",
            Self::I64(_) => "int64",
            Self::F64(_) => "float64",
        }
    }
}

impl GgufValue {
    /// The GGUF name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "uint8",
            Self::I8(_) => "int8",
            Self::U16(_) => "uint16",
            Self::I16(_) => "int16",
            Self::U32(_) => "uint32",
            Self::I32(_) => "int32",
            Self::F32(_) => "float32",
            Self::Bool(_) => "bool",
            Self::String(_) => "string",
            Self::Array(_) => "array",
            Self::U64(_) => "uint64",
            Self::I64(_) => "int64",
            Self::F64(_) => "float64",
        }
    }

    /// The value as a `u32` if it is an integer that fits (writers differ in which integer type
    /// they use for ids and lengths).
    pub fn as_u32(&self) -> Option<u32> {
        match *self {
            Self::U8(v) => Some(u32::from(v)),
            Self::U16(v) => Some(u32::from(v)),
            Self::U32(v) => Some(v),
            Self::I8(v) => u32::try_from(v).ok(),
            Self::I16(v) => u32::try_from(v).ok(),
            Self::I32(v) => u32::try_from(v).ok(),
            Self::U64(v) => u32::try_from(v).ok(),
            Self::I64(v) => u32::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a string slice if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array if it is one.
    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The header and key/value metadata of a GGUF file (tensor infos and data are not read).
#[derive(Clone, Debug)]
pub struct GgufMetadata {
    /// The format version (2 or 3).
    pub version: u32,
    /// How many tensors the file declares.
    pub tensor_count: u64,
    entries: HashMap<String, GgufValue>,
}

impl GgufMetadata {
    /// Reads the metadata section of the GGUF file at `path`, buffered.
    pub fn read_file(path: &Path) -> Result<Self, GgufError> {
        let open_error = |source| GgufError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(open_error)?;
        let file_len = file.metadata().map_err(open_error)?.len();
        Self::read_from(BufReader::with_capacity(1 << 16, file), file_len)
    }

    /// Reads GGUF metadata from `reader`, whose total length is `input_len` bytes; every length
    /// in the input is checked against it.
    pub fn read_from<R: Read>(reader: R, input_len: u64) -> Result<Self, GgufError> {
        let mut input = Input {
            reader,
            offset: 0,
            len: input_len,
        };
        let mut magic = [0u8; 4];
        input.read_exact(&mut magic)?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = input.read_u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let tensor_count = input.read_u64()?;
        let kv_offset = input.offset;
        let kv_count = input.read_u64()?;
        input.check_count("key/value count", kv_offset, kv_count, MIN_ENTRY_BYTES)?;

        let mut entries = HashMap::new();
        for _ in 0..kv_count {
            let key = input.read_string("key")?;
            let type_offset = input.offset;
            let value_type = ValueType::from_tag(input.read_u32()?, type_offset)?;
            let value = input.read_value(value_type, 0)?;
            if entries.contains_key(&key) {
                return Err(GgufError::DuplicateKey { key });
            }
            entries.insert(key, value);
        }
        Ok(Self {
            version,
            tensor_count,
            entries,
        })
    }

    /// The value stored under `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.entries.get(key)
    }

    /// All keys, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The number of key/value pairs.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the file has no metadata at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A reader that knows its position and how many bytes remain.
struct Input<R> {
    reader: R,
    offset: u64,
    len: u64,
}

impl<R: Read> Input<R> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.offset)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), GgufError> {
        let needed = buf.len() as u64;
        let truncated = GgufError::Truncated {
            offset: self.offset,
            needed,
            file_len: self.len,
        };
        if needed > self.remaining() {
            return Err(truncated);
        }
        match self.reader.read_exact(buf) {
            Ok(()) => {
                self.offset += needed;
                Ok(())
            }
            // The input was shorter than its declared length.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(truncated),
            Err(source) => Err(GgufError::Io {
                offset: self.offset,
                source,
            }),
        }
    }

    fn read_array<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut buf = [0u8; N];
        self.read_exact(&mut buf)?;
        Ok(buf)
    }

    fn read_u32(&mut self) -> Result<u32, GgufError> {
        self.read_array().map(u32::from_le_bytes)
    }

    fn read_u64(&mut self) -> Result<u64, GgufError> {
        self.read_array().map(u64::from_le_bytes)
    }

    /// Rejects a count of elements, each at least `min_size` bytes, that cannot fit in the rest of
    /// the input.
    fn check_count(
        &self,
        what: &'static str,
        offset: u64,
        count: u64,
        min_size: u64,
    ) -> Result<(), GgufError> {
        let remaining = self.remaining();
        if count.saturating_mul(min_size) > remaining {
            return Err(GgufError::LengthTooLarge {
                what,
                offset,
                len: count,
                remaining,
            });
        }
        Ok(())
    }

    fn read_string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let len_offset = self.offset;
        let len = self.read_u64()?;
        self.check_count(what, len_offset, len, 1)?;
        // `check_count` bounded `len` by the input length, which fits in memory's address space
        // only if the input does; a length that does not fit in usize is too large by definition.
        let len = usize::try_from(len).map_err(|_| GgufError::LengthTooLarge {
            what,
            offset: len_offset,
            len,
            remaining: self.remaining(),
        })?;
        let start = self.offset;
        let mut bytes = vec![0u8; len];
        self.read_exact(&mut bytes)?;
        String::from_utf8(bytes).map_err(|_| GgufError::InvalidUtf8 { offset: start })
    }

    fn read_bool(&mut self) -> Result<bool, GgufError> {
        let offset = self.offset;
        match self.read_array::<1>()?[0] {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(GgufError::InvalidBool { value, offset }),
        }
    }

    fn read_value(&mut self, value_type: ValueType, depth: u32) -> Result<GgufValue, GgufError> {
        Ok(match value_type {
            ValueType::U8 => GgufValue::U8(u8::from_le_bytes(self.read_array()?)),
            ValueType::I8 => GgufValue::I8(i8::from_le_bytes(self.read_array()?)),
            ValueType::U16 => GgufValue::U16(u16::from_le_bytes(self.read_array()?)),
            ValueType::I16 => GgufValue::I16(i16::from_le_bytes(self.read_array()?)),
            ValueType::U32 => GgufValue::U32(self.read_u32()?),
            ValueType::I32 => GgufValue::I32(i32::from_le_bytes(self.read_array()?)),
            ValueType::F32 => GgufValue::F32(f32::from_le_bytes(self.read_array()?)),
            ValueType::Bool => GgufValue::Bool(self.read_bool()?),
            ValueType::String => GgufValue::String(self.read_string("string")?),
            ValueType::Array => GgufValue::Array(self.read_gguf_array(depth)?),
            ValueType::U64 => GgufValue::U64(self.read_u64()?),
            ValueType::I64 => GgufValue::I64(i64::from_le_bytes(self.read_array()?)),
            ValueType::F64 => GgufValue::F64(f64::from_le_bytes(self.read_array()?)),
        })
    }

    fn read_gguf_array(&mut self, depth: u32) -> Result<GgufArray, GgufError> {
        let start = self.offset;
        if depth >= MAX_ARRAY_DEPTH {
            return Err(GgufError::TooDeep { offset: start });
        }
        let element_type = ValueType::from_tag(self.read_u32()?, start)?;
        let len_offset = self.offset;
        let len = self.read_u64()?;
        self.check_count("array", len_offset, len, element_type.min_size())?;
        // Bounded by the input length above; still, grow rather than trust the count with one
        // allocation of (count × element size in memory).
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        let capacity = len.min(1 << 16);

        macro_rules! elements {
            ($variant:ident, $read:expr) => {{
                let mut items = Vec::with_capacity(capacity);
                for _ in 0..len {
                    items.push($read(&mut *self)?);
                }
                GgufArray::$variant(items)
            }};
        }
        Ok(match element_type {
            ValueType::U8 => elements!(U8, |s: &mut Self| s.read_array().map(u8::from_le_bytes)),
            ValueType::I8 => elements!(I8, |s: &mut Self| s.read_array().map(i8::from_le_bytes)),
            ValueType::U16 => {
                elements!(U16, |s: &mut Self| s.read_array().map(u16::from_le_bytes))
            }
            ValueType::I16 => {
                elements!(I16, |s: &mut Self| s.read_array().map(i16::from_le_bytes))
            }
            ValueType::U32 => elements!(U32, |s: &mut Self| s.read_u32()),
            ValueType::I32 => {
                elements!(I32, |s: &mut Self| s.read_array().map(i32::from_le_bytes))
            }
            ValueType::F32 => {
                elements!(F32, |s: &mut Self| s.read_array().map(f32::from_le_bytes))
            }
            ValueType::Bool => elements!(Bool, |s: &mut Self| s.read_bool()),
            ValueType::String => elements!(String, |s: &mut Self| s.read_string("string")),
            ValueType::Array => elements!(Array, |s: &mut Self| s.read_gguf_array(depth + 1)),
            ValueType::U64 => elements!(U64, |s: &mut Self| s.read_u64()),
            ValueType::I64 => {
                elements!(I64, |s: &mut Self| s.read_array().map(i64::from_le_bytes))
            }
            ValueType::F64 => {
                elements!(F64, |s: &mut Self| s.read_array().map(f64::from_le_bytes))
            }
        })
    }
}
