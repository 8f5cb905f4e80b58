//! The GGUF reader on crafted bytes: every value type, truncation, bad headers, absurd lengths
//! and malformed values as typed errors.

use super::*;

/// One entry of every scalar type, a string array and a nested array.
fn every_type() -> GgufBytes {
    let mut g = GgufBytes::new(15);
    g.string("u8").u32(0).raw(&[7]);
    g.string("i8").u32(1).raw(&(-7i8).to_le_bytes());
    g.string("u16").u32(2).raw(&700u16.to_le_bytes());
    g.string("i16").u32(3).raw(&(-700i16).to_le_bytes());
    g.kv_u32("u32", 70_000);
    g.string("i32").u32(5).raw(&(-70_000i32).to_le_bytes());
    g.string("f32").u32(6).raw(&1.5f32.to_le_bytes());
    g.string("bool").u32(7).raw(&[1]);
    g.kv_string("string", "héllo");
    g.kv_strings("strings", &["a".to_string(), "b c".to_string()]);
    g.string("u64").u32(10).u64(1 << 40);
    g.string("i64").u32(11).raw(&(-(1i64 << 40)).to_le_bytes());
    g.string("f64").u32(12).raw(&2.25f64.to_le_bytes());
    g.kv_i32s("i32s", &[3, -1]);
    // An array of two arrays of u8.
    g.string("nested").u32(9).u32(9).u64(2);
    g.u32(0).u64(2).raw(&[1, 2]);
    g.u32(0).u64(0);
    g
}

#[test]
fn reads_every_value_type() {
    let metadata = every_type().parse().expect("valid crafted GGUF");
    assert_eq!(metadata.version, 3);
    assert_eq!(metadata.len(), 15);
    assert_eq!(metadata.get("u8"), Some(&GgufValue::U8(7)));
    assert_eq!(metadata.get("i8"), Some(&GgufValue::I8(-7)));
    assert_eq!(metadata.get("u16"), Some(&GgufValue::U16(700)));
    assert_eq!(metadata.get("i16"), Some(&GgufValue::I16(-700)));
    assert_eq!(
        metadata.get("u32").and_then(GgufValue::as_u32),
        Some(70_000)
    );
    assert_eq!(metadata.get("i32"), Some(&GgufValue::I32(-70_000)));
    assert_eq!(metadata.get("f32"), Some(&GgufValue::F32(1.5)));
    assert_eq!(
        metadata.get("bool").and_then(GgufValue::as_bool),
        Some(true)
    );
    assert_eq!(
        metadata.get("string").and_then(GgufValue::as_str),
        Some("héllo")
    );
    assert_eq!(
        metadata.get("strings"),
        Some(&GgufValue::Array(GgufArray::String(vec![
            "a".into(),
            "b c".into()
        ])))
    );
    assert_eq!(metadata.get("u64"), Some(&GgufValue::U64(1 << 40)));
    assert_eq!(metadata.get("i64"), Some(&GgufValue::I64(-(1 << 40))));
    assert_eq!(metadata.get("f64"), Some(&GgufValue::F64(2.25)));
    assert_eq!(
        metadata.get("i32s"),
        Some(&GgufValue::Array(GgufArray::I32(vec![3, -1])))
    );
    assert_eq!(
        metadata.get("nested"),
        Some(&GgufValue::Array(GgufArray::Array(vec![
            GgufArray::U8(vec![1, 2]),
            GgufArray::U8(vec![]),
        ])))
    );
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let full = every_type().bytes;
    for cut in 0..full.len() {
        let result = GgufMetadata::read_from(Cursor::new(&full[..cut]), cut as u64);
        assert!(
            matches!(
                result,
                Err(GgufError::Truncated { .. } | GgufError::LengthTooLarge { .. })
            ),
            "cut at {cut}: {result:?}"
        );
    }
}

#[test]
fn a_reader_shorter_than_its_declared_length_is_truncated() {
    let full = every_type().bytes;
    let short = &full[..full.len() / 2];
    let result = GgufMetadata::read_from(Cursor::new(short), full.len() as u64);
    assert!(
        matches!(result, Err(GgufError::Truncated { .. })),
        "{result:?}"
    );
}

#[test]
fn a_truncated_file_on_disk_is_an_error() {
    let dir = crate::models::tests::TempDir::new("gguf-truncated");
    let path = dir.path().join("cut.gguf");
    let full = every_type().bytes;
    std::fs::write(&path, &full[..full.len() - 3]).expect("write test file");
    let result = GgufMetadata::read_file(&path);
    assert!(
        matches!(
            result,
            Err(GgufError::Truncated { .. } | GgufError::LengthTooLarge { .. })
        ),
        "{result:?}"
    );
    let missing = GgufMetadata::read_file(&dir.path().join("absent.gguf"));
    assert!(
        matches!(missing, Err(GgufError::Open { .. })),
        "{missing:?}"
    );
}

#[test]
fn bad_magic_and_versions_are_rejected() {
    let mut bytes = every_type().bytes;
    bytes[..4].copy_from_slice(b"GGML");
    let result = GgufMetadata::read_from(Cursor::new(&bytes), bytes.len() as u64);
    assert!(matches!(result, Err(GgufError::BadMagic { found }) if &found == b"GGML"));

    for version in [1u32, 4, 3u32.swap_bytes()] {
        let mut bytes = every_type().bytes;
        bytes[4..8].copy_from_slice(&version.to_le_bytes());
        let result = GgufMetadata::read_from(Cursor::new(&bytes), bytes.len() as u64);
        assert!(
            matches!(result, Err(GgufError::UnsupportedVersion(v)) if v == version),
            "{result:?}"
        );
    }
}

#[test]
fn absurd_lengths_are_rejected_before_allocating() {
    // A key/value count no file of this size could hold.
    let result = GgufBytes::new(u64::MAX).parse();
    assert!(
        matches!(
            result,
            Err(GgufError::LengthTooLarge {
                what: "key/value count",
                ..
            })
        ),
        "{result:?}"
    );
    // A key claiming 2^63 bytes.
    let result = GgufBytes::new(1).u64(1 << 63).raw(&[b'k'; 32]).parse();
    assert!(
        matches!(result, Err(GgufError::LengthTooLarge { what: "key", .. })),
        "{result:?}"
    );
    // A string value claiming more bytes than remain.
    let result = GgufBytes::new(1)
        .string("k")
        .u32(8)
        .u64(1000)
        .raw(b"short")
        .parse();
    assert!(
        matches!(
            result,
            Err(GgufError::LengthTooLarge { what: "string", .. })
        ),
        "{result:?}"
    );
    // An array of u64::MAX u32s.
    let result = GgufBytes::new(1)
        .string("k")
        .u32(9)
        .u32(4)
        .u64(u64::MAX)
        .parse();
    assert!(
        matches!(result, Err(GgufError::LengthTooLarge { what: "array", .. })),
        "{result:?}"
    );
    // An array of 2^60 strings: each needs at least 8 bytes.
    let result = GgufBytes::new(1)
        .string("k")
        .u32(9)
        .u32(8)
        .u64(1 << 60)
        .raw(&[0; 64])
        .parse();
    assert!(
        matches!(result, Err(GgufError::LengthTooLarge { what: "array", .. })),
        "{result:?}"
    );
}

#[test]
fn malformed_values_are_typed_errors() {
    let result = GgufBytes::new(1).string("k").u32(13).u32(0).parse();
    assert!(
        matches!(
            result,
            Err(GgufError::UnknownValueType { value_type: 13, .. })
        ),
        "{result:?}"
    );
    let result = GgufBytes::new(1).string("k").u32(9).u32(99).u64(0).parse();
    assert!(
        matches!(
            result,
            Err(GgufError::UnknownValueType { value_type: 99, .. })
        ),
        "{result:?}"
    );
    let result = GgufBytes::new(1).string("k").u32(7).raw(&[2]).parse();
    assert!(
        matches!(result, Err(GgufError::InvalidBool { value: 2, .. })),
        "{result:?}"
    );
    let result = GgufBytes::new(1)
        .u64(2)
        .raw(&[0xff, 0xfe])
        .u32(0)
        .raw(&[0])
        .parse();
    assert!(
        matches!(result, Err(GgufError::InvalidUtf8 { offset: 32 })),
        "{result:?}"
    );
    let result = GgufBytes::new(2).kv_u32("k", 1).kv_u32("k", 2).parse();
    assert!(
        matches!(&result, Err(GgufError::DuplicateKey { key }) if key == "k"),
        "{result:?}"
    );

    // Arrays of arrays of ... deeper than any real file.
    let mut g = GgufBytes::new(1);
    g.string("k").u32(9);
    for _ in 0..10 {
        g.u32(9).u64(1);
    }
    g.u32(0).u64(0);
    let result = g.parse();
    assert!(
        matches!(result, Err(GgufError::TooDeep { .. })),
        "{result:?}"
    );
}

#[test]
fn errors_render_actionable_messages() {
    let message = GgufBytes::new(1)
        .string("k")
        .u32(9)
        .u32(4)
        .u64(u64::MAX)
        .parse();
    let message = message.map(|_| ()).unwrap_err().to_string();
    assert!(
        message.contains("array") && message.contains("bytes left"),
        "{message}"
    );
}
