//! Run-time compilation of the kernel modules with NVRTC, used when the crate was built without nvcc. NVRTC is
//! loaded dynamically; [`available`] checks for it first, because cudarc panics when a library is missing.

use std::ffi::{CStr, CString, c_char};

use cudarc::nvrtc::{result, sys};

use super::modules::KernelModule;
use crate::error::{KernelError, Result};

/// Output of one compilation.
#[derive(Debug)]
pub struct Compiled {
    /// PTX text (always produced).
    pub ptx: String,
    /// Machine code for the real architecture asked for (`sm_XY`); `None` for a virtual one (`compute_XY`).
    pub cubin: Option<Vec<u8>>,
    /// The compiler log: warnings, and the ptxas resource report when `--ptxas-options=-v` was passed.
    pub log: String,
}

/// Whether libnvrtc can be loaded (searched as cudarc does: `LD_LIBRARY_PATH`, then the system paths).
pub fn available() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names and drops the handle; no symbol is called.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's version as (major, minor).
pub fn version() -> Result<(i32, i32)> {
    if !available() {
        return Err(KernelError::CudaUnavailable("libnvrtc not found".into()));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); both pointers are valid for writes.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }.result().map_err(|e| nvrtc_err("nvrtcVersion", e))?;
    Ok((major, minor))
}

fn nvrtc_err(what: &str, e: result::NvrtcError) -> KernelError {
    KernelError::Cuda(format!("{what}: {e:?}"))
}

/// Owns an `nvrtcProgram` together with the strings it points into, and destroys it on drop.
struct Program {
    prog: sys::nvrtcProgram,
    _src: CString,
    _name: CString,
}

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: `prog` was created by `create_program` and is destroyed exactly once, here. A failure to free is
        // not actionable, so it is ignored.
        let _ = unsafe { result::destroy_program(self.prog) };
    }
}

fn chars_to_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars.iter().map(|&c| c as u8).collect();
    CStr::from_bytes_until_nul(&bytes)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned())
}

/// Compiles `module` for `arch` (`"sm_90"` for machine code and PTX, `"compute_80"` for PTX only) with optional
/// extra NVRTC options. A compile error carries the full log.
pub fn compile(module: &KernelModule, arch: &str, extra: &[&str]) -> Result<Compiled> {
    if !available() {
        return Err(KernelError::CudaUnavailable("libnvrtc not found (add its folder to LD_LIBRARY_PATH)".into()));
    }
    let src = CString::new(module.source)
        .map_err(|_| KernelError::Cuda(format!("kernel module {} contains a NUL byte", module.name)))?;
    let name = CString::new(format!("{}.cu", module.name)).expect("module names contain no NUL");
    let prog = result::create_program(&src, Some(&name)).map_err(|e| nvrtc_err("nvrtcCreateProgram", e))?;
    let prog = Program { prog, _src: src, _name: name };
    let mut options = vec![format!("--gpu-architecture={arch}"), "--std=c++17".to_string()];
    options.extend(extra.iter().map(|s| s.to_string()));
    // SAFETY: `prog.prog` is a live program created above.
    let compiled = unsafe { result::compile_program(prog.prog, &options) };
    // SAFETY: as above; the log exists after a compile attempt, successful or not.
    let log = unsafe { result::get_program_log(prog.prog) }.map(|l| chars_to_string(&l)).unwrap_or_default();
    if let Err(e) = compiled {
        return Err(KernelError::Cuda(format!(
            "NVRTC could not compile {}.cu for {arch} ({e:?}):\n{log}",
            module.name
        )));
    }
    // SAFETY: as above; the program compiled successfully, so its PTX exists.
    let ptx = unsafe { result::get_ptx(prog.prog) }.map_err(|e| nvrtc_err("nvrtcGetPTX", e))?;
    let cubin = if arch.starts_with("sm_") {
        let mut size = 0usize;
        // SAFETY: live, compiled program; `size` is valid for writes.
        unsafe { sys::nvrtcGetCUBINSize(prog.prog, &mut size) }
            .result()
            .map_err(|e| nvrtc_err("nvrtcGetCUBINSize", e))?;
        let mut bin = vec![0u8; size];
        // SAFETY: `bin` has exactly the `size` bytes NVRTC reported for the CUBIN.
        unsafe { sys::nvrtcGetCUBIN(prog.prog, bin.as_mut_ptr().cast()) }
            .result()
            .map_err(|e| nvrtc_err("nvrtcGetCUBIN", e))?;
        Some(bin)
    } else {
        None
    };
    Ok(Compiled { ptx: chars_to_string(&ptx), cubin, log })
}
