//! The hash maps of the hot paths. The standard library's SipHash cost ~13% of the broker's
//! CPU in a QoS 1 point-to-point benchmark; foldhash is several times faster and still seeded
//! per process, so clients cannot pick keys (topic levels, client ids) that collide.

/// A `HashMap` with foldhash. Build with `HashMap::default()`.
pub type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// A `HashSet` with foldhash. Build with `HashSet::default()`.
pub type HashSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;
