//! Compiles every CUDA kernel module with NVRTC for sm_80 and sm_90 (PTX and machine code, so ptxas runs too),
//! checks that every entry point the host launches exists, and prints ptxas' register/spill report. No GPU needed.
//!
//! NVRTC is found through `LD_LIBRARY_PATH` (CI: the `nvidia-cuda-nvrtc-cu12` wheel's `lib` folder). The kernels
//! include no toolkit header, so no include path is passed (`SHARDLINE_CUDA_INCLUDE` is not needed): a kernel that
//! starts to depend on one fails here, as it would on a GPU node that has only the driver and libnvrtc.
//! Without NVRTC the test prints "skipped: NVRTC not found", unless `SHARDLINE_REQUIRE_NVRTC=1` (CI), where it fails.
//! With `SHARDLINE_KERNEL_OUT=<dir>` it also writes the compiled kernels there (`<stem>-sm_80.cubin`,
//! `<stem>-sm_90.cubin`, `<stem>.ptx`), which the backend loads from `SHARDLINE_KERNEL_DIR` on a machine without a
//! matching NVRTC.

fn nvrtc_required() -> bool {
    std::env::var("SHARDLINE_REQUIRE_NVRTC").is_ok_and(|v| v == "1")
}

#[cfg(not(feature = "cuda"))]
#[test]
fn every_kernel_compiles_with_nvrtc() {
    assert!(!nvrtc_required(), "SHARDLINE_REQUIRE_NVRTC=1 but shardline-kernels was built without the cuda feature");
    println!("skipped: NVRTC not found (built without the cuda feature)");
}

#[cfg(feature = "cuda")]
#[test]
fn every_kernel_compiles_with_nvrtc() {
    use shardline_kernels::cuda::{modules, names, nvrtc};

    if !nvrtc::available() {
        assert!(
            !nvrtc_required(),
            "SHARDLINE_REQUIRE_NVRTC=1 but libnvrtc was not found; add the wheel's lib folder to LD_LIBRARY_PATH: \
             python3 -c 'import nvidia.cuda_nvrtc as m; print(list(m.__path__)[0] + \"/lib\")'"
        );
        println!("skipped: NVRTC not found (set LD_LIBRARY_PATH to a folder with libnvrtc.so.12)");
        return;
    }
    let (major, minor) = nvrtc::version().expect("NVRTC version");
    println!("NVRTC {major}.{minor}");

    // Every module for sm_80 and sm_90, except those built for one architecture only (`gemm_sm90`: sm_90a).
    let jobs: Vec<(&modules::KernelModule, &str)> = modules::MODULES
        .iter()
        .flat_map(|m| match modules::required_arch(m.name) {
            Some(arch) => vec![(m, arch)],
            None => vec![(m, "sm_80"), (m, "sm_90")],
        })
        .collect();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|&(m, arch)| s.spawn(move || (m.name, arch, nvrtc::compile(m, arch, &["--ptxas-options=-v"]))))
            .collect();
        handles.into_iter().map(|h| h.join().expect("compile thread panicked")).collect()
    });

    let out_dir = std::env::var_os("SHARDLINE_KERNEL_OUT").map(std::path::PathBuf::from);
    if let Some(dir) = &out_dir {
        std::fs::create_dir_all(dir).expect("create SHARDLINE_KERNEL_OUT");
    }
    let mut failures = Vec::new();
    let mut ptx_by_module = std::collections::HashMap::new();
    for ((m, _), (name, arch, result)) in jobs.iter().zip(results) {
        match result {
            Ok(c) => {
                let cubin = c.cubin.as_ref().filter(|b| !b.is_empty());
                let cubin = cubin.unwrap_or_else(|| panic!("{name}.cu for {arch}: no machine code"));
                report_resources(name, arch, &c.log);
                if let Some(dir) = &out_dir {
                    let stem = modules::artifact_stem(m);
                    std::fs::write(dir.join(format!("{stem}-{arch}.cubin")), cubin).expect("write cubin");
                    if arch == "sm_80" || modules::required_arch(name).is_some() {
                        std::fs::write(dir.join(format!("{stem}.ptx")), &c.ptx).expect("write ptx");
                    }
                }
                if arch == "sm_80" || modules::required_arch(name).is_some() {
                    if arch == "sm_90a" {
                        check_hopper_kernel(name, &c.ptx, &c.log);
                    }
                    ptx_by_module.insert(name, c.ptx);
                }
            }
            Err(e) => failures.push(format!("{name}.cu for {arch}: {e}")),
        }
    }
    assert!(failures.is_empty(), "NVRTC failed:\n{}", failures.join("\n\n"));

    let missing: Vec<String> = names::all()
        .into_iter()
        .filter(|(module, entry)| {
            let ptx = ptx_by_module.get(module).unwrap_or_else(|| panic!("no module {module}"));
            !ptx.contains(&format!(".entry {entry}("))
        })
        .map(|(module, entry)| format!("{module}::{entry}"))
        .collect();
    assert!(missing.is_empty(), "entry points launched by the host but absent from the PTX: {missing:?}");
    println!(
        "{} compilations of {} modules; {} entry points present",
        jobs.len(),
        modules::MODULES.len(),
        names::all().len()
    );
}

/// Prints one line per kernel with registers, shared memory and spills; fails on kernels that need a stack for
/// spilled registers beyond a small allowance (a spill in a bandwidth-bound kernel is a performance bug).
#[cfg(feature = "cuda")]
fn report_resources(module: &str, arch: &str, log: &str) {
    let mut entry = "";
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            entry = rest.split('\'').next().unwrap_or("");
        } else if line.contains("spill stores") {
            let spill: usize = line
                .split("bytes spill stores")
                .next()
                .and_then(|s| s.rsplit(',').next())
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            assert!(spill <= 64, "{module}::{entry} for {arch} spills {spill} bytes of registers: {line}");
        } else if line.contains("Used") && line.contains("registers") && arch.starts_with("sm_90") {
            println!("{module}::{entry} [{arch}] {}", line.trim_start_matches("ptxas info    : ").trim());
        }
    }
}

/// The sm_90a module (kernels/cuda/gemm_sm90.cu) really is the wgmma + TMA kernel: its PTX issues
/// `wgmma.mma_async` and `cp.async.bulk.tensor`, waits on mbarriers, and ptxas neither spills nor serialises the
/// wgmma (it warns "wgmma.mma_async instructions are serialized" when it must). The SASS itself (HGMMA, UTMALDG,
/// SYNCS) is checked by scripts/sass-report --check, which has nvdisasm.
#[cfg(feature = "cuda")]
fn check_hopper_kernel(module: &str, ptx: &str, log: &str) {
    for needle in ["wgmma.mma_async.sync.aligned.m64n256k16", "cp.async.bulk.tensor.2d", "mbarrier.try_wait.parity"] {
        assert!(ptx.contains(needle), "{module} for sm_90a: no `{needle}` in the PTX");
    }
    assert!(!log.contains("serialized"), "{module} for sm_90a: ptxas serialises the wgmma:\n{log}");
    println!("{module} [sm_90a]: wgmma.mma_async, cp.async.bulk.tensor, mbarrier waits present; wgmma not serialised");
}
