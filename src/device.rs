//! `--device` and `--dtype` flags: parsed once, with errors that say what went wrong.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::str::FromStr;

/// What the user asked for with `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    /// CUDA device 0 when wick was built with `--features cuda` and a GPU answers, else the CPU.
    Auto,
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "cpu" => Ok(Self::Cpu),
            "auto" => Ok(Self::Auto),
            // Under mpirun, each process of a machine its own GPU (crate::dist).
            "cuda" | "gpu" => Ok(Self::Cuda(crate::dist::local_rank())),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(Self::Cuda)
                    .with_context(|| format!("bad device {s:?}: the ordinal after `cuda:` must be a number")),
                None => bail!("unknown device {s:?}: expected cpu, cuda, cuda:N or auto"),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Auto => write!(f, "auto"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device. CUDA in a CPU-only build, or with no GPU present, is an error naming which.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => open_cuda(ordinal),
            Self::Auto => Ok(open_cuda(crate::dist::local_rank()).unwrap_or(Device::Cpu)),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    // `Device::cuda_if_available` only looks at the compile-time feature; asking the driver is
    // the one way to know a GPU is there. A panic inside the driver bindings (no libcuda) is
    // turned into an error too.
    match std::panic::catch_unwind(|| Device::new_cuda(ordinal)) {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(err)) => bail!("cannot open CUDA device {ordinal}: no usable GPU or driver ({err})"),
        Err(_) => bail!("cannot open CUDA device {ordinal}: the CUDA driver library could not be used"),
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device> {
    bail!(
        "cannot open cuda:{ordinal}: this build of wick has no CUDA support \
         (rebuild with `--features cuda`)"
    )
}

/// Parses the device flag and opens it in one call.
pub fn device(spec: &str) -> Result<Device> {
    spec.parse::<DeviceSpec>()?.open()
}

/// `--dtype f32|f16|bf16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" | "float" => Ok(DType::F32),
        "f16" | "float16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => bail!("unknown dtype {other:?}: expected f32, f16 or bf16"),
    }
}

/// A short name for logs and JSON output.
pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        other => match other.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            loc => format!("{loc:?}"),
        },
    }
}

/// The device tests run on: `WICK_TEST_DEVICE` (default cpu), so the same suite runs on a GPU.
pub fn test_device() -> Result<Device> {
    device(&std::env::var("WICK_TEST_DEVICE").unwrap_or_else(|_| "cpu".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        let err = "tpu".parse::<DeviceSpec>().unwrap_err().to_string();
        assert!(err.contains("unknown device") && err.contains("tpu"), "{err}");
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn auto_falls_back_to_cpu_and_cuda_is_a_clear_error() {
        assert!(DeviceSpec::Auto.open().is_ok());
        if !cfg!(feature = "cuda") {
            let err = device("cuda").unwrap_err().to_string();
            assert!(err.contains("no CUDA support"), "{err}");
        }
    }

    #[test]
    fn parses_dtypes() {
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert_eq!(parse_dtype("F16").unwrap(), DType::F16);
        assert!(parse_dtype("f64x").unwrap_err().to_string().contains("unknown dtype"));
    }
}
