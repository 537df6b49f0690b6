//! Layer spans: which transformer blocks a node serves and a session stage runs. Shared by announcements, the wire
//! (`Open` frames and route hops) and routing; the model crate re-exports it.

use std::fmt;
use std::str::FromStr;

/// Why a layer range was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpanError {
    #[error("layer range {start}..{end} is not inside the model's 0..{n_layers} layers")]
    OutOfRange { start: usize, end: usize, n_layers: usize },
    #[error("layer range {0:?} is not of the form A..B")]
    Syntax(String),
    #[error("layer range {0:?} is empty")]
    Empty(String),
}

/// A contiguous range `start..end` of a model's transformer blocks: the unit a node serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct LayerRange {
    pub start: usize,
    pub end: usize,
}

impl LayerRange {
    pub fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }

    /// The whole model.
    pub fn full(n_layers: usize) -> Self {
        Self { start: 0, end: n_layers }
    }

    /// `0..n_layers` split into `k` contiguous ranges whose sizes differ by at most one (the larger ones first);
    /// fewer ranges when there are fewer layers than `k`.
    pub fn split_evenly(n_layers: usize, k: usize) -> Vec<LayerRange> {
        let k = k.clamp(1, n_layers.max(1));
        let (base, extra) = (n_layers / k, n_layers % k);
        let mut start = 0;
        (0..k)
            .map(|i| {
                let end = start + base + usize::from(i < extra);
                let r = LayerRange::new(start, end);
                start = end;
                r
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks that the range is non-empty and inside `0..n_layers`.
    pub fn check(&self, n_layers: usize) -> Result<(), SpanError> {
        if self.start >= self.end || self.end > n_layers {
            return Err(SpanError::OutOfRange { start: self.start, end: self.end, n_layers });
        }
        Ok(())
    }

    pub fn contains(&self, layer: usize) -> bool {
        (self.start..self.end).contains(&layer)
    }
}

impl fmt::Display for LayerRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

impl FromStr for LayerRange {
    type Err = SpanError;

    /// Parses `A..B` (end exclusive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SpanError::Syntax(s.to_string());
        let (a, b) = s.trim().split_once("..").ok_or_else(bad)?;
        let start = a.trim().parse().map_err(|_| bad())?;
        let end = b.trim().parse().map_err(|_| bad())?;
        if start >= end {
            return Err(SpanError::Empty(s.to_string()));
        }
        Ok(Self { start, end })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks() {
        let r: LayerRange = "10..20".parse().unwrap();
        assert_eq!(r, LayerRange::new(10, 20));
        assert_eq!(r.to_string(), "10..20");
        assert!(r.check(30).is_ok());
        assert!(r.check(15).is_err());
        assert!("20..10".parse::<LayerRange>().is_err());
        assert!("5".parse::<LayerRange>().is_err());
        assert!("a..b".parse::<LayerRange>().is_err());
    }

    #[test]
    fn layers_are_split_contiguously_and_evenly() {
        let show = |n, k| LayerRange::split_evenly(n, k).iter().map(|r| r.to_string()).collect::<Vec<_>>().join(" ");
        assert_eq!(show(30, 3), "0..10 10..20 20..30");
        assert_eq!(show(30, 4), "0..8 8..16 16..23 23..30");
        assert_eq!(show(2, 5), "0..1 1..2");
        assert_eq!(show(7, 1), "0..7");
    }
}
