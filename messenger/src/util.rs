//! Small helpers every crate shares: the splitmix64 mixer (ids, nonces, jitter, seeded test data) and
//! rounding a wait up to whole milliseconds.

use std::time::Duration;

/// splitmix64's increment (2^64 / golden ratio).
pub const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// The splitmix64 finaliser (Stafford's "Mix13"): a bijection on u64 in which every input bit flips every
/// output bit with probability close to 1/2.
pub const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The splitmix64 value that follows state `z`: `mix64(z + GOLDEN_GAMMA)`.
pub const fn splitmix64(z: u64) -> u64 {
    mix64(z.wrapping_add(GOLDEN_GAMMA))
}

/// A seeded splitmix64 generator: deterministic, not secret.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        mix64(self.0)
    }
}

/// A value that differs between processes and between calls close in time (clock, pid, a counter), mixed:
/// for nonces and instance ids, never for anything secret.
pub fn entropy() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    mix64(t ^ (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(GOLDEN_GAMMA))
}

/// Rounds a wait up to the next whole millisecond: polls and condvars wait in milliseconds, and rounding
/// down turns a 0.4 ms deadline into a busy loop (Ceph tracker 62512).
pub fn round_up_ms(d: Duration) -> Duration {
    let ms = d.as_nanos().div_ceil(1_000_000);
    Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // Vigna's splitmix64.c seeded with 0 starts 0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4.
        let mut g = SplitMix64(0);
        assert_eq!(g.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(g.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn round_up_ms_rounds_up() {
        assert_eq!(round_up_ms(Duration::ZERO), Duration::ZERO);
        assert_eq!(round_up_ms(Duration::from_micros(1)), Duration::from_millis(1));
        assert_eq!(round_up_ms(Duration::from_micros(1000)), Duration::from_millis(1));
        assert_eq!(round_up_ms(Duration::from_micros(1001)), Duration::from_millis(2));
        assert_eq!(round_up_ms(Duration::MAX), Duration::from_millis(u64::MAX));
    }

    #[test]
    fn entropy_differs_between_calls() {
        assert_ne!(entropy(), entropy());
    }
}
