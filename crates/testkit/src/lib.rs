//! Helpers the tests of several crates share, so each test suite does not carry its
//! own copy: [`Rng`], a seeded generator for deterministic fixtures, and [`run`] /
//! [`qemu_img`], the external tools interop tests compare against, and [`Azurite`] /
//! [`Moto`], the storage servers the object-storage tests run against, and [`FaultProxy`],
//! which the fault tests put between a client and such a server, and [`browser::Browser`],
//! headless Chromium through chromedriver for the console's tests. Only ever a
//! dev-dependency; tests may panic here, that is how they fail.

pub mod browser;
mod proxy;
mod servers;

pub use proxy::{FaultProxy, ProxyCounts};
pub use servers::{AZURITE_ACCOUNT, AZURITE_KEY, Azurite, Moto};
use std::process::{Command, Output};

/// splitmix64: a small seeded generator, so fixtures are the same on every run and
/// need no extra crates.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// In `0..n` (0 when `n` is 0; the modulo bias does not matter for fixtures).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// Fills `buf` with the next values, little-endian.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }

    /// The next `n` bytes, as [`Rng::fill`] makes them.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.fill(&mut v);
        v
    }

    /// A seeded Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// Runs a tool, failing the test with a clear message when it is missing or fails.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {cmd} ({e}): scripts/install-deps installs the tools the tests use")
    });
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs qemu-img with `args` and returns its standard output.
pub fn qemu_img(args: &[&str]) -> String {
    String::from_utf8_lossy(&run("qemu-img", args).stdout).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_sequence_is_the_reference_one() {
        // splitmix64 seeded with 0: the reference implementation's first outputs.
        let mut r = Rng::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(Rng::new(5).below(0), 0);
        let mut v: Vec<u32> = (0..10).collect();
        Rng::new(1).shuffle(&mut v);
        v.sort_unstable();
        assert_eq!(v, (0..10).collect::<Vec<_>>());
    }
}
