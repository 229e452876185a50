//! Topic names and topic filters (MQTT 5 §4.7): validation, matching and shared-subscription
//! parsing.

use ferry_codec::ReasonCode;

/// Why a topic name or filter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is longer than 65,535 bytes")]
    TooLong,
    #[error("topic name contains a wildcard")]
    WildcardInName,
    #[error("'#' must be the last level and stand alone")]
    MisplacedMultiLevel,
    #[error("'+' must occupy a whole level")]
    MisplacedSingleLevel,
    #[error("shared subscription needs $share/<group>/<filter> with a non-empty group without wildcards")]
    InvalidShare,
    #[error("topic has more than the allowed number of levels")]
    TooManyLevels,
}

impl TopicError {
    pub fn reason_code(self, is_filter: bool) -> ReasonCode {
        if is_filter {
            ReasonCode::TOPIC_FILTER_INVALID
        } else {
            ReasonCode::TOPIC_NAME_INVALID
        }
    }
}

/// Levels allowed in a topic or filter; deep topics cost trie depth and stack.
pub const MAX_LEVELS: usize = 128;

/// Checks a PUBLISH topic name: non-empty, no wildcards (the codec already checked UTF-8 and
/// U+0000).
pub fn validate_name(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > 65_535 {
        return Err(TopicError::TooLong);
    }
    if topic.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(TopicError::WildcardInName);
    }
    if topic.bytes().filter(|&b| b == b'/').count() >= MAX_LEVELS {
        return Err(TopicError::TooManyLevels);
    }
    Ok(())
}

/// Checks a (non-shared) topic filter: `#` only as the whole last level, `+` only as a whole
/// level.
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError::Empty);
    }
    if filter.len() > 65_535 {
        return Err(TopicError::TooLong);
    }
    let mut levels = filter.split('/').peekable();
    let mut count = 0;
    while let Some(level) = levels.next() {
        count += 1;
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(TopicError::MisplacedMultiLevel);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::MisplacedSingleLevel);
        }
    }
    if count > MAX_LEVELS {
        return Err(TopicError::TooManyLevels);
    }
    Ok(())
}

/// A subscription filter after splitting off `$share/<group>/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedFilter<'a> {
    pub share_group: Option<&'a str>,
    pub filter: &'a str,
}

/// Splits and validates a SUBSCRIBE filter, shared or not.
pub fn parse_filter(raw: &str) -> Result<ParsedFilter<'_>, TopicError> {
    if let Some(rest) = raw.strip_prefix("$share/") {
        let (group, filter) = rest.split_once('/').ok_or(TopicError::InvalidShare)?;
        if group.is_empty() || group.contains(['+', '#']) {
            return Err(TopicError::InvalidShare);
        }
        validate_filter(filter)?;
        return Ok(ParsedFilter {
            share_group: Some(group),
            filter,
        });
    }
    if raw == "$share" {
        return Err(TopicError::InvalidShare);
    }
    validate_filter(raw)?;
    Ok(ParsedFilter {
        share_group: None,
        filter: raw,
    })
}

/// Whether `filter` matches `topic` (both already valid). Topics starting with `$` are not
/// matched by a filter starting with a wildcard (§4.7.2).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("a/b").is_ok());
        assert!(validate_name("/").is_ok());
        assert_eq!(validate_name(""), Err(TopicError::Empty));
        assert_eq!(validate_name("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name("a/#"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name("a#"), Err(TopicError::WildcardInName));
    }

    #[test]
    fn filters() {
        for ok in ["#", "+", "a/#", "+/+", "a/+/b", "/", "//", "$SYS/#", "a//#"] {
            assert!(validate_filter(ok).is_ok(), "{ok}");
        }
        assert_eq!(
            validate_filter("a/#/b"),
            Err(TopicError::MisplacedMultiLevel)
        );
        assert_eq!(validate_filter("a#"), Err(TopicError::MisplacedMultiLevel));
        assert_eq!(
            validate_filter("a/b+"),
            Err(TopicError::MisplacedSingleLevel)
        );
        assert_eq!(validate_filter(""), Err(TopicError::Empty));
    }

    #[test]
    fn shared() {
        let p = parse_filter("$share/g1/a/+").unwrap();
        assert_eq!(p.share_group, Some("g1"));
        assert_eq!(p.filter, "a/+");
        assert_eq!(parse_filter("$share/g1"), Err(TopicError::InvalidShare));
        assert_eq!(parse_filter("$share//a"), Err(TopicError::InvalidShare));
        assert_eq!(parse_filter("$share/g+/a"), Err(TopicError::InvalidShare));
        assert_eq!(
            parse_filter("$share/g/a#"),
            Err(TopicError::MisplacedMultiLevel)
        );
        assert_eq!(parse_filter("x/y").unwrap().share_group, None);
    }

    #[test]
    fn matching() {
        assert!(matches("a/b", "a/b"));
        assert!(matches("a/+", "a/b"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(matches("+/+", "/x"));
        assert!(!matches("+", "/x"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(matches("a/+/#", "a/b"));
    }
}
