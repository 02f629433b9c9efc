//! Scaled dot-product attention. (Placeholder until the fused op lands: the reference path.)

use candle_core::{DType, Result, Tensor, D};

/// q: (batch, heads, q_len, head_dim); k, v: (batch, heads, kv_len, head_dim); key_mask:
/// (batch, kv_len), nonzero = attend. Causal: query i sees key j iff j <= i + kv_len - q_len.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, key_mask: Option<&Tensor>, scale: f64, causal: bool) -> Result<Tensor> {
    reference_attention(q, k, v, key_mask, scale, causal)
}

/// The same maths with plain differentiable candle ops.
pub fn reference_attention(q: &Tensor, k: &Tensor, v: &Tensor, key_mask: Option<&Tensor>, scale: f64, causal: bool) -> Result<Tensor> {
    let (b, _h, q_len, _d) = q.dims4()?;
    let kv_len = k.dim(2)?;
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let mut allowed: Option<Tensor> = None;
    if let Some(mask) = key_mask {
        allowed = Some(mask.ne(0u32)?.reshape((b, 1, 1, kv_len))?.broadcast_as((b, 1, q_len, kv_len))?);
    }
    if causal {
        let offset = kv_len as i64 - q_len as i64;
        let rows: Vec<u8> = (0..q_len as i64)
            .flat_map(|i| (0..kv_len as i64).map(move |j| u8::from(j <= i + offset)))
            .collect();
        let tri = Tensor::from_vec(rows, (1, 1, q_len, kv_len), q.device())?.broadcast_as((b, 1, q_len, kv_len))?;
        allowed = Some(match allowed {
            Some(a) => (a * tri)?,
            None => tri,
        });
    }
    let scores = match allowed {
        Some(a) => {
            let neg = Tensor::new(f32::NEG_INFINITY, q.device())?.to_dtype(scores.dtype())?.broadcast_as(scores.shape())?;
            a.broadcast_as(scores.shape())?.where_cond(&scores, &neg)?
        }
        None => scores,
    };
    let probs = crate::nn::softmax_last(&scores.to_dtype(DType::F32)?)?.to_dtype(q.dtype())?;
    let _ = D::Minus1;
    probs.matmul(&v.contiguous()?)
}
