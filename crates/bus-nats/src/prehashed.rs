//! Maps keyed by hashes already taken: a key is its own hash.

/// The hasher of a map keyed by hashes: a key is its own hash. For keys that are the output
/// of a seeded hasher already (hashing them again cost a second hash per lookup).
#[derive(Debug, Default)]
pub(crate) struct Prehashed(u64);

/// A map keyed by hashes.
pub(crate) type PrehashedMap<V> =
    std::collections::HashMap<u64, V, std::hash::BuildHasherDefault<Prehashed>>;

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }

    /// Not used by a `u64` key; mixes whatever else is written, in case.
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
}
