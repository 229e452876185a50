//! Retained messages: the [`RetainedStore`] trait and an in-memory index over topic levels.
//!
//! A lookup walks only the branches a filter can reach, and branches without messages are
//! pruned on removal, so a wildcard lookup costs in proportion to what it returns rather than to
//! the number of retained messages.

use crate::hash::HashMap;
use crate::message::SharedMessage;
use std::time::Instant;

/// Where retained messages live. The broker calls it from one task; implementations may write
/// through to disk.
pub trait RetainedStore: Send {
    /// Stores `msg` as the retained message of its topic, replacing any earlier one.
    fn insert(&mut self, msg: SharedMessage);
    /// Clears the retained message of `topic`; returns whether there was one.
    fn remove(&mut self, topic: &str) -> bool;
    /// Appends the retained messages matching `filter` (valid, not shared) to `out`, skipping
    /// expired ones.
    fn matching(&self, filter: &str, now: Instant, out: &mut Vec<SharedMessage>);
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Default, Debug)]
struct Node {
    children: HashMap<Box<str>, Node>,
    message: Option<SharedMessage>,
}

/// The in-memory retained store.
#[derive(Default, Debug)]
pub struct MemoryRetained {
    root: Node,
    len: usize,
}

impl MemoryRetained {
    pub fn new() -> Self {
        Self::default()
    }
}

impl RetainedStore for MemoryRetained {
    fn insert(&mut self, msg: SharedMessage) {
        let mut node = &mut self.root;
        for level in msg.topic.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        if node.message.replace(msg).is_none() {
            self.len += 1;
        }
    }

    fn remove(&mut self, topic: &str) -> bool {
        let levels: Vec<&str> = topic.split('/').collect();
        let removed = remove_in(&mut self.root, &levels);
        if removed {
            self.len -= 1;
        }
        removed
    }

    fn matching(&self, filter: &str, now: Instant, out: &mut Vec<SharedMessage>) {
        let levels: Vec<&str> = filter.split('/').collect();
        collect(&self.root, &levels, true, now, out);
    }

    fn len(&self) -> usize {
        self.len
    }
}

fn remove_in(node: &mut Node, levels: &[&str]) -> bool {
    let Some((level, rest)) = levels.split_first() else {
        return node.message.take().is_some();
    };
    let Some(child) = node.children.get_mut(*level) else {
        return false;
    };
    let removed = remove_in(child, rest);
    if child.message.is_none() && child.children.is_empty() {
        node.children.remove(*level);
    }
    removed
}

fn push(node: &Node, now: Instant, out: &mut Vec<SharedMessage>) {
    if let Some(m) = &node.message {
        if !m.is_expired(now) {
            out.push(m.clone());
        }
    }
}

fn collect_all(node: &Node, now: Instant, out: &mut Vec<SharedMessage>) {
    push(node, now, out);
    for child in node.children.values() {
        collect_all(child, now, out);
    }
}

fn collect(node: &Node, levels: &[&str], root: bool, now: Instant, out: &mut Vec<SharedMessage>) {
    let Some((level, rest)) = levels.split_first() else {
        push(node, now, out);
        return;
    };
    match *level {
        "#" => {
            // `a/#` matches `a` too; at the root, `$` topics are not matched.
            if !root {
                push(node, now, out);
            }
            for (name, child) in &node.children {
                if !(root && name.starts_with('$')) {
                    collect_all(child, now, out);
                }
            }
        }
        "+" => {
            for (name, child) in &node.children {
                if !(root && name.starts_with('$')) {
                    collect(child, rest, false, now, out);
                }
            }
        }
        literal => {
            if let Some(child) = node.children.get(literal) {
                collect(child, rest, false, now, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use crate::topic;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn msg(topic: &str) -> SharedMessage {
        Arc::new(Message {
            topic: topic.into(),
            payload: bytes::Bytes::from_static(b"x"),
            qos: ferry_codec::QoS::AtMostOnce,
            retain: true,
            properties: Default::default(),
            expires_at: None,
            publisher: Default::default(),
        })
    }

    fn topics(store: &MemoryRetained, filter: &str) -> Vec<String> {
        let mut out = Vec::new();
        store.matching(filter, Instant::now(), &mut out);
        let mut v: Vec<String> = out.iter().map(|m| m.topic.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn lookups() {
        let mut s = MemoryRetained::new();
        for t in ["a", "a/b", "a/b/c", "x/b", "$SYS/up", "/lead"] {
            s.insert(msg(t));
        }
        assert_eq!(s.len(), 6);
        assert_eq!(topics(&s, "a/#"), vec!["a", "a/b", "a/b/c"]);
        assert_eq!(topics(&s, "+/b"), vec!["a/b", "x/b"]);
        assert_eq!(topics(&s, "#"), vec!["/lead", "a", "a/b", "a/b/c", "x/b"]);
        assert_eq!(topics(&s, "$SYS/#"), vec!["$SYS/up"]);
        assert_eq!(topics(&s, "+/lead"), vec!["/lead"]);
        assert!(s.remove("a/b"));
        assert!(!s.remove("a/b"));
        assert_eq!(topics(&s, "a/#"), vec!["a", "a/b/c"]);
        assert!(s.remove("a/b/c"));
        assert!(s.remove("a"));
        assert!(!s.root.children.contains_key("a"), "empty branch pruned");
    }

    #[test]
    fn expired_messages_are_not_returned() {
        let mut s = MemoryRetained::new();
        let now = Instant::now();
        let mut m = (*msg("e")).clone();
        m.expires_at = Some(now);
        s.insert(Arc::new(m));
        let mut out = Vec::new();
        s.matching("e", now, &mut out);
        assert!(out.is_empty());
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("".to_string()),
            Just("$x".to_string())
        ]
    }

    proptest! {
        #[test]
        fn agrees_with_naive_matcher(
            names in prop::collection::vec(prop::collection::vec(level(), 1..4), 1..10),
            filters in prop::collection::vec((prop::collection::vec(prop_oneof![level(), Just("+".to_string())], 1..4), any::<bool>()), 1..10),
        ) {
            let mut s = MemoryRetained::new();
            let mut all: Vec<String> = names.iter().map(|l| l.join("/")).collect();
            for t in &all { s.insert(msg(t)); }
            all.sort();
            all.dedup();
            for (mut f, hash) in filters {
                if hash { f.push("#".into()); }
                let f = f.join("/");
                let expected: Vec<String> = all.iter().filter(|t| topic::matches(&f, t)).cloned().collect();
                prop_assert_eq!(topics(&s, &f), expected, "filter {:?}", f);
            }
        }
    }
}
