//! With `--features cuda`: compiles src/kernels/*.cu to PTX with nvcc (embedded by the crate with
//! `include_str!`, loaded at run time through candle's CUDA device). Without the feature it does
//! nothing, so the default build needs no CUDA toolkit.
//!
//! nvcc: $NVCC, else $CUDA_HOME/bin/nvcc (or $CUDA_PATH), else `nvcc` on the PATH.
//! Target: `-arch=compute_$CUDA_COMPUTE_CAP` (default 90), PTX the driver JIT-compiles for the GPU
//! it runs on (that compute capability or newer).

use std::path::PathBuf;
use std::process::Command;

const KERNELS: &[&str] = &["fused_attention"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for k in KERNELS {
        println!("cargo:rerun-if-changed=src/kernels/{k}.cu");
    }
    for v in ["NVCC", "CUDA_HOME", "CUDA_PATH", "CUDA_COMPUTE_CAP", "NVCC_FLAGS"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var_os("NVCC").map(PathBuf::from).unwrap_or_else(|| {
        ["CUDA_HOME", "CUDA_PATH"]
            .iter()
            .filter_map(std::env::var_os)
            .map(|h| PathBuf::from(h).join("bin/nvcc"))
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("nvcc"))
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap = cap.trim().replace('.', "");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    for k in KERNELS {
        let ptx = out.join(format!("{k}.ptx"));
        let mut cmd = Command::new(&nvcc);
        cmd.args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg(format!("src/kernels/{k}.cu"))
            .arg("-o")
            .arg(&ptx);
        if let Ok(flags) = std::env::var("NVCC_FLAGS") {
            cmd.args(flags.split_whitespace());
        }
        let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {} ({e}): install the CUDA toolkit or set NVCC/CUDA_HOME", nvcc.display()));
        assert!(status.success(), "nvcc failed on src/kernels/{k}.cu ({status})");
    }
}
