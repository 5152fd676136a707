//! Conversions between the on-disk manifest types ([`crate::manifest`]) and the API's
//! view of them ([`protocol`]'s `Manifest`, `DiskRecord`, `Source`, `Consistency`,
//! `Stats`). They live here because this crate knows both and the orphan rule allows
//! `From` only here or in `protocol`, which stays a leaf. Field for field: the two
//! serialize to the same JSON (tested below).

use crate::manifest::{Consistency, DiskRecord, Manifest, Source, Stats};

/// `From` both ways between `$ty` and `protocol::$ty`, field by field: fields taken as
/// they are, fields converted with `into`, lists converted item by item. Each struct
/// literal names every field of its target, so a field added on one side only does
/// not compile.
macro_rules! both_ways {
    ($ty:ident { $($same:ident),* ; $($into:ident),* ; $($list:ident),* }) => {
        impl From<$ty> for protocol::$ty {
            fn from(v: $ty) -> Self {
                protocol::$ty {
                    $($same: v.$same,)*
                    $($into: v.$into.into(),)*
                    $($list: v.$list.into_iter().map(Into::into).collect(),)*
                }
            }
        }

        impl From<protocol::$ty> for $ty {
            fn from(v: protocol::$ty) -> Self {
                $ty {
                    $($same: v.$same,)*
                    $($into: v.$into.into(),)*
                    $($list: v.$list.into_iter().map(Into::into).collect(),)*
                }
            }
        }
    };
}

both_ways!(Source { name, id ; ; });
both_ways!(Stats {
    bytes_read, bytes_stored, bytes_new, blocks_new, blocks_dedup, blocks_reused,
    blocks_zero, changed_bytes ; ;
});
both_ways!(DiskRecord {
    index, name, format, virtual_size, logical_sector_size, physical_sector_size,
    block_size, piece_blocks, pieces, excluded ; stats ;
});
both_ways!(Manifest {
    format, version, id, created, created_unix, base ; source, consistency, stats ; disks
});

impl From<Consistency> for protocol::Consistency {
    fn from(c: Consistency) -> Self {
        match c {
            Consistency::ApplicationConsistent => protocol::Consistency::ApplicationConsistent,
            Consistency::FileConsistent => protocol::Consistency::FileConsistent,
            Consistency::CrashConsistent => protocol::Consistency::CrashConsistent,
        }
    }
}

impl From<protocol::Consistency> for Consistency {
    fn from(c: protocol::Consistency) -> Self {
        match c {
            protocol::Consistency::ApplicationConsistent => Consistency::ApplicationConsistent,
            protocol::Consistency::FileConsistent => Consistency::FileConsistent,
            protocol::Consistency::CrashConsistent => Consistency::CrashConsistent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(k: u64) -> Stats {
        Stats {
            bytes_read: k,
            bytes_stored: k + 1,
            bytes_new: k + 2,
            blocks_new: k + 3,
            blocks_dedup: k + 4,
            blocks_reused: k + 5,
            blocks_zero: k + 6,
            changed_bytes: k.is_multiple_of(2).then_some(k + 7),
        }
    }

    fn manifest() -> Manifest {
        let disk = |index: u32, excluded: Vec<(u64, u64)>| DiskRecord {
            index,
            name: format!("disk{index}.qcow2"),
            format: "qcow2".into(),
            virtual_size: 10 << 20,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            block_size: 65536,
            piece_blocks: 1024,
            pieces: vec!["ab".repeat(32), "cd".repeat(32)],
            stats: stats(index as u64 * 10),
            excluded,
        };
        Manifest {
            format: crate::manifest::MANIFEST_FORMAT.into(),
            version: crate::manifest::MANIFEST_VERSION,
            id: "vm-20261125T190405.000042Z".into(),
            source: Source {
                name: "host1/vm1".into(),
                id: "4f1c-uuid".into(),
            },
            created: "2026-11-25T19:04:05Z".into(),
            created_unix: 1_795_633_445,
            base: Some("vm-20261124T190405.000001Z".into()),
            consistency: Consistency::FileConsistent,
            disks: vec![disk(0, vec![]), disk(1, vec![(1 << 20, 4096)])],
            stats: stats(1),
        }
    }

    fn json<T: serde::Serialize>(v: &T) -> String {
        serde_json::to_string(v).expect("serializes")
    }

    #[test]
    fn the_api_view_serializes_as_the_manifest_both_ways() {
        let on_disk = manifest();
        let on_wire: protocol::Manifest = on_disk.clone().into();
        assert_eq!(json(&on_wire), json(&on_disk));
        let back: Manifest = on_wire.into();
        assert_eq!(json(&back), json(&on_disk));
        // And through JSON: each parses the other's bytes to the same bytes.
        let parsed: protocol::Manifest = serde_json::from_str(&json(&on_disk)).expect("parses");
        assert_eq!(json(&parsed), json(&on_disk));
        let parsed: Manifest = serde_json::from_str(&json(&parsed)).expect("parses");
        assert_eq!(json(&parsed), json(&on_disk));
        // Pretty printing (how manifests are written) agrees too.
        assert_eq!(
            serde_json::to_string_pretty(&protocol::Manifest::from(on_disk.clone())).unwrap(),
            serde_json::to_string_pretty(&on_disk).unwrap()
        );
    }

    #[test]
    fn every_consistency_has_the_same_name() {
        for c in [
            Consistency::ApplicationConsistent,
            Consistency::FileConsistent,
            Consistency::CrashConsistent,
        ] {
            let w = protocol::Consistency::from(c);
            assert_eq!(json(&w), json(&c));
            assert_eq!(Consistency::from(w), c);
        }
    }
}
