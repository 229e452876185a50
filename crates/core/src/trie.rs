//! The subscription index: a trie over topic levels, with `+` and `#` children kept apart from
//! literal ones so a lookup touches only the branches that can match. Shared subscriptions
//! (`$share/<group>/<filter>`) hang off the same nodes as groups that hand each message to one
//! member in turn.

use crate::hash::HashMap;
use ferry_codec::SubOptions;

/// Identifies a session in the broker; a new session (clean start) gets a new id, so a stale
/// entry can never be confused with its successor.
pub type SessionId = u64;

/// What a session asked for when it subscribed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Subscription {
    pub options: SubOptions,
    /// The MQTT 5 subscription identifier, if the SUBSCRIBE carried one.
    pub id: Option<u32>,
}

/// One subscriber a topic reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Match {
    pub session: SessionId,
    pub sub: Subscription,
    /// Chosen from a shared-subscription group (no-local does not apply, retain flag is cleared).
    pub shared: bool,
}

#[derive(Default, Debug)]
struct Node {
    children: HashMap<Box<str>, Node>,
    plus: Option<Box<Node>>,
    /// Subscribers of `<this node's path>/#` (at the root: `#`).
    hash: Option<Box<Leaf>>,
    /// Subscribers whose filter ends exactly here.
    leaf: Option<Box<Leaf>>,
}

#[derive(Default, Debug)]
struct Leaf {
    /// Sorted by session.
    subs: Vec<(SessionId, Subscription)>,
    shared: Vec<SharedGroup>,
}

#[derive(Debug)]
struct SharedGroup {
    name: Box<str>,
    members: Vec<(SessionId, Subscription)>,
    next: usize,
}

impl Leaf {
    fn is_empty(&self) -> bool {
        self.subs.is_empty() && self.shared.is_empty()
    }
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.hash.is_none()
            && self.leaf.is_none()
    }
}

/// The subscription trie. Not thread-safe by itself: the broker owns it.
#[derive(Default, Debug)]
pub struct SubscriptionTree {
    root: Node,
    len: usize,
}

impl SubscriptionTree {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of subscriptions (shared members included).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds or replaces `session`'s subscription to `filter` (already validated). Returns whether
    /// it is new.
    pub fn insert(
        &mut self,
        filter: &str,
        share_group: Option<&str>,
        session: SessionId,
        sub: Subscription,
    ) -> bool {
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        let mut slot = None;
        while let Some(level) = levels.next() {
            if level == "#" {
                slot = Some(&mut node.hash);
                break;
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Default::default)
            } else {
                node.children.entry(level.into()).or_default()
            };
            if levels.peek().is_none() {
                slot = Some(&mut node.leaf);
            }
        }
        let leaf = slot
            .expect("a filter has at least one level")
            .get_or_insert_with(Default::default);
        let list = match share_group {
            None => {
                // Kept sorted by session: a topic matching one filter yields its subscribers
                // already in the order the broker merges them in (no sort per message).
                let added = match leaf.subs.binary_search_by_key(&session, |(s, _)| *s) {
                    Ok(i) => {
                        leaf.subs[i].1 = sub;
                        false
                    }
                    Err(i) => {
                        leaf.subs.insert(i, (session, sub));
                        true
                    }
                };
                self.len += usize::from(added);
                return added;
            }
            Some(name) => {
                let pos = match leaf.shared.iter().position(|g| &*g.name == name) {
                    Some(p) => p,
                    None => {
                        leaf.shared.push(SharedGroup {
                            name: name.into(),
                            members: Vec::new(),
                            next: 0,
                        });
                        leaf.shared.len() - 1
                    }
                };
                &mut leaf.shared[pos].members
            }
        };
        match list.iter_mut().find(|(s, _)| *s == session) {
            Some(existing) => {
                existing.1 = sub;
                false
            }
            None => {
                list.push((session, sub));
                self.len += 1;
                true
            }
        }
    }

    /// Removes `session`'s subscription to `filter`. Returns whether it existed.
    pub fn remove(&mut self, filter: &str, share_group: Option<&str>, session: SessionId) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = remove_in(&mut self.root, &levels, share_group, session);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Appends every subscription matching `topic` to `out`. For each shared group one member is
    /// picked, round-robin, preferring members for which `available` is true.
    pub fn matches(
        &mut self,
        topic: &str,
        available: &dyn Fn(SessionId) -> bool,
        out: &mut Vec<Match>,
    ) {
        let dollar = topic.starts_with('$');
        walk(&mut self.root, Levels(Some(topic)), dollar, available, out);
    }
}

/// The levels of a topic name, like `topic.split('/')` at a fraction of its cost per level
/// (topics are short; this is on every publish's path).
#[derive(Clone)]
struct Levels<'a>(Option<&'a str>);

impl<'a> Iterator for Levels<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let rest = self.0?;
        match rest.bytes().position(|b| b == b'/') {
            Some(i) => {
                self.0 = Some(&rest[i + 1..]);
                Some(&rest[..i])
            }
            None => {
                self.0 = None;
                Some(rest)
            }
        }
    }
}

fn collect(leaf: &mut Leaf, available: &dyn Fn(SessionId) -> bool, out: &mut Vec<Match>) {
    out.extend(leaf.subs.iter().map(|&(session, sub)| Match {
        session,
        sub,
        shared: false,
    }));
    for group in &mut leaf.shared {
        let n = group.members.len();
        if n == 0 {
            continue;
        }
        let start = group.next % n;
        let pick = (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| available(group.members[i].0))
            .unwrap_or(start);
        group.next = pick + 1;
        let (session, sub) = group.members[pick];
        out.push(Match {
            session,
            sub,
            shared: true,
        });
    }
}

fn walk(
    node: &mut Node,
    mut levels: Levels<'_>,
    root_dollar: bool,
    available: &dyn Fn(SessionId) -> bool,
    out: &mut Vec<Match>,
) {
    match levels.next() {
        None => {
            if let Some(leaf) = node.leaf.as_deref_mut() {
                collect(leaf, available, out);
            }
            // `a/#` also matches `a` itself.
            if let Some(leaf) = node.hash.as_deref_mut() {
                collect(leaf, available, out);
            }
        }
        Some(level) => {
            if !root_dollar {
                if let Some(leaf) = node.hash.as_deref_mut() {
                    collect(leaf, available, out);
                }
            }
            if let Some(child) = node.children.get_mut(level) {
                walk(child, levels.clone(), false, available, out);
            }
            if !root_dollar {
                if let Some(plus) = node.plus.as_deref_mut() {
                    walk(plus, levels, false, available, out);
                }
            }
        }
    }
}

fn remove_from(list: &mut Vec<(SessionId, Subscription)>, session: SessionId) -> bool {
    match list.iter().position(|(s, _)| *s == session) {
        Some(p) => {
            list.remove(p);
            true
        }
        None => false,
    }
}

fn remove_leaf(
    slot: &mut Option<Box<Leaf>>,
    share_group: Option<&str>,
    session: SessionId,
) -> bool {
    let Some(leaf) = slot.as_deref_mut() else {
        return false;
    };
    let removed = match share_group {
        None => match leaf.subs.binary_search_by_key(&session, |(s, _)| *s) {
            Ok(i) => {
                leaf.subs.remove(i);
                true
            }
            Err(_) => false,
        },
        Some(name) => match leaf.shared.iter().position(|g| &*g.name == name) {
            Some(p) => {
                let removed = remove_from(&mut leaf.shared[p].members, session);
                if leaf.shared[p].members.is_empty() {
                    leaf.shared.remove(p);
                }
                removed
            }
            None => false,
        },
    };
    if leaf.is_empty() {
        *slot = None;
    }
    removed
}

fn remove_in(
    node: &mut Node,
    levels: &[&str],
    share_group: Option<&str>,
    session: SessionId,
) -> bool {
    let (level, rest) = levels.split_first().expect("non-empty");
    if *level == "#" {
        return remove_leaf(&mut node.hash, share_group, session);
    }
    let removed;
    if *level == "+" {
        let Some(child) = node.plus.as_deref_mut() else {
            return false;
        };
        removed = if rest.is_empty() {
            remove_leaf(&mut child.leaf, share_group, session)
        } else {
            remove_in(child, rest, share_group, session)
        };
        if child.is_empty() {
            node.plus = None;
        }
    } else {
        let Some(child) = node.children.get_mut(*level) else {
            return false;
        };
        removed = if rest.is_empty() {
            remove_leaf(&mut child.leaf, share_group, session)
        } else {
            remove_in(child, rest, share_group, session)
        };
        if child.is_empty() {
            node.children.remove(*level);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic;
    use proptest::prelude::*;

    fn sub() -> Subscription {
        Subscription::default()
    }

    fn sessions(tree: &mut SubscriptionTree, topic: &str) -> Vec<SessionId> {
        let mut out = Vec::new();
        tree.matches(topic, &|_| true, &mut out);
        let mut ids: Vec<_> = out.iter().map(|m| m.session).collect();
        ids.sort();
        ids
    }

    #[test]
    fn wildcards_and_dollar_topics() {
        let mut t = SubscriptionTree::new();
        t.insert("a/b", None, 1, sub());
        t.insert("a/+", None, 2, sub());
        t.insert("a/#", None, 3, sub());
        t.insert("#", None, 4, sub());
        t.insert("+/b", None, 5, sub());
        t.insert("$SYS/#", None, 6, sub());
        assert_eq!(sessions(&mut t, "a/b"), vec![1, 2, 3, 4, 5]);
        assert_eq!(sessions(&mut t, "a"), vec![3, 4]);
        assert_eq!(sessions(&mut t, "a/b/c"), vec![3, 4]);
        assert_eq!(sessions(&mut t, "$SYS/b"), vec![6]);
        assert_eq!(t.len(), 6);
    }

    #[test]
    fn replace_and_remove_prunes() {
        let mut t = SubscriptionTree::new();
        assert!(t.insert("a/+/c", None, 1, sub()));
        assert!(!t.insert("a/+/c", None, 1, sub()));
        assert!(t.remove("a/+/c", None, 1));
        assert!(!t.remove("a/+/c", None, 1));
        assert!(t.root.is_empty());
        assert!(t.is_empty());
    }

    #[test]
    fn levels_split_like_str_split() {
        for topic in [
            "a",
            "a/b",
            "/",
            "//",
            "a//b/",
            "/a",
            "",
            "ä/ö/$x",
            "a/b/c/d/e",
        ] {
            let ours: Vec<&str> = Levels(Some(topic)).collect();
            let std: Vec<&str> = topic.split('/').collect();
            assert_eq!(ours, std, "{topic:?}");
        }
    }

    #[test]
    fn one_filter_yields_its_subscribers_sorted_by_session() {
        let mut t = SubscriptionTree::new();
        // Subscribed out of session order (clients connect and subscribe concurrently).
        let order = [7u64, 3, 9, 1, 8, 2, 6, 4, 5];
        for s in order {
            assert!(t.insert("f/+", None, s, sub()));
        }
        assert!(!t.insert("f/+", None, 6, sub()), "a replacement is not new");
        assert!(t.remove("f/+", None, 4));
        assert!(!t.remove("f/+", None, 4));
        let mut out = Vec::new();
        t.matches("f/x", &|_| true, &mut out);
        let ids: Vec<_> = out.iter().map(|m| m.session).collect();
        assert_eq!(ids, vec![1, 2, 3, 5, 6, 7, 8, 9]);
        assert_eq!(t.len(), 8);
    }

    #[test]
    fn shared_groups_round_robin() {
        let mut t = SubscriptionTree::new();
        t.insert("x/#", Some("g"), 1, sub());
        t.insert("x/#", Some("g"), 2, sub());
        t.insert("x/#", Some("h"), 3, sub());
        let mut picks = Vec::new();
        for _ in 0..4 {
            let mut out = Vec::new();
            t.matches("x/y", &|_| true, &mut out);
            assert_eq!(out.len(), 2);
            assert!(out.iter().all(|m| m.shared));
            picks.push(out.iter().find(|m| m.session != 3).unwrap().session);
        }
        assert_eq!(picks, vec![1, 2, 1, 2]);
        // An unavailable member is skipped.
        let mut out = Vec::new();
        t.matches("x/y", &|s| s != 1, &mut out);
        assert!(out.iter().any(|m| m.session == 2));
        assert!(t.remove("x/#", Some("g"), 1));
        assert!(t.remove("x/#", Some("g"), 2));
        assert!(t.remove("x/#", Some("h"), 3));
        assert!(t.root.is_empty());
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("".to_string()),
            Just("$x".to_string())
        ]
    }

    fn filter_level() -> impl Strategy<Value = String> {
        prop_oneof![level(), Just("+".to_string())]
    }

    proptest! {
        /// The trie agrees with the naive matcher on every (filter, topic) pair.
        #[test]
        fn agrees_with_naive_matcher(
            filters in prop::collection::vec((prop::collection::vec(filter_level(), 1..4), any::<bool>()), 1..12),
            topics in prop::collection::vec(prop::collection::vec(level(), 1..5), 1..12),
        ) {
            let filters: Vec<String> = filters.into_iter().map(|(mut l, hash)| {
                if hash { l.push("#".into()); }
                l.join("/")
            }).collect();
            let mut t = SubscriptionTree::new();
            for (i, f) in filters.iter().enumerate() {
                t.insert(f, None, i as u64, sub());
            }
            for topic in topics.iter().map(|l| l.join("/")) {
                let expected: Vec<u64> = filters.iter().enumerate()
                    .filter(|(_, f)| topic::matches(f, &topic))
                    .map(|(i, _)| i as u64).collect();
                prop_assert_eq!(sessions(&mut t, &topic), expected, "topic {:?}", topic);
            }
            for (i, f) in filters.iter().enumerate() {
                prop_assert!(t.remove(f, None, i as u64));
            }
            prop_assert!(t.root.is_empty());
        }
    }
}
