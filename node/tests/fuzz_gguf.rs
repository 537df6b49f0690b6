//! Fuzzing the GGUF header parser (issue 13): random bytes behind a valid magic, and valid images (metadata of every
//! value type, arrays, tensors of several types) with flipped bits and cut tails. At least 10^5 cases per property in
//! the normal test run (`SHARDLINE_FUZZ_CASES` raises it). Nothing may panic, and no single allocation may exceed
//! what the bytes present can describe: a count is checked against the bytes left before anything is reserved.

#[path = "../../proto/tests/fuzz_common/mod.rs"]
mod fuzz_common;

use proptest::prelude::*;
use shardline_kernels::DType;
use shardline_node::formats::MappedFile;
use shardline_node::formats::gguf::{GgufFile, GgufValue};
use shardline_node::formats::gguf_writer::GgufWriter;
use shardline_node::test_models::quantize;

#[global_allocator]
static ALLOC: fuzz_common::PeakAlloc = fuzz_common::PeakAlloc;

/// The largest single allocation parsing `len` bytes may make: every value takes at least one byte in the file and
/// becomes one `GgufValue` in memory, plus a constant for the file's own tables and error messages.
fn allocation_bound(len: usize) -> usize {
    len * std::mem::size_of::<GgufValue>() + 8192
}

/// One metadata value of a type chosen by `ty`, sized by `n`.
fn value(ty: u8, n: u32, text: &str) -> GgufValue {
    let k = n as usize % 9;
    match ty % 14 {
        0 => GgufValue::from(n as u8),
        1 => GgufValue::from(n as i8),
        2 => GgufValue::from(n as u16),
        3 => GgufValue::from(n as i16),
        4 => GgufValue::from(n),
        5 => GgufValue::from(n as i32),
        6 => GgufValue::from(n as f32 / 3.0),
        7 => GgufValue::from(n % 2 == 1),
        8 => GgufValue::from(text),
        9 => GgufValue::from(vec![n; k]),
        10 => GgufValue::from(u64::from(n) << 20),
        11 => GgufValue::from(-i64::from(n)),
        12 => GgufValue::from(f64::from(n) * 0.25),
        _ => GgufValue::from((0..k).map(|i| &text[..i.min(text.len())]).collect::<Vec<_>>()),
    }
}

const DTYPES: [DType; 5] = [DType::F32, DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1];

/// A valid GGUF image with `entries` metadata values and `tensors` tensors (type, rows).
fn image(entries: &[(u8, u32)], text: &str, tensors: &[(u8, u8)], version: u32) -> Vec<u8> {
    let mut w = GgufWriter::new().version(version).expect("version 2 or 3");
    w.add("general.architecture", "llama").expect("key");
    for (i, &(ty, n)) in entries.iter().enumerate() {
        w.add(&format!("k{i}.{text}"), value(ty, n, text)).expect("key");
    }
    for (i, &(ty, rows)) in tensors.iter().enumerate() {
        let dtype = DTYPES[ty as usize % DTYPES.len()];
        let shape = [1 + rows as usize % 3, 32];
        let data = quantize(dtype, &vec![0.5; shape[0] * 32]).expect("quantizable");
        w.add_tensor(&format!("t{i}"), dtype, &shape, data).expect("tensor");
    }
    w.to_bytes()
}

fn parse_checked(bytes: Vec<u8>) -> Result<(), TestCaseError> {
    let len = bytes.len();
    let (result, peak) = fuzz_common::largest_allocation(|| {
        GgufFile::from_bytes("fuzz.gguf", bytes).map(|f| {
            // Touch what a loader reads: every key, value and tensor info.
            let n = f.metadata().count() + f.tensor_infos().len();
            (n, f.architecture().map(str::len).unwrap_or(0))
        })
    });
    prop_assert!(peak <= allocation_bound(len), "parsing {len} bytes allocated {peak} at once");
    drop(result);
    Ok(())
}

proptest! {
    #![proptest_config(fuzz_common::config())]

    #[test]
    fn random_bytes_behind_a_valid_magic_never_panic(
        version in 2u32..4,
        rest in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&version.to_le_bytes());
        bytes.extend_from_slice(&rest);
        parse_checked(bytes)?;
    }

    #[test]
    fn mutated_images_never_panic(
        entries in proptest::collection::vec((any::<u8>(), any::<u32>()), 0..6),
        text in "[a-z]{1,8}",
        tensors in proptest::collection::vec((any::<u8>(), any::<u8>()), 0..4),
        version in 2u32..4,
        flips in proptest::collection::vec((any::<usize>(), 1u8..), 0..6),
        keep in proptest::option::of(0usize..2048),
    ) {
        let valid = image(&entries, &text, &tensors, version);
        prop_assert!(GgufFile::from_bytes("valid.gguf", valid.clone()).is_ok(), "a valid image does not parse");
        parse_checked(fuzz_common::mutate(valid, &flips, keep))?;
    }
}
