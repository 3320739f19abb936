//! Checkpoint lists a page at a time. A page costs what it holds: a volume's page builds only its
//! own records, and a VM's only its own reports. The cursor a page hands back (`next`) is opaque
//! to clients: for a volume it is the last listed checkpoint's catalog id, which is never reused;
//! for a VM or group, the last one's creation time and name, the order those lists keep. Either
//! way a page boundary survives deletes and renames between calls.

use crate::error::{ErrorKind, OpError};

/// What a caller asked of a checkpoint list: everything, or a page.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Page<'a> {
    pub after: Option<&'a str>,
    pub limit: Option<u32>,
}

impl<'a> Page<'a> {
    pub fn new(after: &'a Option<String>, limit: Option<u32>) -> Result<Page<'a>, OpError> {
        if limit == Some(0) {
            return Err(OpError::new(
                ErrorKind::Invalid,
                "a page limit of 0 lists nothing: ask for at least 1 checkpoint, or leave the limit out for all",
            ));
        }
        Ok(Page {
            after: after.as_deref(),
            limit,
        })
    }

    /// The limit as a count (all when absent).
    pub fn limit(&self) -> usize {
        self.limit.map_or(usize::MAX, |l| l as usize)
    }

    /// The catalog id a volume's page continues after.
    pub fn after_id(&self) -> Result<Option<u64>, OpError> {
        self.after
            .map(|a| a.parse::<u64>().map_err(|_| bad_cursor(a)))
            .transpose()
    }

    /// The page of `items` (ordered by creation time, then name, as `key` gives them) and the
    /// cursor of the next page when more remain.
    pub fn of<T>(
        &self,
        mut items: Vec<T>,
        key: impl Fn(&T) -> (u64, &str),
    ) -> Result<(Vec<T>, Option<String>), OpError> {
        // Lists kept in the order they were made can still be out of it if the clock stepped
        // back; the cursor needs the order it compares by.
        items.sort_by(|a, b| key(a).cmp(&key(b)));
        let after = match self.after {
            None => None,
            Some(a) => {
                let (ms, name) = a.split_once('/').ok_or_else(|| bad_cursor(a))?;
                Some((ms.parse::<u64>().map_err(|_| bad_cursor(a))?, name))
            }
        };
        let mut rest: Vec<T> = match after {
            None => items,
            Some(after) => items.into_iter().filter(|t| key(t) > after).collect(),
        };
        let limit = self.limit();
        let next = (rest.len() > limit).then(|| {
            let (ms, name) = key(&rest[limit - 1]);
            format!("{ms}/{name}")
        });
        rest.truncate(limit);
        Ok((rest, next))
    }
}

fn bad_cursor(a: &str) -> OpError {
    OpError::new(
        ErrorKind::Invalid,
        format!("'{a}' is not a cursor of this checkpoint list: pass the `next` of the page before, or no cursor to start from the oldest"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items() -> Vec<(u64, String)> {
        vec![
            (1, "a".into()),
            (2, "b".into()),
            (2, "c".into()),
            (5, "a/b".into()),
        ]
    }

    fn page(after: Option<&str>, limit: Option<u32>) -> (Vec<(u64, String)>, Option<String>) {
        let after = after.map(String::from);
        Page::new(&after, limit)
            .expect("page")
            .of(items(), |t| (t.0, t.1.as_str()))
            .expect("of")
    }

    #[test]
    fn pages_follow_creation_order_and_names() {
        let (p1, next) = page(None, Some(2));
        assert_eq!(p1, items()[..2]);
        assert_eq!(next.as_deref(), Some("2/b"));
        let (p2, next) = page(next.as_deref(), Some(2));
        assert_eq!(p2, items()[2..]);
        assert_eq!(next, None);
        // A name with a slash in it still continues after itself.
        assert_eq!(page(Some("5/a/b"), None).0, []);
        assert_eq!(page(None, None).0, items());
    }

    #[test]
    fn a_bad_cursor_or_a_zero_limit_is_refused() {
        for bad in ["x", "1", "x/a"] {
            let after = Some(bad.to_string());
            let err = Page::new(&after, None)
                .expect("page")
                .of(items(), |t| (t.0, t.1.as_str()))
                .expect_err("refused");
            assert_eq!(err.kind, ErrorKind::Invalid, "{bad}");
        }
        let after = Some("x".to_string());
        assert!(Page::new(&after, None).expect("page").after_id().is_err());
        assert_eq!(
            Page::new(&None, Some(0)).expect_err("refused").kind,
            ErrorKind::Invalid
        );
    }
}
