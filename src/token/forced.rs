//! When an upstream 401 may force a token refresh. Pure state, no I/O and no clock reads (the
//! caller passes `now`), so the rules are unit tested without waiting.
//!
//! The rules:
//! - A 401 with a token older than the current one only needs the current one (no fetch).
//! - The first 401 with the current token asks for one new token; every other 401 with that token
//!   waits for the same fetch. The current token stays in use meanwhile.
//! - When the replay with a newer token is refused too, the 401 is not the token's doing (a path
//!   the credential may not use, a contract the API does not name in its body). A hold-off window
//!   opens: 1 min, doubling with every further window up to 1 h. Within it, 401s on the paths
//!   already seen that way are passed through without a fetch, and 401s on other paths may force
//!   at most one fetch (so that a real revocation is repaired at once, while a client walking
//!   many refused paths cannot turn 401s into token fetches). A window opened by that one fetch
//!   does not get a fetch of its own: a revocation that follows waits for the window's end or the
//!   scheduled refresh. That is the price of the bound (two fetches per window at most).
//! - A forced refresh whose replay is accepted resets the next window's length and gives the
//!   current window its one fetch back; the paths already seen stay known until the window ends.

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use tokio::time::Instant;

/// The first hold-off window.
pub const FIRST_HOLDOFF: Duration = Duration::from_secs(60);
/// The longest hold-off window.
pub const MAX_HOLDOFF: Duration = Duration::from_secs(3600);
/// Paths remembered within a window; beyond, the one-fetch-per-window rule alone applies.
const MAX_PATHS: usize = 256;

/// What a 401 with a given token calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A newer token than the refused one is current: replay with it.
    Newer,
    /// The first 401 with this token: have the refresher fetch a new one, and wait for it.
    Refresh,
    /// A new token was already asked for because of this token: wait for it.
    Join,
    /// Within a hold-off window: not the token's doing; pass the 401 through.
    PassThrough,
}

/// What the answer to a replay changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replayed {
    Nothing,
    /// A hold-off window of this length opened.
    HoldOff(Duration),
    /// A newer token fixed a 401: the next window is back to the first length.
    Reset,
}

#[derive(Debug)]
pub struct Forced {
    /// The newest generation a refresh was asked for.
    requested: u64,
    /// The end of the current hold-off window.
    until: Option<Instant>,
    /// The length of the next window.
    next: Duration,
    /// Paths whose 401 a newer token did not fix, within the window, kept as hashes: a path may
    /// be as long as a request head (64 KiB), and 256 of them would be 16 MiB.
    paths: HashSet<u64>,
    hasher: RandomState,
    /// Whether the window's one fetch for a path not yet seen was used.
    spent: bool,
    /// The newest replay generation that opened a window (concurrent replays open one).
    counted: u64,
}

impl Default for Forced {
    fn default() -> Self {
        Forced {
            requested: 0,
            until: None,
            next: FIRST_HOLDOFF,
            paths: HashSet::new(),
            hasher: RandomState::new(),
            spent: false,
            counted: 0,
        }
    }
}

impl Forced {
    /// A 401 on `path` with the token of generation `refused`, `current` being the current one.
    pub fn on_401(&mut self, refused: u64, current: u64, path: &str, now: Instant) -> Decision {
        if current > refused {
            return Decision::Newer;
        }
        if self.until.is_some_and(|u| now >= u) {
            self.until = None;
            self.paths.clear();
            self.spent = false;
        }
        let window = self.until.is_some();
        if window && self.paths.contains(&self.hasher.hash_one(path)) {
            return Decision::PassThrough;
        }
        if self.requested >= refused {
            return Decision::Join;
        }
        if window {
            if self.spent {
                return Decision::PassThrough;
            }
            self.spent = true;
        }
        self.requested = refused;
        Decision::Refresh
    }

    /// The replay on `path` with the newer token of generation `replayed` was answered 401
    /// (`unauthorized`) or otherwise.
    pub fn replayed(
        &mut self,
        replayed: u64,
        path: &str,
        unauthorized: bool,
        now: Instant,
    ) -> Replayed {
        if unauthorized {
            if self.paths.len() < MAX_PATHS {
                self.paths.insert(self.hasher.hash_one(path));
            }
            if self.counted >= replayed {
                return Replayed::Nothing;
            }
            self.counted = replayed;
            let window = self.next;
            self.until = now.checked_add(window);
            self.next = (window * 2).min(MAX_HOLDOFF);
            Replayed::HoldOff(window)
        } else if self.next != FIRST_HOLDOFF || self.spent {
            self.next = FIRST_HOLDOFF;
            self.spent = false;
            Replayed::Reset
        } else {
            Replayed::Nothing
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn concurrent_401s_with_one_token_cost_one_refresh() {
        let mut f = Forced::default();
        let t = Instant::now();
        assert_eq!(f.on_401(1, 1, "/a", t), Decision::Refresh);
        assert_eq!(f.on_401(1, 1, "/b", t), Decision::Join);
        assert_eq!(f.on_401(1, 1, "/a", t), Decision::Join);
        // The new token is out: stragglers with the old one just use it.
        assert_eq!(f.on_401(1, 2, "/a", t), Decision::Newer);
        assert_eq!(f.replayed(2, "/a", false, t), Replayed::Nothing);
        // A later revocation of the new token: one refresh again.
        assert_eq!(f.on_401(2, 2, "/a", t), Decision::Refresh);
    }

    #[test]
    fn a_refused_replay_opens_a_window_that_doubles_up_to_an_hour() {
        let mut f = Forced::default();
        let mut t = Instant::now();
        let mut generation = 1;
        let mut windows = Vec::new();
        for _ in 0..9 {
            assert_eq!(f.on_401(generation, generation, "/x", t), Decision::Refresh);
            generation += 1;
            match f.replayed(generation, "/x", true, t) {
                Replayed::HoldOff(w) => windows.push(w.as_secs() / 60),
                other => panic!("{other:?}"),
            }
            // Concurrent replays with the same token do not open another window.
            assert_eq!(f.replayed(generation, "/x", true, t), Replayed::Nothing);
            // Within the window the path's 401s cost nothing.
            assert_eq!(
                f.on_401(generation, generation, "/x", t),
                Decision::PassThrough
            );
            t += MIN * *windows.last().unwrap() as u32;
        }
        assert_eq!(windows, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn within_a_window_another_path_may_force_one_refresh() {
        let mut f = Forced::default();
        let t = Instant::now();
        assert_eq!(f.on_401(1, 1, "/denied", t), Decision::Refresh);
        assert_eq!(f.replayed(2, "/denied", true, t), Replayed::HoldOff(MIN));
        // A revocation shows on another path: repaired.
        assert_eq!(f.on_401(2, 2, "/ok", t), Decision::Refresh);
        assert_eq!(f.replayed(3, "/ok", false, t), Replayed::Reset);
        // The refused path is still known; another revocation is still repaired.
        assert_eq!(f.on_401(3, 3, "/denied", t), Decision::PassThrough);
        assert_eq!(f.on_401(3, 3, "/ok", t), Decision::Refresh);
        assert_eq!(f.replayed(4, "/ok", false, t), Replayed::Reset);
        // After the window, the refused path costs one fetch again, and the window length
        // starts over.
        let later = t + MIN;
        assert_eq!(f.on_401(4, 4, "/denied", later), Decision::Refresh);
        assert_eq!(
            f.replayed(5, "/denied", true, later),
            Replayed::HoldOff(MIN)
        );
    }

    #[test]
    fn many_refused_paths_cost_at_most_two_fetches_per_window() {
        let mut f = Forced::default();
        let t = Instant::now();
        assert_eq!(f.on_401(1, 1, "/d/0", t), Decision::Refresh);
        assert_eq!(f.replayed(2, "/d/0", true, t), Replayed::HoldOff(MIN));
        assert_eq!(f.on_401(2, 2, "/d/1", t), Decision::Refresh);
        assert_eq!(f.replayed(3, "/d/1", true, t), Replayed::HoldOff(2 * MIN));
        for i in 2..1000 {
            let path = format!("/d/{i}");
            assert_eq!(f.on_401(3, 3, &path, t), Decision::PassThrough, "{path}");
        }
        // After the window: one refresh, and the next window is longer.
        let later = t + 2 * MIN;
        assert_eq!(f.on_401(3, 3, "/d/5", later), Decision::Refresh);
        assert_eq!(
            f.replayed(4, "/d/5", true, later),
            Replayed::HoldOff(4 * MIN)
        );
    }
}
