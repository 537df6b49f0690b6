//! Choosing the compute device: `--device cpu`, `--device cuda`, `--device cuda:N`, or nothing (a usable GPU if
//! there is one, else the CPU, said in one log line). Never panics on a machine without a driver or NVRTC: the
//! libraries are probed before anything touches them.

use std::sync::Arc;

use tracing::{debug, info, warn};

use crate::DType;
use crate::backend::Backend;
use crate::cpu::CpuBackend;
use crate::cuda::{self, CudaBackend};
use crate::error::{KernelError, Result};

/// A parsed device choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = KernelError;

    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => t
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| KernelError::UnknownDevice(s.to_string())),
        }
    }
}

/// The backend for `spec` (`cpu`, `cuda`, `cuda:N`) with f16 activations on CUDA; `None` picks CUDA device 0 when
/// it is usable and the CPU otherwise. An explicit `cuda` that cannot be opened is an error, not a fallback.
pub fn select_backend(spec: Option<&str>) -> Result<Arc<dyn Backend>> {
    select_backend_with(spec, DType::F16)
}

/// As [`select_backend`], with the activation dtype of a CUDA backend (f16 or bf16; the CPU computes in f32).
pub fn select_backend_with(spec: Option<&str>, cuda_act: DType) -> Result<Arc<dyn Backend>> {
    match spec.map(str::parse::<DeviceSpec>).transpose()? {
        Some(DeviceSpec::Cpu) => Ok(cpu()),
        Some(DeviceSpec::Cuda(n)) => {
            let b = CudaBackend::new(n, cuda_act)?;
            info!(device = %b.describe(), "computing on CUDA");
            Ok(b)
        }
        None => match cuda::probe() {
            Ok(_) => match CudaBackend::new(0, cuda_act) {
                Ok(b) => {
                    info!(device = %b.describe(), "computing on CUDA");
                    Ok(b)
                }
                Err(e) => {
                    warn!(reason = %e, "a CUDA device is present but unusable; computing on the CPU");
                    Ok(cpu())
                }
            },
            // Said at INFO only where it matters: a CUDA driver is installed yet no GPU can be used. A machine
            // without the driver (or a build without CUDA) computes on the CPU, which is no news.
            Err(reason) if reason != cuda::NO_DRIVER => {
                info!(%reason, "no usable CUDA device; computing on the CPU");
                Ok(cpu())
            }
            Err(reason) => {
                debug!(%reason, "computing on the CPU");
                Ok(cpu())
            }
        },
    }
}

fn cpu() -> Arc<dyn Backend> {
    Arc::new(CpuBackend::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::DeviceKind;

    #[test]
    fn device_specs_parse() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        for bad in ["", "cuda:", "cuda:x", "tpu", "cuda:-1"] {
            assert!(matches!(bad.parse::<DeviceSpec>(), Err(KernelError::UnknownDevice(_))), "{bad:?}");
        }
    }

    #[test]
    fn cpu_is_always_available_and_unknown_specs_are_errors() {
        assert_eq!(select_backend(Some("cpu")).unwrap().kind(), DeviceKind::Cpu);
        assert!(matches!(select_backend(Some("npu")), Err(KernelError::UnknownDevice(_))));
    }

    /// Without a usable GPU the default is the CPU and nothing panics; with one, the default is that GPU.
    #[test]
    fn default_falls_back_to_the_cpu_without_a_gpu() {
        let b = select_backend(None).expect("the default device is always available");
        match cuda::probe() {
            Ok(_) => assert!(matches!(b.kind(), DeviceKind::Cuda(0) | DeviceKind::Cpu)),
            Err(reason) => {
                assert_eq!(b.kind(), DeviceKind::Cpu, "no GPU ({reason}) yet not the CPU");
                let e = select_backend(Some("cuda")).expect_err("an explicit cuda request without a GPU must fail");
                assert!(matches!(e, KernelError::CudaUnavailable(_)), "{e}");
            }
        }
    }
}
