//! Counting what handlers saw, per (topic, aggregate).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const SHARDS: usize = 64;

#[derive(Default)]
struct KeyState {
    /// The highest version seen.
    last: u64,
    /// The version recorded most recently: below `last` while a replay runs.
    cursor: u64,
    /// Versions below `last` not seen yet (only when versions were skipped). Boxed so that
    /// the common case, nothing missing, costs one word per aggregate, not three.
    #[allow(clippy::box_collection)]
    missing: Option<Box<BTreeSet<u64>>>,
}

/// One (topic, aggregate) pair and what was seen of it.
struct Entry {
    topic: Arc<str>,
    aggregate: Box<str>,
    state: KeyState,
}

impl Entry {
    fn is(&self, topic: &str, aggregate: &str) -> bool {
        &*self.aggregate == aggregate && &*self.topic == topic
    }
}

/// Passes a hash already taken through unchanged.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {
        unreachable!("only hashes of (topic, aggregate) pairs are keys")
    }
    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}

/// The pairs of one shard, keyed by the hash of (topic, aggregate) taken once per record
/// (it picks the shard too). Pairs whose hash another pair already holds (a 64-bit collision:
/// possible, never expected) wait in `collided`, looked through one by one.
#[derive(Default)]
struct Shard {
    pairs: HashMap<u64, Entry, BuildHasherDefault<Prehashed>>,
    collided: Vec<Entry>,
    /// Events recorded of this shard's pairs: counted under its lock rather than in one
    /// counter every recording thread writes.
    handled: u64,
}

impl Shard {
    fn get(&self, hash: u64, topic: &str, aggregate: &str) -> Option<&Entry> {
        match self.pairs.get(&hash) {
            Some(entry) if entry.is(topic, aggregate) => Some(entry),
            Some(_) => self.collided.iter().find(|e| e.is(topic, aggregate)),
            None => None,
        }
    }

    /// The state of (topic, aggregate), made empty if it is new (`intern` gives the topic's
    /// name, shared among its pairs).
    fn state(
        &mut self,
        hash: u64,
        topic: &str,
        aggregate: &str,
        intern: &dyn Fn(&str) -> Arc<str>,
    ) -> &mut KeyState {
        let new = || Entry {
            topic: intern(topic),
            aggregate: aggregate.into(),
            state: KeyState::default(),
        };
        let entry = self.pairs.entry(hash).or_insert_with(new);
        if entry.is(topic, aggregate) {
            return &mut entry.state;
        }
        let at = match self.collided.iter().position(|e| e.is(topic, aggregate)) {
            Some(at) => at,
            None => {
                self.collided.push(new());
                self.collided.len() - 1
            }
        };
        &mut self.collided[at].state
    }

    fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.pairs.values().chain(&self.collided)
    }
}

/// Records `(topic, aggregate, version)` as events are handled and classifies each one.
///
/// Versions of an aggregate are expected to start at 1 and arrive as 1, 2, 3, ... . A version
///
/// * equal to the last one plus 1 is in order;
/// * greater than that skips versions, which are remembered as missing;
/// * that was missing and arrives late is an **order violation** (it was overtaken);
/// * that was already seen is a **duplicate**.
///
/// Missing versions that never arrive are **gaps** (losses).
///
/// Replays are judged too. An aggregate may go back to a version already seen (a successor
/// replays what its predecessor handled but never acknowledged) only to run forward from there,
/// one version after another, up to the highest seen, before anything new: a **broken replay**
/// is a jump forward while a replay is still below the highest version (an old event handled
/// again after newer ones, then the replay skipping ahead, or a hole inside the replay).
/// `[1, 2, 3, 4, 2, 3, 4, 5]` is a clean replay; `[1, 2, 3, 4, 2, 5]` is a broken one.
/// Records from several processes are judged in the order given, so record a dead process's
/// log before its successor's. Thread-safe; recording hashes the pair once, for its shard and
/// its place there, and takes that shard's lock.
///
/// ```
/// use bus_testkit::SequenceVerifier;
/// let v = SequenceVerifier::new();
/// for version in [1, 3, 2, 3] {
///     v.record("orders", "a", version);
/// }
/// let report = v.report();
/// assert_eq!((report.order_violations, report.duplicates, report.gaps), (1, 1, 0));
/// ```
pub struct SequenceVerifier {
    shards: Box<[Mutex<Shard>]>,
    /// Every topic's name, shared by its pairs.
    topics: Mutex<Vec<Arc<str>>>,
    hasher: ahash::RandomState,
    order_violations: AtomicU64,
    duplicates: AtomicU64,
    replays: AtomicU64,
    broken_replays: AtomicU64,
}

impl fmt::Debug for SequenceVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SequenceVerifier")
            .field("report", &self.report())
            .finish()
    }
}

impl Default for SequenceVerifier {
    fn default() -> Self {
        Self::new()
    }
}

/// A summary of what a [`SequenceVerifier`] saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifierReport {
    /// Events recorded.
    pub handled: u64,
    /// Distinct (topic, aggregate) pairs.
    pub aggregates: u64,
    /// Versions that arrived after a later version of the same aggregate.
    pub order_violations: u64,
    /// Versions that arrived more than once.
    pub duplicates: u64,
    /// Versions below an aggregate's highest one that never arrived.
    pub gaps: u64,
    /// Distinct versions seen (`handled − duplicates`).
    pub unique: u64,
    /// Times an aggregate went back to a version already seen (a replay began).
    pub replays: u64,
    /// Times an aggregate jumped forward while a replay was below its highest version.
    pub broken_replays: u64,
}

impl VerifierReport {
    /// Events lost if `expected` distinct events were published: gaps inside aggregates and
    /// missing tails together.
    pub fn lost(&self, expected: u64) -> u64 {
        expected.saturating_sub(self.unique)
    }

    /// Panics with the report unless nothing was out of order, duplicated or lost.
    pub fn assert_exact(&self, expected: u64) {
        assert!(
            self.order_violations == 0
                && self.broken_replays == 0
                && self.duplicates == 0
                && self.gaps == 0
                && self.lost(expected) == 0
                && self.handled == expected,
            "expected exactly {expected} events in order, got {self:?}"
        );
    }
}

impl SequenceVerifier {
    /// An empty verifier.
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            topics: Mutex::default(),
            hasher: ahash::RandomState::new(),
            order_violations: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            replays: AtomicU64::new(0),
            broken_replays: AtomicU64::new(0),
        }
    }

    /// The pair's hash and its shard. The shard is taken from bits the shard's own table does
    /// not use to place or tell apart its entries (the lowest and the highest).
    fn shard_of(&self, topic: &str, aggregate: &str) -> (u64, &Mutex<Shard>) {
        let hash = self.hasher.hash_one((topic, aggregate));
        (hash, &self.shards[(hash >> 32) as usize % SHARDS])
    }

    /// `topic`'s name, shared with the pairs of the topic recorded before.
    fn intern(&self, topic: &str) -> Arc<str> {
        let mut topics = self.topics.lock().unwrap();
        if let Some(known) = topics.iter().find(|t| &***t == topic) {
            return known.clone();
        }
        let name: Arc<str> = topic.into();
        topics.push(name.clone());
        name
    }

    /// Records that version `version` of `aggregate` on `topic` was handled.
    pub fn record(&self, topic: &str, aggregate: &str, version: u64) {
        let (hash, shard) = self.shard_of(topic, aggregate);
        let mut shard = shard.lock().unwrap();
        shard.handled += 1;
        let state = shard.state(hash, topic, aggregate, &|t| self.intern(t));
        if version <= state.cursor {
            self.replays.fetch_add(1, Ordering::Relaxed);
        } else if version > state.cursor + 1 && state.cursor < state.last {
            self.broken_replays.fetch_add(1, Ordering::Relaxed);
        }
        state.cursor = version;
        if version == state.last + 1 {
            state.last = version;
        } else if version > state.last {
            state
                .missing
                .get_or_insert_with(Default::default)
                .extend(state.last + 1..version);
            state.last = version;
        } else if state
            .missing
            .as_mut()
            .is_some_and(|missing| missing.remove(&version))
        {
            self.order_violations.fetch_add(1, Ordering::Relaxed);
        } else {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The highest version seen of `aggregate` on `topic` (0 if none).
    pub fn last_version(&self, topic: &str, aggregate: &str) -> u64 {
        let (hash, shard) = self.shard_of(topic, aggregate);
        let shard = shard.lock().unwrap();
        shard
            .get(hash, topic, aggregate)
            .map_or(0, |e| e.state.last)
    }

    /// Events recorded so far.
    pub fn handled(&self) -> u64 {
        self.shards.iter().map(|s| s.lock().unwrap().handled).sum()
    }

    /// A summary of everything recorded so far.
    pub fn report(&self) -> VerifierReport {
        let mut aggregates = 0;
        let mut gaps = 0;
        let mut handled = 0;
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap();
            handled += shard.handled;
            for entry in shard.entries() {
                aggregates += 1;
                gaps += entry.state.missing.as_ref().map_or(0, |m| m.len() as u64);
            }
        }
        let duplicates = self.duplicates.load(Ordering::Relaxed);
        VerifierReport {
            handled,
            aggregates,
            order_violations: self.order_violations.load(Ordering::Relaxed),
            duplicates,
            gaps,
            // Saturating: events recorded while the shards were read may add duplicates.
            unique: handled.saturating_sub(duplicates),
            replays: self.replays.load(Ordering::Relaxed),
            broken_replays: self.broken_replays.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn in_order_is_clean() {
        let v = SequenceVerifier::new();
        for a in ["x", "y"] {
            for n in 1..=100 {
                v.record("t", a, n);
            }
        }
        let r = v.report();
        r.assert_exact(200);
        assert_eq!(r.aggregates, 2);
    }

    #[test]
    fn topics_are_separate() {
        let v = SequenceVerifier::new();
        v.record("t1", "a", 1);
        v.record("t2", "a", 1);
        assert_eq!(v.report().duplicates, 0);
        assert_eq!(v.report().aggregates, 2);
    }

    #[test]
    fn loss_is_a_gap_and_a_missing_tail_is_lost() {
        let v = SequenceVerifier::new();
        for n in [1, 2, 4] {
            v.record("t", "a", n);
        }
        let r = v.report();
        assert_eq!(r.gaps, 1);
        assert_eq!(r.order_violations, 0);
        assert_eq!(r.lost(5), 2);
    }

    #[test]
    fn replay_after_crash_counts_duplicates_not_violations() {
        let v = SequenceVerifier::new();
        for n in [1, 2, 3, 4, 2, 3, 4, 5] {
            v.record("t", "a", n);
        }
        let r = v.report();
        assert_eq!(
            (r.order_violations, r.duplicates, r.gaps, r.unique),
            (0, 3, 0, 5)
        );
        assert_eq!((r.replays, r.broken_replays), (1, 0));
    }

    #[test]
    fn an_old_event_replayed_after_newer_ones_is_a_broken_replay() {
        // Handled 30..=52, then a successor handles 30 again and goes on at 53.
        let v = SequenceVerifier::new();
        for n in (1..=52).chain([30, 53, 54]) {
            v.record("t", "a", n);
        }
        let r = v.report();
        assert_eq!((r.order_violations, r.gaps, r.duplicates), (0, 0, 1));
        assert_eq!((r.replays, r.broken_replays), (1, 1));
        // A hole inside a replay is broken too; replays within replays are not.
        let v = SequenceVerifier::new();
        for n in [1, 2, 3, 4, 5, 2, 4, 5, 6] {
            v.record("t", "b", n);
        }
        assert_eq!(v.report().broken_replays, 1);
        let v = SequenceVerifier::new();
        for n in [1, 2, 3, 4, 5, 2, 3, 1, 2, 3, 4, 5, 6] {
            v.record("t", "c", n);
        }
        let r = v.report();
        assert_eq!((r.replays, r.broken_replays, r.gaps), (2, 0, 0));
    }

    /// Two pairs with one hash (a 64-bit collision, forced here) are kept and judged apart.
    #[test]
    fn pairs_whose_hashes_collide_are_kept_apart() {
        let mut shard = Shard::default();
        let intern = |t: &str| Arc::<str>::from(t);
        shard.state(7, "t", "a", &intern).last = 3;
        shard.state(7, "t", "b", &intern).last = 5;
        shard.state(7, "u", "a", &intern).last = 9;
        assert_eq!(shard.state(7, "t", "a", &intern).last, 3);
        assert_eq!(shard.state(7, "u", "a", &intern).last, 9);
        assert_eq!(shard.get(7, "t", "b").map(|e| e.state.last), Some(5));
        assert!(shard.get(7, "u", "b").is_none());
        assert!(shard.get(8, "t", "a").is_none());
        assert_eq!((shard.entries().count(), shard.collided.len()), (3, 2));
    }

    #[test]
    fn the_pairs_of_a_topic_share_its_name() {
        let v = SequenceVerifier::new();
        for a in 0..100 {
            v.record("orders", &format!("a-{a}"), 1);
        }
        assert_eq!(v.last_version("orders", "a-7"), 1);
        assert_eq!(v.last_version("orders", "a-100"), 0);
        let topics = v.topics.lock().unwrap();
        assert_eq!(topics.len(), 1);
        // The list's reference and one per pair.
        assert_eq!(Arc::strong_count(&topics[0]), 101);
    }

    proptest! {
        /// Any permutation of 1..=n is counted exactly: every late arrival is a violation,
        /// nothing is a duplicate, and nothing is lost.
        #[test]
        fn permutations_are_classified(perm in Just((1..=40u64).collect::<Vec<_>>()).prop_shuffle()) {
            let v = SequenceVerifier::new();
            for n in &perm {
                v.record("t", "k", *n);
            }
            // A version is late exactly when some bigger version came before it.
            let mut max = 0;
            let mut late = 0;
            for n in &perm {
                if *n < max { late += 1 } else { max = *n }
            }
            let r = v.report();
            prop_assert_eq!(r.order_violations, late);
            prop_assert_eq!(r.duplicates, 0);
            prop_assert_eq!(r.gaps, 0);
            prop_assert_eq!(r.lost(40), 0);
        }
    }
}
