//! Listing a volume's checkpoints a page at a time: pages put together are the whole list, a page
//! boundary survives deletes and renames between calls, and one checkpoint is found by name.
#![allow(missing_docs)]

mod common;

use cairn_engine::device::PowerSupply;
use cairn_engine::Error;

fn names(list: &[cairn_engine::CheckpointInfo]) -> Vec<String> {
    list.iter().map(|c| c.name.clone()).collect()
}

#[test]
fn pages_put_together_are_the_whole_list() {
    let (_d, _j, s) = common::sim_store(PowerSupply::new());
    s.create_volume("v", 1 << 20).expect("create v");
    s.create_volume("w", 1 << 20).expect("create w");
    for i in 0..25 {
        s.create_checkpoint("v", &format!("c{i:02}"), None)
            .expect("checkpoint v");
        s.create_checkpoint("w", &format!("w{i:02}"), None)
            .expect("checkpoint w");
    }
    let all = s.list_checkpoints("v").expect("list");
    for limit in [1, 7, 10, 25, 26, 1000] {
        let (mut got, mut after) = (Vec::new(), None);
        let mut pages = 0;
        loop {
            let (page, next) = s.list_checkpoints_page("v", after, limit).expect("page");
            assert!(page.len() <= limit, "a page holds at most its limit");
            got.extend(page);
            pages += 1;
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(got, all, "limit {limit}: the pages are the list, in order");
        assert_eq!(
            pages,
            25usize.div_ceil(limit),
            "limit {limit}: no empty last page"
        );
    }
}

#[test]
fn a_page_boundary_survives_deletes_and_renames() {
    let (_d, _j, s) = common::sim_store(PowerSupply::new());
    s.create_volume("v", 1 << 20).expect("create v");
    for i in 0..6 {
        s.create_checkpoint("v", &format!("c{i}"), None)
            .expect("checkpoint");
    }
    let (first, next) = s.list_checkpoints_page("v", None, 3).expect("page 1");
    assert_eq!(names(&first), ["c0", "c1", "c2"]);
    // The last listed checkpoint goes, and a later one gets a name that sorts first.
    s.delete_checkpoint("v", "c2").expect("delete");
    s.rename_checkpoint("v", "c4", "a4").expect("rename");
    let (second, next) = s.list_checkpoints_page("v", next, 3).expect("page 2");
    assert_eq!(names(&second), ["c3", "a4", "c5"]);
    assert_eq!(next, None);
}

#[test]
fn one_checkpoint_by_name_and_unknown_names() {
    let (_d, _j, s) = common::sim_store(PowerSupply::new());
    s.create_volume("v", 1 << 20).expect("create v");
    s.create_checkpoint("v", "a", Some("first"))
        .expect("checkpoint");
    let a = s.checkpoint_info("v", "a").expect("info");
    assert_eq!(a.description.as_deref(), Some("first"));
    assert_eq!(vec![a], s.list_checkpoints("v").expect("list"));
    assert!(matches!(
        s.checkpoint_info("v", "nope"),
        Err(Error::UnknownCheckpoint { .. })
    ));
    assert!(matches!(
        s.list_checkpoints_page("nope", None, 10),
        Err(Error::UnknownVolume(_))
    ));
}
