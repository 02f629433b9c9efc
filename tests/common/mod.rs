//! Helpers for tests that compare wick with reference outputs saved by
//! `tests/fixtures/make_fixtures.py` (PyTorch / transformers).
#![allow(dead_code)]

pub mod fake_hub;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use std::collections::HashMap;
use std::path::PathBuf;

pub fn fixture_path(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    // A test binary carried to another machine (scripts/gpu-attention-check.sh) runs from the
    // repository root there.
    let dir = if dir.exists() { dir } else { PathBuf::from("tests/fixtures") };
    dir.join(name)
}

pub struct Fixture {
    pub tensors: HashMap<String, Tensor>,
    pub device: Device,
}

impl Fixture {
    pub fn load(name: &str) -> Result<Self> {
        let device = wick::device::test_device()?;
        let path = fixture_path(&format!("{name}.safetensors"));
        let tensors = candle_core::safetensors::load(&path, &device).with_context(|| format!("fixture {}", path.display()))?;
        Ok(Self { tensors, device })
    }

    pub fn get(&self, key: &str) -> Result<Tensor> {
        let t = self.tensors.get(key).with_context(|| format!("fixture has no {key}"))?;
        // Integer tensors (ids, labels) are saved as int64 by PyTorch; candle indexes with u32.
        Ok(if t.dtype() == DType::I64 { t.to_dtype(DType::U32)? } else { t.clone() })
    }

    /// The `param.*` tensors, without the prefix.
    pub fn params(&self) -> HashMap<String, Tensor> {
        self.tensors.iter().filter_map(|(k, v)| k.strip_prefix("param.").map(|n| (n.to_string(), v.clone()))).collect()
    }

    /// Sets every variable of `varmap` to the fixture's parameters; the two name sets must match.
    pub fn load_into(&self, varmap: &VarMap) -> Result<()> {
        let params = self.params();
        let ours: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        let mut missing: Vec<&String> = params.keys().filter(|k| !ours.contains(k)).collect();
        missing.sort();
        if !missing.is_empty() {
            bail!("the model has no variables named {missing:?} (it has {ours:?})");
        }
        wick::train::checkpoint::set_varmap(varmap, &params)
    }

    /// Checks the gradients of `loss` for every trainable variable against `grad.<name>`, and
    /// that every one of them got a gradient.
    pub fn check_grads(&self, varmap: &VarMap, loss: &Tensor, tol: f64) -> Result<()> {
        let grads = loss.backward()?;
        let vars = varmap.data().lock().unwrap().clone();
        let mut checked = 0;
        for (name, var) in &vars {
            if wick::train::optim::is_buffer(name) {
                continue;
            }
            let g = grads.get(var.as_tensor()).with_context(|| format!("no gradient reached {name}"))?;
            assert_close(&format!("grad of {name}"), g, &self.get(&format!("grad.{name}"))?, tol)?;
            checked += 1;
        }
        let expected = self.tensors.keys().filter(|k| k.starts_with("grad.")).count();
        if checked != expected {
            bail!("checked {checked} gradients, the fixture has {expected}");
        }
        Ok(())
    }
}

/// max |a - b| <= tol * max(1, max |b|): relative for large values, absolute near zero.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) -> Result<()> {
    if a.dims() != b.dims() {
        bail!("{what}: shape {:?} vs reference {:?}", a.dims(), b.dims());
    }
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0) as f64;
    if !(diff <= tol * scale) {
        bail!("{what}: max difference {diff:.3e} exceeds {:.1e} (scale {scale:.3})", tol * scale);
    }
    Ok(())
}
