pub mod finetune;
pub mod predict;
