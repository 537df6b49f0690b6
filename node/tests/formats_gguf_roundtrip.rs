//! GGUF writer → reader round trips: every metadata value type (nested and empty arrays included), every dtype,
//! both versions, default and custom alignment, and the typed getters.

use shardline_kernels::DType;
use shardline_node::ModelError;
use shardline_node::formats::MappedFile;
use shardline_node::formats::gguf::{GgmlType, GgufFile, GgufValue, GgufValueType};
use shardline_node::formats::gguf_writer::GgufWriter;
use shardline_node::test_models::{dequantize, quantize};

fn every_value() -> Vec<(&'static str, GgufValue)> {
    vec![
        ("t.u8", GgufValue::U8(200)),
        ("t.i8", GgufValue::I8(-100)),
        ("t.u16", GgufValue::U16(60_000)),
        ("t.i16", GgufValue::I16(-30_000)),
        ("t.u32", GgufValue::U32(4_000_000_000)),
        ("t.i32", GgufValue::I32(-2_000_000_000)),
        ("t.f32", GgufValue::F32(-1.5e-7)),
        ("t.bool", GgufValue::Bool(true)),
        ("t.string", GgufValue::String("héllo\nwörld ✓".into())),
        ("t.empty_string", GgufValue::String(String::new())),
        ("t.u64", GgufValue::U64(u64::MAX)),
        ("t.i64", GgufValue::I64(i64::MIN)),
        ("t.f64", GgufValue::F64(std::f64::consts::PI)),
        ("t.arr_u8", vec![1u8, 2, 3].into()),
        ("t.arr_i32", vec![-1i32, 0, 7].into()),
        ("t.arr_f32", vec![0.5f32, -2.25].into()),
        ("t.arr_f64", vec![1e300f64].into()),
        ("t.arr_bool", vec![true, false, true].into()),
        ("t.arr_str", vec!["a", "", "ccc"].into()),
        ("t.arr_empty", GgufValue::Array(GgufValueType::U64, vec![])),
        (
            "t.arr_nested",
            GgufValue::Array(
                GgufValueType::Array,
                vec![
                    vec![1u16, 2].into(),
                    GgufValue::Array(GgufValueType::String, vec![]),
                    GgufValue::Array(GgufValueType::Array, vec![vec![-3i64].into()]),
                ],
            ),
        ),
    ]
}

/// Deterministic, never-zero test values.
fn values(n: usize, salt: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 * 0.37 + salt).sin() + 0.01) * 0.5).collect()
}

#[test]
fn every_metadata_type_and_dtype_round_trips() {
    for (version, alignment) in [(3, 32), (2, 32), (3, 64), (2, 8), (3, 1)] {
        let mut w = GgufWriter::new().version(version).unwrap().alignment(alignment).unwrap();
        for (k, v) in every_value() {
            w.add(k, v).unwrap();
        }
        let mut expected = Vec::new();
        for (i, dtype) in DType::ENCODABLE.into_iter().enumerate() {
            // 3-D and 1-D shapes as well as matrices; quantised inner dimensions are multiples of 32.
            let shape: Vec<usize> = match i % 3 {
                0 => vec![3, 64],
                1 => vec![2, 2, 32],
                _ => vec![96],
            };
            let bytes = quantize(dtype, &values(shape.iter().product(), i as f32)).unwrap();
            let name = format!("tensor.{}", dtype.name());
            w.add_tensor(&name, dtype, &shape, bytes.clone()).unwrap();
            expected.push((name, dtype, shape, bytes));
        }
        let image = w.to_bytes();
        let f = GgufFile::from_bytes("roundtrip.gguf", image.clone()).unwrap();

        assert_eq!(f.version(), version);
        assert_eq!(f.alignment(), alignment);
        assert_eq!(f.data_offset() % alignment, 0);
        let expected_meta: Vec<_> = every_value();
        let extra = usize::from(alignment != 32);
        assert_eq!(f.metadata().count(), expected_meta.len() + extra);
        for (k, v) in &expected_meta {
            assert_eq!(f.get(k), Some(v), "{k} (v{version}, align {alignment})");
        }
        // The file order of metadata is kept.
        let keys: Vec<&str> = f.metadata().map(|(k, _)| k).filter(|k| k.starts_with("t.")).collect();
        assert_eq!(keys, expected_meta.iter().map(|(k, _)| *k).collect::<Vec<_>>());

        assert_eq!(f.tensor_infos().len(), expected.len());
        for (name, dtype, shape, bytes) in &expected {
            let info = f.tensor_info(name).unwrap();
            assert_eq!(info.ggml_type, GgmlType::from_dtype(*dtype));
            assert_eq!(info.ne, shape.iter().rev().map(|&d| d as u64).collect::<Vec<_>>(), "ne is reversed");
            assert_eq!(info.offset % alignment as u64, 0);
            let t = f.tensor(name).unwrap();
            assert_eq!((&t.name, t.dtype, &t.shape), (name, *dtype, shape));
            assert_eq!(t.bytes.as_slice(), bytes.as_slice(), "{name}");
            // The window lies exactly where the table says, inside the image.
            let start = f.data_offset() + info.offset as usize;
            assert_eq!(&image[start..start + bytes.len()], bytes.as_slice());
        }
    }
}

#[test]
fn reading_from_disk_equals_reading_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let mut w = GgufWriter::new();
    w.add("general.architecture", "llama").unwrap();
    w.add_tensor("x", DType::F16, &[4, 8], quantize(DType::F16, &values(32, 1.0)).unwrap()).unwrap();
    w.write(&path).unwrap();
    let disk = GgufFile::open(&path).unwrap();
    let mem = GgufFile::from_bytes(&path, std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(disk.tensor_infos(), mem.tensor_infos());
    assert_eq!(disk.tensor("x").unwrap().bytes.as_slice(), mem.tensor("x").unwrap().bytes.as_slice());
    assert_eq!(disk.file_len(), std::fs::metadata(&path).unwrap().len() as usize);
    assert_eq!(disk.path(), path);
}

#[test]
fn quantised_tensors_survive_the_file_bit_for_bit() {
    let x = values(4 * 64, 2.0);
    for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
        let bytes = quantize(dtype, &x).unwrap();
        let mut w = GgufWriter::new();
        w.add_tensor("w", dtype, &[4, 64], bytes.clone()).unwrap();
        let f = GgufFile::from_bytes("q.gguf", w.to_bytes()).unwrap();
        let back = dequantize(dtype, f.tensor("w").unwrap().bytes.as_slice()).unwrap();
        assert_eq!(back, dequantize(dtype, &bytes).unwrap());
        let max_err = x.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let bound = match dtype {
            DType::Q8_0 => 0.5 / 127.0 + 1e-3,
            _ => 1.0 / 15.0 + 1e-2,
        };
        assert!(max_err < bound, "{dtype}: max error {max_err}");
    }
}

#[test]
fn typed_getters_accept_any_integer_width_and_name_the_key() {
    let mut w = GgufWriter::new();
    w.add("a.u8", 7u8).unwrap();
    w.add("a.i64", 7i64).unwrap();
    w.add("a.neg", -1i32).unwrap();
    w.add("a.big", u64::MAX).unwrap();
    w.add("a.f64", 0.25f64).unwrap();
    w.add("a.int_as_float", 10_000u32).unwrap();
    w.add("a.s", "text").unwrap();
    w.add("a.b", true).unwrap();
    w.add("a.types", vec![1u8, 3, 6]).unwrap();
    w.add("a.scores", vec![0.5f64, -1.0]).unwrap();
    w.add("a.strs", vec!["x", "y"]).unwrap();
    let f = GgufFile::from_bytes("g.gguf", w.to_bytes()).unwrap();

    assert_eq!(f.get_u32("a.u8").unwrap(), 7);
    assert_eq!(f.get_u32("a.i64").unwrap(), 7);
    assert_eq!(f.get_usize("a.i64").unwrap(), 7);
    assert_eq!(f.get_i64("a.neg").unwrap(), -1);
    assert_eq!(f.get_u64("a.big").unwrap(), u64::MAX);
    assert_eq!(f.get_f32("a.f64").unwrap(), 0.25);
    assert_eq!(f.get_f32("a.int_as_float").unwrap(), 10_000.0);
    assert_eq!(f.get_str("a.s").unwrap(), "text");
    assert!(f.get_bool("a.b").unwrap());
    assert_eq!(f.get_i32_array("a.types").unwrap(), vec![1, 3, 6]);
    assert_eq!(f.get_f32_array("a.scores").unwrap(), vec![0.5, -1.0]);
    assert_eq!(f.get_str_array("a.strs").unwrap(), vec!["x", "y"]);
    assert_eq!(f.opt_u32("a.absent").unwrap(), None);

    match f.get_u32("a.absent") {
        Err(ModelError::MissingMetadata(k)) => assert_eq!(k, "a.absent"),
        other => panic!("{other:?}"),
    }
    for (key, res) in [
        ("a.neg", f.get_u32("a.neg").map(|_| ())),
        ("a.big", f.get_u32("a.big").map(|_| ())),
        ("a.s", f.get_f32("a.s").map(|_| ())),
        ("a.b", f.get_str("a.b").map(|_| ())),
        ("a.types", f.get_str_array("a.types").map(|_| ())),
    ] {
        match res {
            Err(ModelError::BadMetadata { key: k, .. }) => assert_eq!(k, key),
            other => panic!("{key}: {other:?}"),
        }
    }
}

#[test]
fn writer_refuses_what_the_reader_would_refuse() {
    let mut w = GgufWriter::new();
    w.add("k", 1u32).unwrap();
    assert!(w.add("k", 2u32).is_err(), "duplicate key");
    assert!(w.add("mixed", GgufValue::Array(GgufValueType::U8, vec![GgufValue::I8(1)])).is_err());
    assert!(w.add_tensor("q", DType::Q8_0, &[2, 16], vec![0; 34]).is_err(), "inner dim not a multiple of 32");
    assert!(w.add_tensor("f", DType::F32, &[2, 2], vec![0; 12]).is_err(), "wrong byte count");
    assert!(w.add_raw_tensor("d", GgmlType::F32, vec![1; 5], vec![0; 4]).is_err(), "5 dims");
    w.add_tensor("t", DType::F32, &[1], vec![0; 4]).unwrap();
    assert!(w.add_tensor("t", DType::F32, &[1], vec![0; 4]).is_err(), "duplicate tensor");
    assert!(GgufWriter::new().alignment(48).is_err());
    assert!(GgufWriter::new().version(1).is_err());
}

#[test]
fn a_file_without_tensors_is_valid() {
    let mut w = GgufWriter::new();
    w.add("general.architecture", "llama").unwrap();
    let f = GgufFile::from_bytes("empty.gguf", w.to_bytes()).unwrap();
    assert!(f.tensor_infos().is_empty());
    assert_eq!(f.architecture().unwrap(), "llama");
    assert!(matches!(f.tensor("x"), Err(ModelError::MissingTensor(n)) if n == "x"));
}
