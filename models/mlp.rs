//! A multilayer perceptron: Linear layers `layers.0 .. layers.N` with an activation and dropout
//! between them (none after the last), the layout of a PyTorch `nn.ModuleList` of `nn.Linear`.
//! Layers are wick's fused linear op ([`crate::ops::linear`]); with ReLU the activation runs
//! inside the layer's node (no separate activation tensor and gradient).

use super::Activation;
use candle_core::{Result, Tensor};
use crate::ops::linear::Dense;
use candle_nn::{Module, ModuleT, VarBuilder};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MlpConfig {
    pub input: usize,
    pub hidden: Vec<usize>,
    pub output: usize,
    #[serde(default = "relu")]
    pub activation: Activation,
    #[serde(default)]
    pub dropout: f64,
}

fn relu() -> Activation {
    Activation::Relu
}

impl MlpConfig {
    /// `input -> hidden... -> output` with ReLU and no dropout.
    pub fn new(input: usize, hidden: &[usize], output: usize) -> Self {
        Self { input, hidden: hidden.to_vec(), output, activation: Activation::Relu, dropout: 0.0 }
    }
}

pub struct Mlp {
    layers: Vec<Dense>,
    activation: Activation,
    dropout: f64,
}

impl Mlp {
    pub fn load(vb: VarBuilder, cfg: &MlpConfig) -> Result<Self> {
        let widths: Vec<usize> = std::iter::once(cfg.input).chain(cfg.hidden.iter().copied()).chain([cfg.output]).collect();
        let layers = widths
            .windows(2)
            .enumerate()
            .map(|(i, w)| Dense::load(vb.pp(format!("layers.{i}")), w[0], w[1]))
            .collect::<Result<_>>()?;
        Ok(Self { layers, activation: cfg.activation, dropout: cfg.dropout })
    }
}

impl ModuleT for Mlp {
    /// (batch, ...) is flattened to (batch, input); returns (batch, output) logits.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = x.flatten_from(1)?;
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == self.layers.len() {
                x = layer.forward(&x)?;
                break;
            }
            x = match self.activation {
                Activation::Relu => layer.forward_relu(&x)?,
                other => other.apply(&layer.forward(&x)?)?,
            };
            x = crate::nn::dropout(&x, self.dropout, train)?;
        }
        Ok(x)
    }
}

/// Saved and loaded as a wick model folder (`model_type: "wick-mlp"`).
impl crate::pretrained::Pretrained for Mlp {
    type Config = MlpConfig;
    const MODEL_TYPES: &'static [&'static str] = &["wick-mlp"];
    const ARCHITECTURE: &'static str = "Mlp";
    fn build(vb: VarBuilder, config: &MlpConfig) -> Result<Self> {
        Self::load(vb, config)
    }
}
