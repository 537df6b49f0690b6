//! What a compute step costs, learned from the times the driver measures: the scheduler's model for keeping a step
//! that carries decode rows within a bound of a decode-only step (`schedule::plan_with`, as in Sarathi-Serve).
//!
//! A step's time is modelled as `fixed + per_row · rows + per_pair · attended`: `fixed` is what every step pays
//! whatever its size (reading the weights, launching kernels), `per_row` the matmuls of one more row, and `attended`
//! the (query, key) position pairs of its attention — a chunk of `n` rows starting at position `s` attends
//! `n·s + n(n+1)/2`, so a prompt's chunk costs more the further into the prompt it is. The three coefficients are
//! fitted by least squares over the measured steps, older steps weighing less ([`FORGET`] per step, so the model
//! follows a change of load), each kept non-negative. Time never enters the core by itself: the driver reports each
//! batch's compute time ([`super::Event::ComputeTime`]), so a test scripts the costs and gets the same plans every
//! run.

use std::time::Duration;

/// Weight of a step's measurement relative to the next one's: about the last hundred steps count.
pub const FORGET: f64 = 0.99;

/// Attended pairs are counted in units of this many, so the three features have comparable magnitudes.
const PAIR_UNIT: f64 = 1024.0;

/// How much the measured steps must differ in rows (Σ w·(rows − mean)², weighted as the fit weighs them) before the
/// fit's per-row cost is trusted: one step 8 rows away from the others is enough.
const ROW_SPREAD: f64 = 64.0;

/// A measurement further than this factor from the fit's prediction counts as this factor (a preempted step on a
/// busy machine must not teach the model that rows are expensive); repeated ones still move the fit quickly.
const CLIP: f64 = 4.0;

/// What the cost model needs to know of a step: its rows and the position pairs its attention covers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepShape {
    pub rows: usize,
    /// Attended (query, key) pairs, over every item.
    pub attended: f64,
}

impl StepShape {
    /// Adds a chunk of `rows` positions whose first is `start` (the session's KV cache holds `start` positions).
    pub fn add(&mut self, start: u64, rows: usize) {
        let (s, n) = (start as f64, rows as f64);
        self.rows += rows;
        self.attended += n * s + n * (n + 1.0) / 2.0;
    }

    /// This shape with a chunk added.
    pub fn with(mut self, start: u64, rows: usize) -> Self {
        self.add(start, rows);
        self
    }

    fn features(&self) -> [f64; 3] {
        [1.0, self.rows as f64, self.attended / PAIR_UNIT]
    }
}

/// The fitted step-time model of one stage (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct StepCost {
    /// Σ w·x·xᵀ and Σ w·x·y over the measured steps (x = features, y = seconds).
    xx: [[f64; 3]; 3],
    xy: [f64; 3],
    /// Σ w, Σ w·rows, Σ w·rows²: how much the steps' rows differ.
    w: f64,
    wr: f64,
    wrr: f64,
    steps: u64,
    /// The fitted coefficients (seconds per step, per row, per [`PAIR_UNIT`] pairs), once a step was measured.
    coef: Option<[f64; 3]>,
}

impl StepCost {
    /// Steps measured so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The fitted `(fixed, per row, per attended pair)` times, once a step was measured.
    pub fn coefficients(&self) -> Option<(Duration, Duration, Duration)> {
        let c = self.coef?;
        let d = |s: f64| Duration::from_secs_f64(s.max(0.0));
        Some((d(c[0]), d(c[1]), d(c[2] / PAIR_UNIT)))
    }

    /// Whether the per-row cost is known well enough to plan by: at least three steps, some of them with rather more
    /// or fewer rows than the rest (a stage that has only ever run decode steps of the same size cannot tell what a
    /// prompt chunk beside them would cost).
    pub fn ready(&self) -> bool {
        if self.steps < 3 || self.w <= 0.0 || self.coef.is_none() {
            return false;
        }
        let spread = self.wrr - self.wr * self.wr / self.w;
        spread >= ROW_SPREAD
    }

    /// The predicted time of a step of this shape, in seconds (0 before any step was measured).
    pub fn predict(&self, shape: &StepShape) -> f64 {
        let Some(c) = self.coef else { return 0.0 };
        let x = shape.features();
        c[0] * x[0] + c[1] * x[1] + c[2] * x[2]
    }

    /// Learns from one measured step.
    pub fn observe(&mut self, shape: &StepShape, took: Duration) {
        let mut y = took.as_secs_f64();
        if !y.is_finite() || shape.rows == 0 {
            return;
        }
        if self.ready() {
            let p = self.predict(shape);
            if p > 0.0 {
                y = y.clamp(p / CLIP, p * CLIP);
            }
        }
        let x = shape.features();
        for (i, row) in self.xx.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = *v * FORGET + x[i] * x[j];
            }
            self.xy[i] = self.xy[i] * FORGET + x[i] * y;
        }
        let r = shape.rows as f64;
        self.w = self.w * FORGET + 1.0;
        self.wr = self.wr * FORGET + r;
        self.wrr = self.wrr * FORGET + r * r;
        self.steps += 1;
        self.coef = Some(fit(&self.xx, &self.xy));
    }
}

/// Least squares with every coefficient ≥ 0: solve the normal equations (lightly damped, so a feature the steps never
/// varied gets a small coefficient, not a wild one), drop the most negative coefficient and solve again without it.
fn fit(xx: &[[f64; 3]; 3], xy: &[f64; 3]) -> [f64; 3] {
    let mut active = [true; 3];
    loop {
        let idx: Vec<usize> = (0..3).filter(|&i| active[i]).collect();
        let n = idx.len();
        if n == 0 {
            return [0.0; 3];
        }
        let mut a = vec![vec![0.0; n + 1]; n];
        for (r, &i) in idx.iter().enumerate() {
            for (c, &j) in idx.iter().enumerate() {
                a[r][c] = xx[i][j];
            }
            a[r][r] += xx[i][i] * 1e-6 + 1e-12;
            a[r][n] = xy[i];
        }
        let Some(sol) = solve(a) else { return [0.0; 3] };
        let mut coef = [0.0; 3];
        for (k, &i) in idx.iter().enumerate() {
            coef[i] = sol[k];
        }
        match idx.iter().copied().filter(|&i| coef[i] < 0.0).min_by(|&a, &b| coef[a].total_cmp(&coef[b])) {
            Some(worst) => active[worst] = false,
            None => return coef,
        }
    }
}

/// Gaussian elimination with partial pivoting on an augmented `n × (n + 1)` matrix; `None` if singular.
fn solve(mut a: Vec<Vec<f64>>) -> Option<Vec<f64>> {
    let n = a.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))?;
        if a[pivot][col].abs() < 1e-300 || !a[pivot][col].is_finite() {
            return None;
        }
        a.swap(col, pivot);
        let (top, below) = a.split_at_mut(col + 1);
        let p = &top[col];
        for row in below {
            let f = row[col] / p[col];
            for (x, y) in row[col..].iter_mut().zip(&p[col..]) {
                *x -= f * y;
            }
        }
    }
    let mut x = vec![0.0; n];
    for r in (0..n).rev() {
        let s: f64 = (r + 1..n).map(|c| a[r][c] * x[c]).sum();
        x[r] = (a[r][n] - s) / a[r][r];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine whose steps cost 2 ms + 0.5 ms a row + 1 µs per attended pair.
    fn truth(shape: &StepShape) -> Duration {
        Duration::from_secs_f64(2e-3 + 0.5e-3 * shape.rows as f64 + 1e-6 * shape.attended)
    }

    fn decode_step(sessions: usize, position: u64) -> StepShape {
        (0..sessions).fold(StepShape::default(), |s, _| s.with(position, 1))
    }

    #[test]
    fn learns_the_three_costs_from_decode_and_prompt_steps() {
        let mut cost = StepCost::default();
        assert!(!cost.ready());
        assert_eq!(cost.predict(&decode_step(8, 10)), 0.0);
        for k in 0..40u64 {
            let d = decode_step(8, 20 + k);
            cost.observe(&d, truth(&d));
            // Every fourth step carries a prompt chunk, deeper each time.
            if k % 4 == 0 {
                let m = d.with(k * 64, 32);
                cost.observe(&m, truth(&m));
            }
        }
        assert!(cost.ready());
        for shape in [decode_step(8, 100), decode_step(8, 100).with(1400, 24), decode_step(1, 5).with(0, 128)] {
            let (want, got) = (truth(&shape).as_secs_f64(), cost.predict(&shape));
            assert!((got - want).abs() < want * 0.02, "{shape:?}: predicted {got}, true {want}");
        }
        let (fixed, row, pair) = cost.coefficients().unwrap();
        assert!((fixed.as_secs_f64() - 2e-3).abs() < 1e-4, "{fixed:?}");
        assert!((row.as_secs_f64() - 0.5e-3).abs() < 1e-5, "{row:?}");
        assert!((pair.as_secs_f64() - 1e-6).abs() < 1e-7, "{pair:?}");
    }

    #[test]
    fn steps_of_one_size_only_are_not_enough_to_plan_by() {
        let mut cost = StepCost::default();
        for k in 0..50 {
            let d = decode_step(8, 20 + k);
            cost.observe(&d, truth(&d));
        }
        assert!(!cost.ready(), "the per-row cost cannot be told from the fixed one");
        // Its prediction of the steps it has seen is still right.
        let d = decode_step(8, 70);
        assert!((cost.predict(&d) - truth(&d).as_secs_f64()).abs() < 1e-4);
        let m = d.with(0, 16);
        cost.observe(&m, truth(&m));
        cost.observe(&d, truth(&d));
        assert!(cost.ready(), "one step 16 rows wider tells the per-row cost");
    }

    #[test]
    fn coefficients_stay_non_negative_and_an_outlier_is_clipped() {
        let mut cost = StepCost::default();
        // Steps whose time does not grow with rows (noise around 5 ms) must not give a negative per-row cost.
        for k in 0..30u64 {
            let rows = 1 + (k as usize * 7) % 40;
            let s = StepShape::default().with(0, rows);
            let t = 5e-3 + if k % 2 == 0 { 1e-4 } else { -1e-4 } - rows as f64 * 1e-6;
            cost.observe(&s, Duration::from_secs_f64(t));
        }
        let (f, r, p) = cost.coefficients().unwrap();
        assert!(f > Duration::ZERO && r >= Duration::ZERO && p >= Duration::ZERO, "{f:?} {r:?} {p:?}");
        // One step that took 100 times longer (preempted) moves the prediction by at most the clip.
        let s = StepShape::default().with(0, 8);
        let before = cost.predict(&s);
        cost.observe(&s, Duration::from_secs_f64(before * 100.0));
        assert!(cost.predict(&s) < before * 1.2, "{} -> {}", before, cost.predict(&s));
    }
}
