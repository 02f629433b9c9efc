//! The models: one file each, loading the checkpoints of their families by the tensor names
//! those checkpoints use.

pub mod bert;
pub mod gpt2;
pub mod cnn;
pub mod mlp;
pub mod rnn;

use serde::{Deserialize, Serialize};

/// Element-wise activations by the names configs use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    #[default]
    Relu,
    Gelu,
    Tanh,
    Sigmoid,
    Silu,
    Identity,
}

impl Activation {
    pub fn apply(&self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        match self {
            Self::Relu => x.relu(),
            Self::Gelu => x.gelu_erf(),
            Self::Tanh => x.tanh(),
            Self::Sigmoid => candle_nn::ops::sigmoid(x),
            Self::Silu => x.silu(),
            Self::Identity => Ok(x.clone()),
        }
    }
}

impl std::str::FromStr for Activation {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_ascii_lowercase()))
            .map_err(|_| anyhow::anyhow!("unknown activation {s:?}: expected relu, gelu, tanh, sigmoid, silu or identity"))
    }
}
