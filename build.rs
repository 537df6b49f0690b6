//! Build script of the kernels crate (kernels/Cargo.toml: `build = "../build.rs"`).
//!
//! Collects every `kernels/**/*.cu`, inlines its local `#include "…"` headers (so each module is one self-contained
//! text that NVRTC can compile without an include path), and writes into `OUT_DIR`:
//! - `<module>.cu`: the inlined source, always (the NVRTC fallback and the compile-check test use it);
//! - `<module>.ptx`: PTX for `compute_80` when `nvcc` is found (`$NVCC`, `PATH`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin`,
//!   `/usr/local/cuda/bin`) and the `cuda` feature is on; the driver JIT-compiles it for sm_80, sm_89, sm_90 and
//!   newer at module load (our kernels use no sm_90-only instruction, so one PTX serves every supported card);
//! - `kernels.rs`: the table `MODULES` (module name, source, optional PTX) that `kernels/src/cuda/modules.rs`
//!   includes.
//!
//! `SHARDLINE_NO_NVCC=1` skips nvcc (to exercise the NVRTC path on a machine that has nvcc). A kernel that nvcc
//! rejects fails the build. Nothing is written outside `OUT_DIR`.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Virtual architecture of the PTX: the oldest we support (Ampere: mma.sync bf16, cp.async, ldmatrix).
const PTX_ARCH: &str = "compute_80";

/// The virtual architecture of module `name`: `gemm_sm90` (wgmma, TMA) exists only for `compute_90a`, whose PTX the
/// driver compiles for sm_90 devices only (the backend loads it nowhere else); every other module is `PTX_ARCH`.
fn ptx_arch(name: &str) -> &'static str {
    if name == "gemm_sm90" { "compute_90a" } else { PTX_ARCH }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=../build.rs");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "SHARDLINE_NO_NVCC"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let mut sources = Vec::new();
    collect(&manifest, &mut sources);
    sources.sort();

    let mut modules = Vec::new();
    for path in sources.iter().filter(|p| p.extension().is_some_and(|e| e == "cu")) {
        let name = path.file_stem().and_then(|s| s.to_str()).expect("kernel file names are UTF-8").to_string();
        let mut seen = HashSet::new();
        let text = inline(path, &mut seen);
        let cu = out.join(format!("{name}.cu"));
        std::fs::write(&cu, text).unwrap_or_else(|e| panic!("writing {}: {e}", cu.display()));
        modules.push((name, cu));
    }

    let nvcc = if std::env::var_os("CARGO_FEATURE_CUDA").is_some() && std::env::var_os("SHARDLINE_NO_NVCC").is_none() {
        find_nvcc()
    } else {
        None
    };
    let ptx: Vec<Option<PathBuf>> = match &nvcc {
        Some(nvcc) => {
            println!("cargo:warning=compiling CUDA kernels to {PTX_ARCH} PTX with {}", nvcc.display());
            std::thread::scope(|s| {
                let jobs: Vec<_> = modules.iter().map(|(name, cu)| s.spawn(|| compile(nvcc, name, cu, &out))).collect();
                jobs.into_iter().map(|j| Some(j.join().expect("nvcc job panicked"))).collect()
            })
        }
        None => vec![None; modules.len()],
    };

    let mut table = String::from(
        "/// Every kernel module: name, inlined CUDA source and, when nvcc ran at build time, its PTX.\n\
         pub const MODULES: &[KernelModule] = &[\n",
    );
    for ((name, cu), ptx) in modules.iter().zip(&ptx) {
        let ptx = match ptx {
            Some(p) => format!("Some(include_str!({:?}))", p.display().to_string()),
            None => "None".to_string(),
        };
        writeln!(
            table,
            "    KernelModule {{ name: {name:?}, source: include_str!({:?}), ptx: {ptx} }},",
            cu.display().to_string()
        )
        .expect("writing to a String cannot fail");
    }
    table.push_str("];\n");
    let rs = out.join("kernels.rs");
    std::fs::write(&rs, table).unwrap_or_else(|e| panic!("writing {}: {e}", rs.display()));
}

/// Every `.cu` and `.cuh` below `dir`, skipping hidden folders and build outputs; registers each for rebuilds.
fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    println!("cargo:rerun-if-changed={}", dir.display());
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if !name.starts_with('.') && name != "target" {
                collect(&path, files);
            }
        } else if path.extension().is_some_and(|e| e == "cu" || e == "cuh") {
            println!("cargo:rerun-if-changed={}", path.display());
            files.push(path);
        }
    }
}

/// The text of `path` with every `#include "local"` replaced by that file (each header once per module) and
/// `#pragma once` dropped. System includes (`<…>`) are left alone.
fn inline(path: &Path, seen: &mut HashSet<PathBuf>) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let dir = path.parent().expect("a file has a parent folder");
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix('#') {
            let rest = rest.trim_start();
            if rest.starts_with("pragma") && rest["pragma".len()..].trim() == "once" {
                continue;
            }
            if let Some(inc) = rest.strip_prefix("include") {
                let inc = inc.trim();
                if let Some(name) = inc.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
                    let header = dir.join(name);
                    let key = header.canonicalize().unwrap_or_else(|e| panic!("{}: {name}: {e}", path.display()));
                    if seen.insert(key) {
                        out.push_str(&inline(&header, seen));
                    }
                    continue;
                }
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn find_nvcc() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("NVCC") {
        candidates.push(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var) {
            candidates.push(PathBuf::from(root).join("bin").join("nvcc"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    candidates
        .into_iter()
        .find(|c| c.is_file() && Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
}

fn compile(nvcc: &Path, name: &str, cu: &Path, out: &Path) -> PathBuf {
    let ptx = out.join(format!("{name}.ptx"));
    let result = Command::new(nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
        .arg(format!("-arch={}", ptx_arch(name)))
        .arg("-o")
        .arg(&ptx)
        .arg(cu)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
    if !result.status.success() {
        panic!(
            "nvcc failed on {name}.cu:\n{}\n{}",
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr)
        );
    }
    ptx
}
