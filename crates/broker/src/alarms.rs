//! Instance alarm events: things an operator must hear about that are not errors of one
//! request, such as offline messages evicted because an instance reached its cap. Kept in
//! memory (the newest [`MAX_ALARMS`]), logged when raised, listed by the management API.
//! Repeats of the same alarm within [`COALESCE`] update one event (its count and last time)
//! instead of flooding the list.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Events kept, all instances together; older ones are dropped.
pub const MAX_ALARMS: usize = 1000;
/// Repeats within this time fold into one event.
pub const COALESCE: Duration = Duration::from_secs(60);

/// What an alarm is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlarmKind {
    /// Offline messages were deleted because the instance held `max_offline_messages`.
    OfflineMessagesEvicted,
}

impl AlarmKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlarmKind::OfflineMessagesEvicted => "offline_messages_evicted",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alarm {
    pub instance: String,
    pub kind: AlarmKind,
    pub message: String,
    /// How many things it counts (evicted messages) since `first_ms`.
    pub count: u64,
    /// Epoch milliseconds of the first and of the latest occurrence.
    pub first_ms: u64,
    pub last_ms: u64,
}

#[derive(Debug, Default)]
pub struct Alarms {
    events: Mutex<VecDeque<Alarm>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Alarms {
    /// Raises (or, within [`COALESCE`] of the last one of the same kind and instance, extends)
    /// an alarm counting `count` more occurrences.
    pub fn raise(&self, instance: &str, kind: AlarmKind, count: u64, message: impl Into<String>) {
        self.raise_at(instance, kind, count, message.into(), now_ms());
    }

    fn raise_at(&self, instance: &str, kind: AlarmKind, count: u64, message: String, now: u64) {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let recent = events
            .iter_mut()
            .rev()
            .find(|a| a.instance == instance && a.kind == kind)
            .filter(|a| now.saturating_sub(a.last_ms) < COALESCE.as_millis() as u64);
        if let Some(alarm) = recent {
            alarm.count += count;
            alarm.last_ms = now;
            alarm.message = message;
            return;
        }
        tracing::warn!(instance, alarm = kind.as_str(), count, "{message}");
        if events.len() >= MAX_ALARMS {
            events.pop_front();
        }
        events.push_back(Alarm {
            instance: instance.to_string(),
            kind,
            message,
            count,
            first_ms: now,
            last_ms: now,
        });
    }

    /// The kept events, oldest first; only `instance`'s if given.
    pub fn list(&self, instance: Option<&str>) -> Vec<Alarm> {
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        events
            .iter()
            .filter(|a| instance.is_none_or(|i| a.instance == i))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_fold_into_one_event_and_the_list_is_bounded() {
        let alarms = Alarms::default();
        let kind = AlarmKind::OfflineMessagesEvicted;
        alarms.raise_at("a", kind, 3, "m1".into(), 1_000);
        alarms.raise_at("a", kind, 2, "m2".into(), 30_000);
        alarms.raise_at("b", kind, 1, "m3".into(), 30_000);
        let a = alarms.list(Some("a"));
        assert_eq!(a.len(), 1);
        assert_eq!(
            (a[0].count, a[0].first_ms, a[0].last_ms),
            (5, 1_000, 30_000)
        );
        assert_eq!(a[0].message, "m2");
        // After the coalescing window: a new event.
        alarms.raise_at("a", kind, 1, "m4".into(), 100_000);
        assert_eq!(alarms.list(Some("a")).len(), 2);
        assert_eq!(alarms.list(None).len(), 3);
        for i in 0..(MAX_ALARMS as u64 + 10) {
            alarms.raise_at(&format!("i{i}"), kind, 1, "x".into(), 200_000);
        }
        assert_eq!(alarms.list(None).len(), MAX_ALARMS);
    }
}
