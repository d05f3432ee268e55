//! Hybrid-logical-clock timestamps as the storage layer sees them: a pair
//! (wall nanoseconds, logical counter) ordered lexicographically.
//!
//! The clock that issues them lives above (kvserver); this module only defines
//! the value, its order and its neighbours.

use std::fmt;

/// An HLC timestamp. `Timestamp::ZERO` is below every real timestamp.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    pub wall: u64,
    pub logical: u32,
}

impl Timestamp {
    pub const ZERO: Timestamp = Timestamp { wall: 0, logical: 0 };
    pub const MAX: Timestamp = Timestamp {
        wall: u64::MAX,
        logical: u32::MAX,
    };

    pub const fn new(wall: u64, logical: u32) -> Self {
        Timestamp { wall, logical }
    }

    /// The smallest timestamp strictly above `self` (saturating at `MAX`).
    pub fn next(self) -> Self {
        if self.logical < u32::MAX {
            Timestamp::new(self.wall, self.logical + 1)
        } else if self.wall < u64::MAX {
            Timestamp::new(self.wall + 1, 0)
        } else {
            self
        }
    }

    /// The largest timestamp strictly below `self` (saturating at `ZERO`).
    pub fn prev(self) -> Self {
        if self.logical > 0 {
            Timestamp::new(self.wall, self.logical - 1)
        } else if self.wall > 0 {
            Timestamp::new(self.wall - 1, u32::MAX)
        } else {
            self
        }
    }

    pub fn is_zero(self) -> bool {
        self == Timestamp::ZERO
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:09},{}",
            self.wall / 1_000_000_000,
            self.wall % 1_000_000_000,
            self.logical
        )
    }
}

impl From<Timestamp> for proto::storage::Timestamp {
    fn from(t: Timestamp) -> Self {
        proto::storage::Timestamp {
            wall_nanos: t.wall,
            logical: t.logical,
        }
    }
}

impl From<proto::storage::Timestamp> for Timestamp {
    fn from(t: proto::storage::Timestamp) -> Self {
        Timestamp::new(t.wall_nanos, t.logical)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_and_prev_are_neighbours() {
        for t in [
            Timestamp::new(5, 0),
            Timestamp::new(5, 7),
            Timestamp::new(5, u32::MAX),
            Timestamp::new(0, 1),
        ] {
            assert!(t.next() > t);
            assert_eq!(t.next().prev(), t);
            assert!(t.prev() < t);
            assert_eq!(t.prev().next(), t);
        }
        assert_eq!(Timestamp::MAX.next(), Timestamp::MAX);
        assert_eq!(Timestamp::ZERO.prev(), Timestamp::ZERO);
        assert_eq!(Timestamp::new(1, u32::MAX).next(), Timestamp::new(2, 0));
    }
}
