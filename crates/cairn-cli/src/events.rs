//! `cairn events [-f]`: what the daemon's lifecycle did and why (checkpoints taken, pruned with
//! the bytes freed, skipped over a budget or the floor, backups done or failed).

use anyhow::{bail, Result};
use cairn_control::lifecycle::events::Event;
use cairn_control::lifecycle::{LifecycleOp, LifecycleReply};

use crate::backend::Backend;
use crate::output::outln;
use crate::time_str;

fn fetch(store: &Backend, after: u64, limit: usize) -> Result<Vec<Event>> {
    match crate::policy::call(store, LifecycleOp::Events { after, limit }, None)? {
        LifecycleReply::Events(e) => Ok(e),
        other => bail!("unexpected reply {other:?}"),
    }
}

fn print(e: &Event, json: bool) -> Result<()> {
    if json {
        outln!("{}", serde_json::to_string(e)?);
        return Ok(());
    }
    let kind = serde_json::to_value(e.kind)?;
    outln!(
        "{}  {:<13} {}",
        time_str(e.time_ms),
        kind.as_str().unwrap_or_default(),
        e.message
    );
    Ok(())
}

/// Prints the newest `limit` events; with `follow`, then each new one as it lands (polled every
/// second) until interrupted. With `json`, a JSON array, or one object per line when following.
pub fn run(store: &Backend, limit: usize, follow: bool, json: bool) -> Result<()> {
    let events = fetch(store, 0, limit)?;
    if json && !follow {
        return crate::print_json(&events);
    }
    if events.is_empty() && !follow && !json {
        outln!("no events yet: the daemon (`cairn serve`) records what its policies do");
    }
    let mut last = 0;
    for e in &events {
        print(e, json)?;
        last = e.seq;
    }
    if !follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        for e in fetch(store, last, usize::MAX)? {
            print(&e, json)?;
            last = e.seq;
        }
    }
}
