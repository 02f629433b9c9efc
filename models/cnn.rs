//! Convolutional networks for images: LeNet-5 (LeCun et al. 1998, with ReLU and max pooling as
//! it is trained today) and a configurable stack of conv → batch norm → ReLU → max-pool blocks.
//! Tensor names follow the PyTorch modules of the same shape (`conv1`, `blocks.0.bn`, ...).
//! Pooling is `wick::nn::max_pool2d`: candle's has a wrong gradient.

use candle_core::{Result, Tensor};
use crate::nn::{max_pool2d, BatchNorm2d};
use crate::ops::conv::Conv2d;
use crate::ops::linear::Dense;
use candle_nn::{Module, ModuleT, VarBuilder};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeNetConfig {
    pub in_channels: usize,
    /// Height = width of the input images (28 for MNIST).
    pub image_size: usize,
    pub num_classes: usize,
}

impl Default for LeNetConfig {
    fn default() -> Self {
        Self { in_channels: 1, image_size: 28, num_classes: 10 }
    }
}

/// conv1 6@5×5 (padding 2) → pool → conv2 16@5×5 → pool → fc1 120 → fc2 84 → fc3 classes.
pub struct LeNet5 {
    conv1: Conv2d,
    conv2: Conv2d,
    fc1: Dense,
    fc2: Dense,
    fc3: Dense,
}

impl LeNet5 {
    pub fn load(vb: VarBuilder, cfg: &LeNetConfig) -> Result<Self> {
        let side = (cfg.image_size / 2).checked_sub(4).map(|s| s / 2).filter(|s| *s > 0);
        let Some(side) = side else {
            candle_core::bail!("LeNet-5 needs images of at least 12×12, got {}", cfg.image_size)
        };
        Ok(Self {
            conv1: Conv2d::load(vb.pp("conv1"), cfg.in_channels, 6, 5, 2, 1, true)?,
            conv2: Conv2d::load(vb.pp("conv2"), 6, 16, 5, 0, 1, true)?,
            fc1: Dense::load(vb.pp("fc1"), 16 * side * side, 120)?,
            fc2: Dense::load(vb.pp("fc2"), 120, 84)?,
            fc3: Dense::load(vb.pp("fc3"), 84, cfg.num_classes)?,
        })
    }
}

impl ModuleT for LeNet5 {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        let x = self.conv1.forward_relu_max_pool(x, 2)?;
        let x = self.conv2.forward_relu_max_pool(&x, 2)?.flatten_from(1)?;
        let x = self.fc1.forward_relu(&x)?;
        let x = self.fc2.forward_relu(&x)?;
        self.fc3.forward(&x)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConvNetConfig {
    pub in_channels: usize,
    pub image_size: usize,
    /// Output channels of each block; every block halves the image side.
    pub channels: Vec<usize>,
    pub kernel_size: usize,
    pub batch_norm: bool,
    /// Width of a hidden fully-connected layer before the classifier (`fc`), if any.
    pub hidden: Option<usize>,
    pub dropout: f64,
    pub num_classes: usize,
}

impl Default for ConvNetConfig {
    /// The MNIST network of the `train_mnist` example.
    fn default() -> Self {
        Self { in_channels: 1, image_size: 28, channels: vec![32, 64], kernel_size: 3, batch_norm: true, hidden: Some(128), dropout: 0.25, num_classes: 10 }
    }
}

struct ConvBlock {
    conv: Conv2d,
    bn: Option<BatchNorm2d>,
}

pub struct ConvNet {
    blocks: Vec<ConvBlock>,
    fc: Option<Dense>,
    head: Dense,
    dropout: f64,
}

impl ConvNet {
    pub fn load(vb: VarBuilder, cfg: &ConvNetConfig) -> Result<Self> {
        if cfg.kernel_size % 2 == 0 {
            candle_core::bail!("ConvNet kernel size must be odd (same padding), got {}", cfg.kernel_size)
        }
        let (k, pad) = (cfg.kernel_size, cfg.kernel_size / 2);
        let mut blocks = Vec::new();
        let (mut c_in, mut side) = (cfg.in_channels, cfg.image_size);
        for (i, &c_out) in cfg.channels.iter().enumerate() {
            let vb = vb.pp(format!("blocks.{i}"));
            // A bias before batch norm would be cancelled by its mean subtraction.
            let block = if cfg.batch_norm {
                let bn = BatchNorm2d::load(vb.pp("bn"), c_out, 1e-5, 0.1)?;
                ConvBlock { conv: Conv2d::load(vb.pp("conv"), c_in, c_out, k, pad, 1, false)?, bn: Some(bn) }
            } else {
                ConvBlock { conv: Conv2d::load(vb.pp("conv"), c_in, c_out, k, pad, 1, true)?, bn: None }
            };
            blocks.push(block);
            c_in = c_out;
            side /= 2;
            if side == 0 {
                candle_core::bail!("{} blocks pool a {}-pixel image away to nothing", cfg.channels.len(), cfg.image_size)
            }
        }
        let flat = c_in * side * side;
        let (fc, head_in) = match cfg.hidden {
            Some(h) => (Some(Dense::load(vb.pp("fc"), flat, h)?), h),
            None => (None, flat),
        };
        Ok(Self { blocks, fc, head: Dense::load(vb.pp("head"), head_in, cfg.num_classes)?, dropout: cfg.dropout })
    }
}

impl ModuleT for ConvNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = x.clone();
        for block in &self.blocks {
            x = block.conv.forward(&x)?;
            if let Some(bn) = &block.bn {
                x = bn.forward_t(&x, train)?;
            }
            x = max_pool2d(&x.relu()?, 2)?;
        }
        let mut x = x.flatten_from(1)?;
        if let Some(fc) = &self.fc {
            x = crate::nn::dropout(&x, self.dropout, train)?;
            x = fc.forward_relu(&x)?;
        }
        x = crate::nn::dropout(&x, self.dropout, train)?;
        self.head.forward(&x)
    }
}

/// Saved and loaded as wick model folders (`model_type: "wick-lenet5"`, `"wick-convnet"`).
impl crate::pretrained::Pretrained for LeNet5 {
    type Config = LeNetConfig;
    const MODEL_TYPES: &'static [&'static str] = &["wick-lenet5"];
    const ARCHITECTURE: &'static str = "LeNet5";
    fn build(vb: VarBuilder, config: &LeNetConfig) -> Result<Self> {
        Self::load(vb, config)
    }
}

impl crate::pretrained::Pretrained for ConvNet {
    type Config = ConvNetConfig;
    const MODEL_TYPES: &'static [&'static str] = &["wick-convnet"];
    const ARCHITECTURE: &'static str = "ConvNet";
    fn build(vb: VarBuilder, config: &ConvNetConfig) -> Result<Self> {
        Self::load(vb, config)
    }
}
