//! The models: one file each, loading the checkpoints of their families by the tensor names
//! those checkpoints use.

pub mod bert;
pub mod gpt2;
pub mod cnn;
pub mod mlp;
pub mod rnn;

use serde::{Deserialize, Serialize};

/// Element-wise activations, by the names Hugging Face configs give them (`hidden_act`,
/// `activation_function`: the keys of transformers' `ACT2FN`); wick's own configs use the same
/// names. Each model's config says which one it defaults to. An unknown name is an error that
/// names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Relu,
    /// The exact (erf) GELU: transformers' "gelu" (BERT's).
    Gelu,
    /// The tanh approximation of GELU (GPT-2's); "gelu_pytorch_tanh" and "gelu_fast" are the
    /// same function.
    #[serde(alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluNew,
    Tanh,
    Sigmoid,
    #[serde(alias = "swish")]
    Silu,
    /// x · sigmoid(1.702 x)
    QuickGelu,
    /// No activation: transformers' "linear", also read as "identity".
    #[serde(rename = "linear", alias = "identity")]
    Identity,
}

impl Activation {
    pub fn apply(&self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        match self {
            Self::Relu => x.relu(),
            Self::Gelu => crate::ops::activation::gelu_erf(x),
            Self::GeluNew => crate::ops::activation::gelu_tanh(x),
            Self::Tanh => x.tanh(),
            Self::Sigmoid => candle_nn::ops::sigmoid(x),
            Self::Silu => x.silu(),
            Self::QuickGelu => x.mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?),
            Self::Identity => Ok(x.clone()),
        }
    }
}

impl std::str::FromStr for Activation {
    type Err = anyhow::Error;
    /// A config name, in any case.
    fn from_str(s: &str) -> anyhow::Result<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_ascii_lowercase())).map_err(|_| {
            anyhow::anyhow!(
                "unknown activation {s:?}: expected relu, gelu, gelu_new (or gelu_pytorch_tanh, gelu_fast), tanh, sigmoid, silu (or swish), quick_gelu or linear (or identity)"
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Activation;

    #[test]
    fn activations_read_the_config_names_and_refuse_others_by_name() {
        for (name, act) in [("gelu", Activation::Gelu), ("gelu_pytorch_tanh", Activation::GeluNew), ("swish", Activation::Silu), ("identity", Activation::Identity), ("quick_gelu", Activation::QuickGelu)] {
            assert_eq!(serde_json::from_str::<Activation>(&format!("{name:?}")).unwrap(), act);
        }
        // transformers' own names are what is written back.
        assert_eq!(serde_json::to_string(&Activation::GeluNew).unwrap(), "\"gelu_new\"");
        assert_eq!(serde_json::to_string(&Activation::Identity).unwrap(), "\"linear\"");
        assert_eq!("ReLU".parse::<Activation>().unwrap(), Activation::Relu);
        let err = "gelu_9".parse::<Activation>().unwrap_err().to_string();
        assert!(err.contains("\"gelu_9\""), "{err}");
        let err = serde_json::from_str::<Activation>("\"mish\"").unwrap_err().to_string();
        assert!(err.contains("mish"), "{err}");
    }
}
