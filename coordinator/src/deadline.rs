//! When the owner of a session decides that a stage is dead rather than slow (docs/RELIABILITY.md, "Detection").
//!
//! Two questions, kept apart:
//!
//! * **Is the step late?** [`StepTimes`] keeps the route's measured step times (a smoothed decode step, a smoothed
//!   prefill cost per position) and gives each step a deadline: `max(floor, factor × expected)`. Before it, nothing
//!   is checked: a step within its budget is never a reason to fail over.
//! * **Is a stage gone?** [`Liveness`] watches how many UDP datagrams arrived on each stage's QUIC connection. Both
//!   ends send keep-alives every [`shardline_proto::tls::KEEP_ALIVE`] and acknowledge each other's packets within
//!   milliseconds, from the QUIC driver task, whatever the stage's compute is doing. A live stage busy with a long
//!   prefill chunk therefore keeps acknowledging (that is its progress report), while a killed or cut-off one goes
//!   silent. A late step whose stage has been silent for [`DeadlineConfig::silence`] fails with that stage blamed;
//!   a late step whose stages all still answer is waited for (a slow node under load is not abandoned) until the
//!   hard `step_timeout` of the client.
//!
//! The QUIC idle timeout ([`shardline_proto::tls::IDLE_TIMEOUT`]) stays as the backstop for connections no owner
//! watches. [`StepTimes`] and [`Liveness`] are pure logic (callers pass `now` and the datagram counts); [`watch`] runs
//! them against real connections.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Tunables of failure detection.
#[derive(Clone, Copy, Debug)]
pub struct DeadlineConfig {
    /// The least time a step is given before its stages are checked at all.
    pub floor: Duration,
    /// A step is late after `factor ×` its expected time (measured on this route).
    pub factor: f64,
    /// A stage whose connection received nothing for this long while a step is late is taken for dead. Several
    /// keep-alive intervals, so a lost packet or two on a lossy hop is not a death.
    pub silence: Duration,
    /// How often a late step re-checks its stages.
    pub poll: Duration,
    /// Longest QUIC handshake with a stage before it counts as unreachable (milliseconds on a LAN, a few round trips
    /// across the internet).
    pub connect: Duration,
}

impl Default for DeadlineConfig {
    fn default() -> Self {
        Self {
            floor: Duration::from_millis(250),
            factor: 4.0,
            silence: Duration::from_millis(1000),
            poll: Duration::from_millis(50),
            connect: Duration::from_secs(2),
        }
    }
}

/// Step times measured by the earlier sessions of one client (seconds per decode step, seconds per prefill
/// position), shared by its sessions. A new session's first deadlines start from them rather than from the
/// planner's estimate, which can be ten times too long (a 600-position prefill was given 3.2 s where it took 0.14 s),
/// so a stage killed during a first prefill is found within about the silence limit. Every route covers the whole
/// model, so the times carry over between routes: on a slower route the first check only comes sooner, and a stage
/// is still taken for dead by its silence alone.
#[derive(Debug, Default)]
pub struct StepMemory(Mutex<(Option<f64>, Option<f64>)>);

/// Smoothed step times of one route: what "late" means for its next step.
#[derive(Clone, Debug)]
pub struct StepTimes {
    config: DeadlineConfig,
    /// Where the client keeps what its sessions measured.
    memory: Option<Arc<StepMemory>>,
    /// Seconds per decode step (one position, owner → every stage → owner).
    decode: f64,
    /// Seconds per prefill position (a chunk of `n` costs about `n ×` this, plus one decode step of latency).
    prefill_per_token: f64,
    /// Whether `decode` and `prefill_per_token` have been measured yet (the first measurement replaces the estimate).
    measured: (bool, bool),
}

/// Weight of a new measurement in the moving averages.
const ALPHA: f64 = 0.25;

impl StepTimes {
    /// Before any measurement, `initial` (the planner's estimate per decoded token) stands for a decode step, and a
    /// tenth of it for a prefill position (batched positions cost far less than a step each). Estimates only bring
    /// the first check forward: a stage is still declared dead only by its silence.
    pub fn new(config: DeadlineConfig, initial: Duration) -> Self {
        let s = initial.as_secs_f64().max(1e-4);
        Self { config, memory: None, decode: s, prefill_per_token: s / 10.0, measured: (false, false) }
    }

    /// Starts from what the client's earlier sessions measured (where they measured it), and adds this route's
    /// measurements to `memory`. This route's own first measurement still replaces the estimate.
    pub fn with_memory(mut self, memory: Arc<StepMemory>) -> Self {
        let (decode, prefill) = *memory.0.lock();
        self.decode = decode.unwrap_or(self.decode);
        self.prefill_per_token = prefill.unwrap_or(self.prefill_per_token);
        self.memory = Some(memory);
        self
    }

    /// The time one step of `n` positions is expected to take.
    pub fn expected(&self, n: usize) -> Duration {
        let n = n.max(1);
        let secs = if n == 1 { self.decode } else { self.decode + self.prefill_per_token * (n - 1) as f64 };
        Duration::from_secs_f64(secs)
    }

    /// When a step of `n` positions started at `start` becomes late.
    pub fn deadline(&self, start: Instant, n: usize) -> Instant {
        let budget = self.expected(n).mul_f64(self.config.factor).max(self.config.floor);
        start + budget
    }

    /// Records that a step of `n` positions took `took`.
    pub fn record(&mut self, n: usize, took: Duration) {
        let t = took.as_secs_f64();
        if n <= 1 {
            self.decode = if self.measured.0 { self.decode + ALPHA * (t - self.decode) } else { t };
            self.measured.0 = true;
        } else {
            // The part beyond one step's latency is the per-position cost.
            let per = ((t - self.decode).max(0.0) / (n - 1) as f64).max(1e-6);
            self.prefill_per_token =
                if self.measured.1 { self.prefill_per_token + ALPHA * (per - self.prefill_per_token) } else { per };
            self.measured.1 = true;
        }
        if let Some(m) = &self.memory {
            let mut m = m.0.lock();
            if self.measured.0 {
                m.0 = Some(self.decode);
            }
            if self.measured.1 {
                m.1 = Some(self.prefill_per_token);
            }
        }
    }

    pub fn config(&self) -> DeadlineConfig {
        self.config
    }
}

/// What was last heard on each stage's connection.
#[derive(Clone, Debug)]
pub struct Liveness {
    /// Per stage: datagrams received so far, and when that count last grew.
    heard: Vec<(u64, Instant)>,
}

impl Liveness {
    /// Starts watching stages whose connections have received `counts` datagrams, as of `now`.
    pub fn new(now: Instant, counts: &[u64]) -> Self {
        Self { heard: counts.iter().map(|&c| (c, now)).collect() }
    }

    /// Takes the current counts; returns the first stage (in route order) silent for at least `silence`.
    pub fn observe(&mut self, now: Instant, counts: &[u64], silence: Duration) -> Option<usize> {
        let mut dead = None;
        for (i, (&c, h)) in counts.iter().zip(self.heard.iter_mut()).enumerate() {
            if c != h.0 {
                *h = (c, now);
            } else if dead.is_none() && now.duration_since(h.1) >= silence {
                dead = Some(i);
            }
        }
        dead
    }

    /// How long stage `i` has been silent as of `now`.
    pub fn silent_for(&self, i: usize, now: Instant) -> Duration {
        self.heard.get(i).map_or(Duration::ZERO, |h| now.duration_since(h.1))
    }
}

/// How a watched wait ended.
#[derive(Debug)]
pub enum Watched<T> {
    Done(T),
    /// Stage `stage` (an index into the watched connections) heard nothing for `silent` after the step was late.
    Silent {
        stage: usize,
        silent: Duration,
    },
}

/// Datagrams received so far on each connection.
fn counts(conns: &[quinn::Connection]) -> Vec<u64> {
    conns.iter().map(|c| c.stats().udp_rx.datagrams).collect()
}

/// Waits for `fut`; once `late_at` has passed, checks every [`DeadlineConfig::poll`] whether one of `conns` has gone
/// silent for [`DeadlineConfig::silence`], and gives up on the first that has. Silence is counted from the start of
/// the wait, so a stage that died before it is noticed `silence` after the wait began (or at `late_at`, if later).
pub async fn watch<F: Future>(
    fut: F,
    conns: &[quinn::Connection],
    late_at: Instant,
    cfg: &DeadlineConfig,
) -> Watched<F::Output> {
    let mut live = Liveness::new(Instant::now(), &counts(conns));
    tokio::pin!(fut);
    let mut next_check = tokio::time::Instant::from_std(late_at);
    loop {
        tokio::select! {
            out = &mut fut => return Watched::Done(out),
            _ = tokio::time::sleep_until(next_check) => {
                let now = Instant::now();
                // Woken far too late, this process was starved (its QUIC driver too, so the counts may be stale):
                // no verdict on that, count silence afresh.
                let lag = tokio::time::Instant::now().saturating_duration_since(next_check);
                if lag > cfg.silence / 2 {
                    live = Liveness::new(now, &counts(conns));
                } else if let Some(stage) = live.observe(now, &counts(conns), cfg.silence) {
                    return Watched::Silent { stage, silent: live.silent_for(stage, now) };
                }
                next_check = tokio::time::Instant::now() + cfg.poll;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Equal within a microsecond (the averages are computed in f64 seconds).
    fn near(a: Duration, b: Duration) -> bool {
        a.abs_diff(b) < Duration::from_micros(1)
    }

    #[test]
    fn a_step_gets_at_least_the_floor_and_otherwise_factor_times_its_measured_time() {
        let cfg = DeadlineConfig::default();
        let t0 = Instant::now();
        let mut st = StepTimes::new(cfg, ms(1));
        // 4 × 1 ms is under the floor.
        assert_eq!(st.deadline(t0, 1), t0 + cfg.floor);
        st.record(1, ms(200));
        assert!(near(st.deadline(t0, 1) - t0, ms(800)));
        // Smoothed, not replaced: one fast step does not shrink the budget to the floor.
        st.record(1, ms(40));
        assert!(near(st.expected(1), ms(160)), "{:?}", st.expected(1));
    }

    #[test]
    fn a_new_session_starts_from_the_times_its_client_measured() {
        let cfg = DeadlineConfig::default();
        let memory = Arc::new(StepMemory::default());
        // The planner guessed 26 ms per token: a 600-position prefill would be late only after 6.4 s.
        let first = StepTimes::new(cfg, ms(26)).with_memory(memory.clone());
        assert!(first.expected(600) > Duration::from_millis(1500));
        let mut first = first;
        first.record(1, ms(2));
        first.record(600, ms(140));
        // The next session of the same client expects what the first measured, not the guess.
        let next = StepTimes::new(cfg, ms(26)).with_memory(memory);
        let e = next.expected(600);
        assert!(e > ms(130) && e < ms(150), "{e:?}");
        assert_eq!(next.expected(1), ms(2));
        // A decode step is still given at least the floor.
        let t0 = Instant::now();
        assert_eq!(next.deadline(t0, 1), t0 + cfg.floor);
    }

    #[test]
    fn a_long_prefill_is_given_time_in_proportion_to_its_positions() {
        let mut st = StepTimes::new(DeadlineConfig::default(), ms(1));
        st.record(1, ms(10));
        // 101 positions in 1.01 s: 10 ms of latency + 100 × 10 ms.
        st.record(101, ms(1010));
        assert!(near(st.expected(201), ms(2010)), "{:?}", st.expected(201));
        let t0 = Instant::now();
        assert!(near(st.deadline(t0, 201) - t0, ms(8040)));
    }

    #[test]
    fn a_stage_is_dead_only_after_the_silence_and_any_datagram_revives_it() {
        let t0 = Instant::now();
        let silence = ms(1000);
        let mut l = Liveness::new(t0, &[5, 7, 9]);
        assert_eq!(l.observe(t0 + ms(999), &[5, 8, 10], silence), None);
        // Stage 0 has heard nothing since t0.
        assert_eq!(l.observe(t0 + ms(1000), &[5, 8, 10], silence), Some(0));
        assert_eq!(l.silent_for(0, t0 + ms(1000)), ms(1000));
        // It answers: alive again; stage 1 has been silent since 999 ms.
        assert_eq!(l.observe(t0 + ms(1500), &[6, 8, 11], silence), None);
        assert_eq!(l.observe(t0 + ms(1999), &[6, 8, 12], silence), Some(1));
    }
}
