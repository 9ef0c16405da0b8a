//! Early ticks: a memory burst is judged on the next tick, not a second later.
//!
//! Incident D went from burst to exhausted RAM in ~5 s; on a 1 GiB VM with slow swap a
//! pool parent queueing its jobs ends the headroom in ~3 s. A detector that needs three
//! points of a rising series sees that on its third tick: 1.5 s after the start at
//! 500 ms ticks, too late to keep the machine answering. Between ticks the agent reads
//! `MemAvailable` (one small procfs read, every 100 ms by default) and, when it falls
//! fast enough to reach the reserve within the horizon, runs the pipeline at once —
//! and again every watch period while the fall lasts. PSI triggers were the other
//! candidate (DESIGN.md); they fire only once tasks already stall, which is later
//! than the fall of available memory that precedes the stall.
use std::collections::VecDeque;

/// Why an early tick runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Alarm {
    /// Fall of available memory over the watch span.
    pub falling_bytes_per_s: f64,
    /// At that rate, seconds until available memory reaches the reserve.
    pub seconds_to_reserve: f64,
}

/// Samples of `MemAvailable` over a short span.
#[derive(Debug)]
pub struct MemWatch {
    samples: VecDeque<(f64, u64)>,
    /// Rate measured over this many seconds (a few samples, so one page-cache drop
    /// does not count as a burst).
    span_s: f64,
    /// Alarm when the reserve is this close at the current rate.
    horizon_s: f64,
    /// ... and the fall over the span is at least this fraction of RAM.
    min_fall_fraction: f64,
}

impl Default for MemWatch {
    fn default() -> Self {
        Self::new(0.3, 30.0)
    }
}

impl MemWatch {
    #[must_use]
    pub fn new(span_s: f64, horizon_s: f64) -> Self {
        Self {
            samples: VecDeque::new(),
            span_s,
            horizon_s,
            min_fall_fraction: 0.005,
        }
    }

    /// Adds a sample at `t` seconds: available and total memory, and the reserve (the
    /// available memory the detectors count as "none left"), in bytes.
    pub fn observe(&mut self, t: f64, available: u64, total: u64, reserve: u64) -> Option<Alarm> {
        self.samples.push_back((t, available));
        while self
            .samples
            .get(1)
            .is_some_and(|&(t1, _)| t - t1 >= self.span_s)
        {
            self.samples.pop_front();
        }
        let &(t0, a0) = self.samples.front()?;
        let dt = t - t0;
        if dt < self.span_s / 2.0 || available >= a0 {
            return None;
        }
        let fall = (a0 - available) as f64;
        if fall < self.min_fall_fraction * total as f64 {
            return None;
        }
        let rate = fall / dt;
        let seconds = available.saturating_sub(reserve) as f64 / rate;
        (seconds <= self.horizon_s).then_some(Alarm {
            falling_bytes_per_s: rate,
            seconds_to_reserve: seconds,
        })
    }
}

/// `MemAvailable` and `MemTotal` from /proc/meminfo's text, in bytes.
#[must_use]
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    Some((
        crate::collect::meminfo_bytes(text, "MemAvailable")?,
        crate::collect::meminfo_bytes(text, "MemTotal")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const TOTAL: u64 = 1024 * MIB;
    const RESERVE: u64 = 51 * MIB;

    /// Samples every 100 ms from `start` MiB falling `mib_per_s`; the first alarm's time.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "test data, clamped at 0"
    )]
    fn first_alarm(start: u64, mib_per_s: f64, secs: f64) -> Option<(f64, Alarm)> {
        let mut w = MemWatch::default();
        let mut t = 0.0;
        while t <= secs {
            let avail = (start as f64 - mib_per_s * t).max(0.0) as u64 * MIB;
            if let Some(a) = w.observe(t, avail, TOTAL, RESERVE) {
                return Some((t, a));
            }
            t += 0.1;
        }
        None
    }

    /// Incident D in the VM: 200 MiB/s out of 830 MiB available. The alarm comes on the
    /// third sample (the span is 300 ms), with the time left measured right.
    #[test]
    fn a_burst_alarms_within_a_few_samples() {
        let (t, a) = first_alarm(830, 200.0, 5.0).expect("an alarm");
        assert!(t <= 0.31, "alarm at {t} s");
        assert!(
            (a.falling_bytes_per_s / MIB as f64 - 200.0).abs() < 5.0,
            "{a:?}"
        );
        // 830 - 200 * 0.2 = 790 MiB available, 739 above the reserve: ~3.7 s.
        assert!((a.seconds_to_reserve - 3.7).abs() < 0.2, "{a:?}");
    }

    /// A slow rise (a leak at 1 MiB/s, the page cache of a copy) is the regular tick's.
    #[test]
    fn a_slow_fall_or_a_steady_machine_is_quiet() {
        assert_eq!(first_alarm(830, 1.0, 10.0), None);
        assert_eq!(first_alarm(830, 0.0, 10.0), None);
        // Falling 20 MiB/s with 830 available: the reserve is 39 s away (34 s after 5 s).
        assert_eq!(first_alarm(830, 20.0, 5.0), None);
        // The same fall with 300 MiB available: 12 s away, alarm.
        assert!(first_alarm(300, 20.0, 10.0).is_some());
    }

    /// One sample's drop (a short-lived allocation) is not a rate: the span needs at
    /// least half its length of samples.
    #[test]
    fn one_drop_alone_is_not_an_alarm() {
        let mut w = MemWatch::default();
        assert_eq!(w.observe(0.0, 800 * MIB, TOTAL, RESERVE), None);
        assert_eq!(w.observe(0.1, 700 * MIB, TOTAL, RESERVE), None);
        // Back up: no fall over the span.
        assert_eq!(w.observe(0.2, 800 * MIB, TOTAL, RESERVE), None);
        assert_eq!(w.observe(0.3, 800 * MIB, TOTAL, RESERVE), None);
    }

    #[test]
    fn meminfo() {
        let text = "MemTotal:        1000 kB\nMemFree:  10 kB\nMemAvailable:     512 kB\n";
        assert_eq!(parse_meminfo(text), Some((512 * 1024, 1000 * 1024)));
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
    }
}
