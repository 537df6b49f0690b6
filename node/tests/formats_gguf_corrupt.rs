//! Corrupt and hostile GGUF files give the right typed error, never a panic or a huge allocation.

use shardline_kernels::DType;
use shardline_node::ModelError;
use shardline_node::formats::MappedFile;
use shardline_node::formats::gguf::{GgmlType, GgufFile, GgufWeights};
use shardline_node::formats::gguf_writer::GgufWriter;
use shardline_node::test_models::{TinyDTypes, TinySpec, quantize, write_tiny_gguf};

/// A small but complete image: metadata of several types (strings, arrays) and three tensors.
fn sample() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.add("general.architecture", "llama").unwrap();
    w.add("tokenizer.ggml.tokens", vec!["a", "bb", "ccc"]).unwrap();
    w.add("x.scores", vec![1.0f32, 2.0]).unwrap();
    w.add("x.flag", true).unwrap();
    w.add_tensor("a", DType::F32, &[2, 4], quantize(DType::F32, &[0.5; 8]).unwrap()).unwrap();
    w.add_tensor("b", DType::Q8_0, &[1, 32], quantize(DType::Q8_0, &[0.25; 32]).unwrap()).unwrap();
    w.add_tensor("c", DType::F16, &[3], quantize(DType::F16, &[1.0; 3]).unwrap()).unwrap();
    w.to_bytes()
}

/// A named corruption of an image.
type Edit = Box<dyn Fn(&mut Vec<u8>)>;

fn parse(bytes: Vec<u8>) -> Result<GgufFile, ModelError> {
    GgufFile::from_bytes("test.gguf", bytes)
}

/// Byte offset of the first occurrence of `needle`.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).expect("needle present")
}

/// Byte offset of the last occurrence of `needle`.
fn rfind(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).rposition(|w| w == needle).expect("needle present")
}

fn put_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(bytes: &mut [u8], at: usize, v: u32) {
    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Where tensor `name`'s info starts (its name length field) and where its fields follow the name.
fn tensor_info_at(bytes: &[u8], name: &str) -> (usize, usize) {
    // Tensor infos follow all metadata (search from the end); the name is preceded by its u64 length.
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(name.as_bytes());
    needle.extend_from_slice(&[2, 0, 0, 0]); // n_dims = 2 for the tensors probed below
    let at = rfind(bytes, &needle);
    (at, at + 8 + name.len())
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let full = sample();
    let f = parse(full.clone()).unwrap();
    let data_end = f.data_offset() + f.tensor_infos().iter().map(|t| t.offset as usize + t.byte_len).max().unwrap();
    for cut in 0..full.len() {
        let res = parse(full[..cut].to_vec());
        if cut >= data_end {
            // Only trailing padding is gone: still a valid file.
            assert!(res.is_ok(), "cut at {cut}: {res:?}");
            continue;
        }
        match res {
            Err(ModelError::Corrupt { path, .. }) => assert_eq!(path, "test.gguf"),
            other => panic!("cut at {cut} of {}: {other:?}", full.len()),
        }
    }
}

#[test]
fn wrong_magic_and_versions() {
    let mut bytes = sample();
    bytes[0] = b'X';
    match parse(bytes) {
        Err(ModelError::BadMagic { found, .. }) => assert_eq!(&found, b"XGUF"),
        other => panic!("{other:?}"),
    }
    for version in [0u32, 1, 4, 0x0300_0000] {
        let mut bytes = sample();
        put_u32(&mut bytes, 4, version);
        match parse(bytes) {
            Err(ModelError::UnsupportedVersion { version: v, .. }) => assert_eq!(v, version),
            other => panic!("version {version}: {other:?}"),
        }
    }
    assert!(matches!(parse(b"GGML\0\0\0\0".to_vec()), Err(ModelError::BadMagic { .. })));
    assert!(matches!(parse(Vec::new()), Err(ModelError::Corrupt { .. })));
}

#[test]
fn missing_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.gguf");
    match GgufFile::open(&path) {
        Err(ModelError::Io { path: p, source }) => {
            assert_eq!(p, path.display().to_string());
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
    // An empty file is truncated, not an I/O error.
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(GgufFile::open(&empty), Err(ModelError::Corrupt { .. })));
}

#[test]
fn huge_counts_and_lengths_are_refused_before_allocating() {
    let base = sample();
    let corrupt = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut b = base.clone();
        edit(&mut b);
        parse(b)
    };
    let tokens_key = find(&base, b"tokenizer.ggml.tokens");
    let array_count_at = tokens_key + "tokenizer.ggml.tokens".len() + 4 + 4;
    let cases: Vec<(&str, Edit)> = vec![
        ("tensor count", Box::new(|b| put_u64(b, 8, u64::MAX))),
        ("tensor count", Box::new(|b| put_u64(b, 8, 1 << 40))),
        ("metadata count", Box::new(|b| put_u64(b, 16, u64::MAX / 2))),
        ("metadata count", Box::new(|b| put_u64(b, 16, 100))),
        ("key length", Box::new(|b| put_u64(b, 24, u64::MAX))),
        ("array count", Box::new(move |b| put_u64(b, array_count_at, 1 << 62))),
        ("array count", Box::new(move |b| put_u64(b, array_count_at, 1_000_000))),
        ("string length", Box::new(move |b| put_u64(b, array_count_at + 8, u64::MAX - 3))),
        ("value type", Box::new(move |b| put_u32(b, tokens_key + "tokenizer.ggml.tokens".len(), 13))),
        ("array element type", Box::new(move |b| put_u32(b, tokens_key + "tokenizer.ggml.tokens".len() + 4, 77))),
    ];
    for (what, edit) in cases {
        match corrupt(&*edit) {
            Err(ModelError::Corrupt { detail, .. }) => assert!(!detail.is_empty(), "{what}"),
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[test]
fn bad_tensor_infos() {
    let base = sample();
    let f = parse(base.clone()).unwrap();
    let (_, a_fields) = tensor_info_at(&base, "a");
    // Fields after the name: n_dims u32, ne[0] u64, ne[1] u64, type u32, offset u64.
    let (ne0, ne1, ty, off) = (a_fields + 4, a_fields + 12, a_fields + 20, a_fields + 24);
    let data_len = (base.len() - f.data_offset()) as u64;

    let cases: Vec<(&str, Edit)> = vec![
        ("beyond EOF", Box::new(move |b| put_u64(b, off, data_len.next_multiple_of(32)))),
        ("offset overflow", Box::new(move |b| put_u64(b, off, u64::MAX - 31))),
        ("unaligned offset", Box::new(move |b| put_u64(b, off, 4))),
        ("huge dims", Box::new(move |b| put_u64(b, ne1, 1 << 40))),
        (
            "dims overflow",
            Box::new(move |b| {
                put_u64(b, ne0, 1 << 33);
                put_u64(b, ne1, 1 << 33);
            }),
        ),
        ("too many dims", Box::new(move |b| put_u32(b, a_fields, 5))),
        ("partial block", Box::new(move |b| put_u32(b, ty, GgmlType::Q8_0.0))),
    ];
    for (what, edit) in cases {
        let mut b = base.clone();
        edit(&mut b);
        match parse(b) {
            Err(ModelError::Corrupt { detail, .. }) => assert!(detail.contains("tensor a"), "{what}: {detail}"),
            other => panic!("{what}: {other:?}"),
        }
    }

    // An id ggml does not define cannot even be sized.
    let mut b = base.clone();
    put_u32(&mut b, ty, 99);
    match parse(b) {
        Err(ModelError::UnsupportedTensorType { tensor, type_name }) => {
            assert_eq!((tensor.as_str(), type_name.as_str()), ("a", "type 99"));
        }
        other => panic!("{other:?}"),
    }

    // Duplicate names, an invalid bool byte, invalid UTF-8, a bad alignment value.
    let mut b = base.clone();
    let (b_at, _) = tensor_info_at(&base, "b");
    b[b_at + 8] = b'a';
    assert!(matches!(parse(b), Err(ModelError::Corrupt { detail, .. }) if detail.contains("twice")));
    let mut b = base.clone();
    let flag = find(&base, b"x.flag") + "x.flag".len() + 4;
    b[flag] = 2;
    assert!(matches!(parse(b), Err(ModelError::Corrupt { .. })));
    let mut b = base.clone();
    let arch = find(&base, b"llama");
    b[arch] = 0xff;
    assert!(matches!(parse(b), Err(ModelError::Corrupt { detail, .. }) if detail.contains("UTF-8")));
    let mut w = GgufWriter::new();
    w.add("general.alignment", 3u32).unwrap();
    assert!(matches!(parse(w.to_bytes()), Err(ModelError::BadMetadata { key, .. }) if key == "general.alignment"));
}

#[test]
fn duplicate_metadata_keys_are_corrupt() {
    let mut w = GgufWriter::new();
    w.add("k.one", 1u32).unwrap();
    w.add("k.two", 2u32).unwrap();
    let mut b = w.to_bytes();
    let two = find(&b, b"k.two");
    b[two..two + 5].copy_from_slice(b"k.one");
    assert!(matches!(parse(b), Err(ModelError::Corrupt { detail, .. }) if detail.contains("k.one")));
}

#[test]
fn deeply_nested_arrays_are_refused() {
    // An array of arrays nested 64 deep, written by hand: the reader stops at its depth limit.
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'k');
    b.extend_from_slice(&9u32.to_le_bytes());
    for _ in 0..64 {
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
    }
    b.extend_from_slice(&[0; 64]);
    assert!(matches!(parse(b), Err(ModelError::Corrupt { detail, .. }) if detail.contains("deeper")));
}

/// A complete tiny model (hidden and FFN widths 256) whose first FFN matrix is re-typed as `ggml_type` with the
/// given block bytes repeated; returns the directory holding `retyped.gguf` and the path.
fn retyped_model(ggml_type: GgmlType, block: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
    let spec = TinySpec {
        hidden: 256,
        n_heads: 4,
        n_kv_heads: 4,
        ffn: 256,
        dtypes: TinyDTypes::all(DType::F32),
        ..TinySpec::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&spec, &path).unwrap();
    let tiny = GgufFile::open(&path).unwrap();

    let mut w = GgufWriter::new();
    for (k, v) in tiny.metadata() {
        w.add(k, v.clone()).unwrap();
    }
    for info in tiny.tensor_infos() {
        let bytes = tiny.tensor_bytes(&info.name).unwrap().as_slice().to_vec();
        if info.name == "blk.0.ffn_up.weight" {
            let (elems, size) = ggml_type.block().unwrap();
            assert_eq!(size, block.len());
            let data = block.repeat(info.elem_count() as usize / elems);
            w.add_raw_tensor(&info.name, ggml_type, info.ne.clone(), data).unwrap();
        } else {
            w.add_raw_tensor(&info.name, info.ggml_type, info.ne.clone(), bytes).unwrap();
        }
    }
    let path = dir.path().join("retyped.gguf");
    w.write(&path).unwrap();
    (dir, path)
}

#[test]
fn unsupported_quantisations_open_as_files_but_not_as_weights() {
    for (ggml_type, name) in [(GgmlType::IQ2_XXS, "IQ2_XXS"), (GgmlType(34), "TQ1_0")] {
        let (_, size) = ggml_type.block().unwrap();
        let (_dir, path) = retyped_model(ggml_type, &vec![0x11; size]);
        let file = GgufFile::open(&path).expect("metadata of the file is readable");
        assert_eq!(file.tensor_info("blk.0.ffn_up.weight").unwrap().ggml_type.name(), name);
        let expect_refused = |r: Result<(), ModelError>| match r {
            Err(ModelError::UnsupportedTensorType { tensor, type_name }) => {
                assert_eq!((tensor.as_str(), type_name.as_str()), ("blk.0.ffn_up.weight", name));
            }
            other => panic!("{other:?}"),
        };
        expect_refused(file.tensor("blk.0.ffn_up.weight").map(|_| ()));
        expect_refused(GgufWeights::open(&path).map(|_| ()));
        let msg = GgufWeights::open(&path).unwrap_err().to_string();
        assert!(msg.contains(name) && msg.contains("blk.0.ffn_up.weight"), "{msg}");
    }
}

#[test]
fn every_common_quantisation_loads_as_weights() {
    let types = [
        (GgmlType::Q5_0, DType::Q5_0),
        (GgmlType::Q5_1, DType::Q5_1),
        (GgmlType::IQ4_NL, DType::IQ4_NL),
        (GgmlType::Q2_K, DType::Q2_K),
        (GgmlType::Q3_K, DType::Q3_K),
        (GgmlType::Q4_K, DType::Q4_K),
        (GgmlType::Q5_K, DType::Q5_K),
        (GgmlType::Q6_K, DType::Q6_K),
        (GgmlType::IQ4_XS, DType::IQ4_XS),
    ];
    for (ggml_type, dtype) in types {
        assert_eq!(ggml_type.dtype(), Some(dtype));
        assert_eq!(GgmlType::from_dtype(dtype), ggml_type);
        assert_eq!(ggml_type.block(), Some((dtype.block_elems(), dtype.block_bytes())), "{dtype}");
        // Bytes 0x11, 0x12, 0x13, …: small positive f16 scales (high byte 0x11..0x13) and varied codes and
        // sub-scales, a valid block of every format.
        let block: Vec<u8> = (0..dtype.block_bytes()).map(|i| 0x11 + (i % 3) as u8).collect();
        let (_dir, path) = retyped_model(ggml_type, &block);
        GgufWeights::open(&path).unwrap_or_else(|e| panic!("{dtype}: {e}"));
        let file = GgufFile::open(&path).unwrap();
        let entry = file.tensor("blk.0.ffn_up.weight").unwrap();
        assert_eq!(entry.dtype, dtype);
        assert_eq!(entry.bytes.as_slice(), block.repeat(256 * 256 / dtype.block_elems()).as_slice(), "{dtype}");
        let mut row = vec![0.0f32; 256];
        shardline_kernels::quant::dequantize_row(dtype, entry.bytes.as_slice(), 256, 255, &mut row).unwrap();
        assert!(row.iter().all(|v| v.is_finite()) && row.iter().any(|&v| v != 0.0), "{dtype}");
    }
}
