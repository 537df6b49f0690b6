//! CPU time of the calling thread and of the whole process (`clock_gettime` with `CLOCK_THREAD_CPUTIME_ID` /
//! `CLOCK_PROCESS_CPUTIME_ID`). Unlike wall time it does not grow while a thread waits for a core, so the stage
//! server's per-step accounting and the CPU benchmarks stay readable on a loaded machine. `None` where the platform
//! has no such clock.

use std::time::Duration;

/// CPU time the calling thread has used.
pub fn thread() -> Option<Duration> {
    #[cfg(unix)]
    {
        read(libc::CLOCK_THREAD_CPUTIME_ID)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// CPU time every thread of this process has used (spinning included).
pub fn process() -> Option<Duration> {
    #[cfg(unix)]
    {
        read(libc::CLOCK_PROCESS_CPUTIME_ID)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

#[cfg(unix)]
fn read(clock: libc::clockid_t) -> Option<Duration> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

#[cfg(test)]
mod tests {
    #[test]
    fn thread_and_process_clocks_advance_with_work() {
        let (t0, p0) = (super::thread().expect("thread clock"), super::process().expect("process clock"));
        let mut x = 1u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let (t1, p1) = (super::thread().unwrap(), super::process().unwrap());
        assert!(t1 > t0, "thread clock did not advance");
        assert!(p1 - p0 >= t1 - t0, "the process clock counts at least this thread's time");
    }
}
