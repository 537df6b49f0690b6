//! Opening a model and reading one layer makes only that layer resident: the other layers' pages are never
//! touched. Measured as the resident size of the file's mapping in `/proc/self/smaps` (Linux only).
#![cfg(target_os = "linux")]

use shardline_node::model::{WeightSource, open_model};
use shardline_node::test_models::{TinySpec, write_tiny_gguf, write_tiny_hf};

/// Resident bytes of the mapping of this process that contains `addr`.
fn mapping_rss(addr: usize) -> usize {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-')
            && let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        {
            inside = (lo..hi).contains(&addr);
        } else if inside && let Some(kb) = line.strip_prefix("Rss:") {
            return kb.trim().trim_end_matches("kB").trim().parse::<usize>().unwrap() * 1024;
        }
    }
    panic!("no mapping contains {addr:#x}")
}

/// Reads every byte of layer `layer`'s tensors; returns their total size and the mapping RSS before and after.
fn touch_one_layer(w: &dyn WeightSource, layer: usize) -> (usize, usize, usize) {
    let prefix = format!("blk.{layer}.");
    let tensors: Vec<_> = w
        .tensor_table()
        .into_iter()
        .filter(|t| t.name.starts_with(&prefix))
        .map(|t| w.tensor(&t.name).unwrap())
        .collect();
    let addr = tensors[0].bytes.as_slice().as_ptr() as usize;
    let before = mapping_rss(addr);
    let mut sum = 0u64;
    let mut bytes = 0;
    for t in &tensors {
        sum = t.bytes.as_slice().iter().fold(sum, |s, &b| s.wrapping_add(u64::from(b)));
        bytes += t.bytes.len();
    }
    std::hint::black_box(sum);
    (bytes, before, mapping_rss(addr))
}

#[test]
fn one_layer_read_keeps_the_others_out_of_memory() {
    // Six f32 layers of about 4 MiB each.
    let spec = TinySpec { n_layers: 6, hidden: 256, ffn: 1024, n_heads: 4, n_kv_heads: 4, ..TinySpec::default() };
    let dir = tempfile::tempdir().unwrap();
    write_tiny_gguf(&spec, dir.path().join("m.gguf")).unwrap();
    write_tiny_hf(&spec, dir.path().join("hf")).unwrap();
    // Header pages touched by opening.
    const SLACK: usize = 4 << 20;

    for path in [dir.path().join("m.gguf"), dir.path().join("hf")] {
        let w = open_model(&path).unwrap();
        let total: usize = w.tensor_table().iter().map(|t| t.byte_len).sum();
        let (layer_bytes, before, after) = touch_one_layer(w.as_ref(), 3);
        assert!(total > 5 * layer_bytes, "{total} vs {layer_bytes}");
        // Opening touched the header only; reading the layer made (about) that layer resident and nothing else.
        assert!(before < SLACK, "{}: {before} bytes resident after open", path.display());
        assert!(
            after >= before + layer_bytes * 9 / 10,
            "{}: measurement sees the read ({before} -> {after})",
            path.display()
        );
        assert!(
            after < before + layer_bytes + (1 << 20) && after < total / 2,
            "{}: {after} bytes resident after reading {layer_bytes} of {total}",
            path.display()
        );
    }
}
