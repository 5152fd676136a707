//! Extent maps: which parts of a virtual disk hold data, explicit zeros, or nothing.

use crate::backing::Backing;
use serde::Serialize;

/// What a range of the virtual disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtentState {
    /// Stored data (which may still happen to be zeros): must be read.
    Data,
    /// Reads as zeros because the format says so (a zero cluster, a ZERO block state).
    Zero,
    /// Nothing is stored anywhere in the chain: reads as zeros.
    Unallocated,
}

impl ExtentState {
    /// True for ranges that read as zeros without reading anything.
    pub fn reads_as_zero(self) -> bool {
        !matches!(self, ExtentState::Data)
    }
}

/// One contiguous range of the virtual disk with one state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub state: ExtentState,
}

impl Extent {
    /// First byte after the extent.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

/// Appends a range to an extent list, merging it with the last entry when it continues
/// it with the same state. Ranges must be pushed in increasing order; empty ones are
/// ignored.
pub fn push_extent(list: &mut Vec<Extent>, offset: u64, length: u64, state: ExtentState) {
    if length == 0 {
        return;
    }
    if let Some(last) = list.last_mut()
        && last.state == state
        && last.end() == offset
    {
        last.length += length;
        return;
    }
    list.push(Extent {
        offset,
        length,
        state,
    });
}

/// Checks a `map(offset, length)` request against the virtual size and returns the
/// clamped end. Shared by every format so they all treat ranges alike.
pub fn map_range_end(offset: u64, length: u64, size: u64) -> crate::Result<u64> {
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok(end),
        _ => Err(crate::Error::OutOfRange {
            offset,
            len: length,
            size,
        }),
    }
}

/// Extents of `[offset, end)` of a disk whose virtual offsets are offsets in `file`
/// (raw, fixed VHD): the host file's data regions are `Data`, its holes
/// `Unallocated`. `end` must come from [`map_range_end`].
pub(crate) fn data_region_extents(
    file: &dyn Backing,
    offset: u64,
    end: u64,
) -> crate::Result<Vec<Extent>> {
    let mut out = Vec::new();
    let mut pos = offset;
    for (o, l) in file.data_regions(offset, end.saturating_sub(offset))? {
        let o = o.clamp(pos, end);
        let e = o.saturating_add(l).min(end);
        push_extent(&mut out, pos, o - pos, ExtentState::Unallocated);
        push_extent(&mut out, o, e.saturating_sub(o), ExtentState::Data);
        pos = e.max(pos);
    }
    push_extent(
        &mut out,
        pos,
        end.saturating_sub(pos),
        ExtentState::Unallocated,
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_merges_adjacent_same_state() {
        let mut v = Vec::new();
        push_extent(&mut v, 0, 10, ExtentState::Data);
        push_extent(&mut v, 10, 5, ExtentState::Data);
        push_extent(&mut v, 15, 0, ExtentState::Zero);
        push_extent(&mut v, 15, 5, ExtentState::Zero);
        push_extent(&mut v, 25, 5, ExtentState::Zero);
        assert_eq!(
            v,
            vec![
                Extent {
                    offset: 0,
                    length: 15,
                    state: ExtentState::Data
                },
                Extent {
                    offset: 15,
                    length: 5,
                    state: ExtentState::Zero
                },
                Extent {
                    offset: 25,
                    length: 5,
                    state: ExtentState::Zero
                },
            ]
        );
    }

    #[test]
    fn map_range_rejects_overflow() {
        assert!(map_range_end(u64::MAX, 2, 10).is_err());
        assert!(map_range_end(5, 6, 10).is_err());
        assert_eq!(map_range_end(5, 5, 10).unwrap(), 10);
    }
}
