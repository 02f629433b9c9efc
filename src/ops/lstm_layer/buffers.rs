//! Reused work buffers for the layer op.
//!
//! The op's saved activations and scratch arrays are several MB each (13 MB of gates at
//! B = 32, T = 100, H = 256). The allocator hands buffers that large out as fresh pages, which
//! the kernel zeroes on first touch, and `vec![0.0; n]` writes them once more: together about a
//! fifth of a training step's time when measured. Every element of these buffers is written by
//! the op before it is read, so a buffer from an earlier step can be reused as it is.

use std::sync::Mutex;

/// At most this many idle buffers are kept (a few layers' worth).
const KEEP: usize = 24;

static IDLE: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// A buffer of `len` elements with unspecified (initialised) contents: the smallest idle one
/// that is large enough, else a new one.
pub(super) fn take(len: usize) -> Vec<f32> {
    let reused = {
        let mut idle = IDLE.lock().unwrap_or_else(|e| e.into_inner());
        let best = idle.iter().enumerate().filter(|(_, v)| v.len() >= len).min_by_key(|(_, v)| v.len()).map(|(k, _)| k);
        best.map(|k| idle.swap_remove(k))
    };
    match reused {
        Some(mut v) => {
            v.truncate(len);
            v
        }
        None => vec![0.0; len],
    }
}

/// Hands a buffer back for reuse (the smallest idle one goes when too many are idle).
pub(super) fn give(mut v: Vec<f32>) {
    // Idle buffers are kept at their full capacity, all of it initialised.
    v.resize(v.capacity(), 0.0);
    let mut idle = IDLE.lock().unwrap_or_else(|e| e.into_inner());
    idle.push(v);
    if idle.len() > KEEP {
        if let Some(k) = idle.iter().enumerate().min_by_key(|(_, v)| v.len()).map(|(k, _)| k) {
            idle.swap_remove(k);
        }
    }
}
