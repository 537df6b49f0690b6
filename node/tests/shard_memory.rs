//! A shard reads only its own layers: after loading and running layers 10..20 of SmolLM2, the resident part of the
//! memory-mapped model file is a third of what the whole model makes resident (Linux: per-mapping `Rss` from
//! /proc/self/smaps; each test opens its own mapping so the figures do not mix).

use std::sync::Arc;

use shardline_kernels::Backend;
use shardline_kernels::cpu::CpuBackend;
use shardline_node::model::open::ModelFiles;
use shardline_node::model::{LayerRange, Shard, ShardInput, ShardOptions, ShardOutput};
use shardline_node::test_models::model_for_tests;

/// Resident kilobytes of the mapping that contains `addr`.
fn mapping_rss_kb(addr: usize) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
        {
            inside = (a..b).contains(&addr);
            continue;
        }
        if inside && let Some(rest) = line.strip_prefix("Rss:") {
            return rest.trim().trim_end_matches("kB").trim().parse().ok();
        }
    }
    None
}

/// Loads `range` from a fresh mapping, runs a 16-token forward, returns the mapping's resident MiB.
fn resident_mib_after_forward(path: &std::path::Path, range: LayerRange) -> f64 {
    let files = ModelFiles::open(path).unwrap();
    let w = files.weights();
    let probe = w.tensor(&format!("blk.{}.attn_q.weight", range.start)).unwrap();
    let addr = probe.bytes.as_slice().as_ptr() as usize;
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new(2));
    let shard = Shard::load(w.as_ref(), range, backend.clone(), ShardOptions::default()).unwrap();
    let mut s = shard.open_session(16).unwrap();
    let tokens: Vec<u32> = (0..16).map(|i| 100 + i * 37).collect();
    let hidden;
    let input = if shard.has_embeddings() {
        ShardInput::Tokens(&tokens)
    } else {
        let h = files.config().hidden;
        hidden = backend
            .upload_f32(&[16, h], &(0..16 * h).map(|i| ((i % 97) as f32 - 48.0) / 50.0).collect::<Vec<_>>())
            .unwrap();
        ShardInput::Hidden(&hidden)
    };
    match shard.forward(&mut s, input).unwrap() {
        ShardOutput::Hidden(h) => assert_eq!(h.rows(), 16),
        ShardOutput::Logits(l) => assert_eq!(l.rows(), 1),
    }
    mapping_rss_kb(addr).expect("mapping in /proc/self/smaps") as f64 / 1024.0
}

#[test]
fn a_ten_layer_shard_keeps_a_third_of_the_model_resident() {
    let Some(path) = model_for_tests("a_ten_layer_shard_keeps_a_third_of_the_model_resident") else { return };
    let file_mib = std::fs::metadata(&path).unwrap().len() as f64 / (1 << 20) as f64;
    let middle = resident_mib_after_forward(&path, LayerRange::new(10, 20));
    let whole = resident_mib_after_forward(&path, LayerRange::new(0, 30));
    println!(
        "SmolLM2 Q4_1 ({file_mib:.1} MiB file): layers 10..20 resident {middle:.1} MiB, whole model {whole:.1} MiB"
    );
    // 30 blocks of ~2.2 MiB plus the 27 MiB tied Q8_0 embedding/LM head: the whole model touches nearly all of it.
    assert!(whole > 0.85 * file_mib, "whole model resident {whole:.1} MiB of {file_mib:.1}");
    // Ten blocks are a third of the block weights; allow a little read-around.
    assert!(middle < 0.30 * whole, "layers 10..20 resident {middle:.1} MiB vs whole {whole:.1} MiB");
}
