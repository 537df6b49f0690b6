//! The one closeness check of the kernels tests (included by `common` and `cpu_common`).

/// How far a result may be from its reference.
#[derive(Clone, Copy, Debug)]
pub enum Tol {
    /// Every element: `|got − want| <= abs + rel · |want|` (references computed in f64 by the test).
    Elem { abs: f64, rel: f64 },
    /// The whole slice: `max |got − want| <= rel · max(max |want|, 1e-3)` (one device against another).
    OfMax(f64),
}

/// Asserts `got` matches `want` within `tol`: same length, no NaN in `got`, a finite reference.
pub fn assert_close<W: Copy + Into<f64>>(what: &str, got: &[f32], want: &[W], tol: Tol) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().position(|v| v.is_nan()) {
        panic!("{what}: NaN at {i} (an element was not written or the math failed)");
    }
    let want: Vec<f64> = want.iter().map(|&w| w.into()).collect();
    assert!(want.iter().all(|v| v.is_finite()), "{what}: the reference is not finite");
    match tol {
        Tol::Elem { abs, rel } => {
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                let bound = abs + rel * w.abs();
                assert!((g as f64 - w).abs() <= bound, "{what}[{i}]: got {g}, want {w} (tolerance {bound})");
            }
        }
        Tol::OfMax(rel) => {
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3);
            let (mut worst, mut at) = (0.0f64, 0);
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                let e = (g as f64 - w).abs();
                if e > worst {
                    worst = e;
                    at = i;
                }
            }
            let r = worst / scale;
            assert!(
                r <= rel,
                "{what}: relative error {r:.3e} > {rel:.0e} at {at} (got {}, want {}, scale {scale})",
                got[at],
                want[at]
            );
        }
    }
}
