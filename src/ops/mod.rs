//! Custom operations with CPU implementations of our own (and, with `--features cuda`, kernels).

pub mod conv;
pub mod lstm;
