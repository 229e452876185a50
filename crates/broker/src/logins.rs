//! Failed-login rate limiting per source address: after too many failures within a minute, an
//! address is refused without its credentials being checked until the minute is over.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered at most; beyond, expired entries are purged first.
const MAX_TRACKED: usize = 100_000;

#[derive(Default)]
pub struct FailedLogins {
    by_addr: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl FailedLogins {
    /// Whether `addr` may try to log in now.
    pub fn allowed(&self, addr: IpAddr, limit: u32, now: Instant) -> bool {
        if limit == 0 {
            return true;
        }
        let map = self.by_addr.lock().expect("logins lock");
        match map.get(&addr) {
            Some(&(count, since)) => count < limit || now.duration_since(since) >= WINDOW,
            None => true,
        }
    }

    pub fn record_failure(&self, addr: IpAddr, now: Instant) {
        let mut map = self.by_addr.lock().expect("logins lock");
        if map.len() >= MAX_TRACKED {
            map.retain(|_, (_, since)| now.duration_since(*since) < WINDOW);
        }
        let entry = map.entry(addr).or_insert((0, now));
        if now.duration_since(entry.1) >= WINDOW {
            *entry = (0, now);
        }
        entry.0 += 1;
    }

    pub fn record_success(&self, addr: IpAddr) {
        self.by_addr.lock().expect("logins lock").remove(&addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_within_a_window() {
        let f = FailedLogins::default();
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(f.allowed(a, 3, t0));
            f.record_failure(a, t0);
        }
        assert!(!f.allowed(a, 3, t0));
        assert!(f.allowed("127.0.0.3".parse().unwrap(), 3, t0));
        assert!(f.allowed(a, 3, t0 + WINDOW));
        f.record_success(a);
        assert!(f.allowed(a, 3, t0));
    }
}
