//! `Store::space_freed_by_deleting` says exactly what deleting a set of checkpoints gives back:
//! random writes, checkpoints and clones, then a random set deleted one by one; the bytes the
//! deletions report freeing add up to the prediction, which can exceed the sum of the
//! checkpoints' own unique figures.
#![allow(missing_docs)]

mod common;

use cairn_engine::device::PowerSupply;
use cairn_engine::Store;
use common::BS;
use proptest::prelude::*;

const BLOCKS: u64 = 64;

#[derive(Debug, Clone)]
enum Step {
    /// Write `len` blocks at `at` with data tagged `tag`.
    Write {
        at: u64,
        len: u64,
        tag: u8,
    },
    Checkpoint,
    /// Clone the newest checkpoint (if any) and write into the clone.
    Clone {
        at: u64,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..BLOCKS, 1..8u64, any::<u8>()).prop_map(|(at, len, tag)| Step::Write { at, len, tag }),
        2 => Just(Step::Checkpoint),
        1 => (0..BLOCKS).prop_map(|at| Step::Clone { at }),
    ]
}

fn data(tag: u8, blocks: u64) -> Vec<u8> {
    vec![tag.max(1); (blocks * BS) as usize]
}

/// Deletes `names` one by one; returns the bytes of tree the deletions freed.
fn delete_all(s: &Store, names: &[String]) -> u64 {
    let mut freed = 0;
    for n in names {
        let mut last = 0;
        s.delete_checkpoint_with_progress("v", n, &mut |b| last = b)
            .expect("delete");
        freed += last;
    }
    freed
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn the_prediction_is_what_deleting_frees(
        steps in proptest::collection::vec(step(), 1..40),
        pick in proptest::collection::vec(any::<bool>(), 16),
    ) {
        let (_, _, s) = common::sim_store(PowerSupply::new());
        s.create_volume("v", BLOCKS * BS).expect("volume");
        let mut checkpoints: Vec<String> = Vec::new();
        let mut clones = 0;
        for st in steps {
            match st {
                Step::Write { at, len, tag } => {
                    let len = len.min(BLOCKS - at);
                    s.write("v", at * BS, &data(tag, len)).expect("write");
                }
                Step::Checkpoint => {
                    let name = format!("c{}", checkpoints.len());
                    s.create_checkpoint("v", &name, None).expect("checkpoint");
                    checkpoints.push(name);
                }
                Step::Clone { at } => {
                    if let Some(c) = checkpoints.last() {
                        let clone = format!("k{clones}");
                        clones += 1;
                        s.clone_checkpoint("v", c, &clone).expect("clone");
                        s.write(&clone, at * BS, &data(7, 1)).expect("write clone");
                    }
                }
            }
        }
        s.flush().expect("flush");
        let chosen: Vec<String> = checkpoints
            .iter()
            .zip(pick.iter().cycle())
            .filter(|(_, p)| **p)
            .map(|(c, _)| c.clone())
            .collect();
        let predicted = s.space_freed_by_deleting("v", &chosen).expect("predict");
        let own: u64 = s
            .space(Some("v"))
            .expect("space")
            .volumes[0]
            .checkpoints
            .iter()
            .filter(|c| chosen.contains(&c.name))
            .map(|c| c.unique)
            .sum();
        prop_assert!(predicted >= own, "together {predicted} < each alone {own}");
        prop_assert_eq!(delete_all(&s, &chosen), predicted);
        let report = s.fsck().expect("fsck");
        prop_assert!(report.errors.is_empty(), "{:?}", report.errors);
    }
}

/// Two checkpoints that share blocks only with each other: each alone frees nothing of them,
/// both together free them.
#[test]
fn checkpoints_sharing_blocks_free_them_together() {
    let (_, _, s) = common::sim_store(PowerSupply::new());
    s.create_volume("v", BLOCKS * BS).expect("volume");
    s.write("v", 0, &data(1, 16)).expect("write");
    s.create_checkpoint("v", "a", None).expect("a");
    s.create_checkpoint("v", "b", None).expect("b");
    s.write("v", 0, &data(2, 16)).expect("overwrite");
    s.flush().expect("flush");
    let one = |n: &str| {
        s.space_freed_by_deleting("v", &[n.to_string()])
            .expect("predict")
    };
    let both = s
        .space_freed_by_deleting("v", &["a".into(), "b".into()])
        .expect("predict");
    assert!(
        one("a") < 16 * BS && one("b") < 16 * BS,
        "each alone frees little"
    );
    assert!(both >= 16 * BS, "together they free the 16 blocks: {both}");
    assert_eq!(delete_all(&s, &["a".into(), "b".into()]), both);
    let e = s
        .space_freed_by_deleting("v", &["nope".into()])
        .expect_err("unknown");
    assert!(e.to_string().contains("nope"), "{e}");
}
