//! The llama.cpp reference fixtures written by `scripts/make-reference.py`: the full one (top-k logits at every
//! position) and the compact per-preset ones (top-1 id, logit and margin) share everything but the positions.
#![allow(dead_code)] // each test reads its own part

use serde::Deserialize;

#[derive(Deserialize)]
pub struct Fixture<P> {
    pub model: FixtureModel,
    pub cases: Vec<Case<P>>,
}

#[derive(Deserialize)]
pub struct FixtureModel {
    pub sha256: String,
}

#[derive(Deserialize)]
pub struct Case<P> {
    pub name: String,
    pub prompt: String,
    pub prompt_tokens: Vec<u32>,
    pub continuation_tokens: Vec<u32>,
    pub positions: P,
}
