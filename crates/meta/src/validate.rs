//! Naming rules (§1). Every error names the field and the rule it broke.

use crate::MetaError;

fn charset_ok(s: &str, extra: &[char]) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || extra.contains(&c))
}

/// Instance id: `[a-z0-9-]{3,64}`.
pub fn instance_id(id: &str) -> Result<(), MetaError> {
    let ok = (3..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(MetaError::invalid(format!(
            "InstanceId {id:?}: must be 3-64 characters of a-z, 0-9 and '-'"
        )))
    }
}

/// Parent topic name: one level of `[0-9A-Za-z_-]`, 1–64 characters.
pub fn parent_topic(name: &str) -> Result<(), MetaError> {
    if name.is_empty() || name.len() > 64 || !charset_ok(name, &['_', '-']) {
        return Err(MetaError::invalid(format!(
            "ParentTopic {name:?}: must be 1-64 characters of A-Z, a-z, 0-9, '_' and '-'"
        )));
    }
    Ok(())
}

/// Group ID: `GID_` or `GID-` prefix, 7–64 characters of `[A-Za-z0-9_-]`.
pub fn group_id(id: &str) -> Result<(), MetaError> {
    let ok = (id.starts_with("GID_") || id.starts_with("GID-"))
        && (7..=64).contains(&id.len())
        && charset_ok(id, &['_', '-']);
    if ok {
        Ok(())
    } else {
        Err(MetaError::invalid(format!(
            "GroupId {id:?}: must start with GID_ or GID- and be 7-64 characters of A-Z, a-z, 0-9, '_' and '-'"
        )))
    }
}

/// Splits a cloud client id `<GroupID>@@@<DeviceID>` and checks both parts.
pub fn cloud_client_id(client_id: &str, max_len: usize) -> Result<(&str, &str), MetaError> {
    if client_id.len() > max_len {
        return Err(MetaError::invalid(format!(
            "ClientId {client_id:?}: longer than {max_len} characters"
        )));
    }
    let (group, device) = client_id.split_once("@@@").ok_or_else(|| {
        MetaError::invalid(format!(
            "ClientId {client_id:?}: must be <GroupID>@@@<DeviceID>"
        ))
    })?;
    group_id(group)?;
    if device.is_empty() || !charset_ok(device, &['_', '-']) {
        return Err(MetaError::invalid(format!(
            "ClientId {client_id:?}: DeviceID must be non-empty A-Z, a-z, 0-9, '_' and '-'"
        )));
    }
    Ok((group, device))
}

/// A topic under the cloud rules: levels of `[0-9A-Za-z_-]` (the `p2p` level included), whole
/// length within `min..=max`. Wildcards are checked by the caller for filters.
pub fn cloud_topic(topic: &str, min: usize, max: usize, is_filter: bool) -> Result<(), MetaError> {
    if topic.len() < min || topic.len() > max {
        return Err(MetaError::invalid(format!(
            "topic {topic:?}: must be {min}-{max} characters"
        )));
    }
    // In `<parent>/p2p/<clientId>` the client id may hold the `@@@` of cloud client ids.
    let p2p = topic.split('/').nth(1) == Some("p2p");
    for (i, level) in topic.split('/').enumerate() {
        let wildcard = is_filter && (level == "+" || level == "#");
        let extra: &[char] = if p2p && i >= 2 {
            &['_', '-', '@']
        } else {
            &['_', '-']
        };
        if !wildcard && !level.is_empty() && !charset_ok(level, extra) {
            return Err(MetaError::invalid(format!(
                "topic {topic:?}: level {level:?} may only hold A-Z, a-z, 0-9, '_' and '-'"
            )));
        }
    }
    Ok(())
}

/// Token resources: 1–100 valid topic filters.
pub fn token_resources(resources: &[String]) -> Result<(), MetaError> {
    if resources.is_empty() || resources.len() > 100 {
        return Err(MetaError::invalid(format!(
            "Resources: must hold 1-100 topic filters, got {}",
            resources.len()
        )));
    }
    for r in resources {
        ferry_core::topic::validate_filter(r).map_err(|e| {
            MetaError::invalid(format!("Resources: {r:?} is not a topic filter: {e}"))
        })?;
    }
    Ok(())
}

/// Rule name: 1–64 characters of `[A-Za-z0-9_-]`.
pub fn rule_name(name: &str) -> Result<(), MetaError> {
    if name.is_empty() || name.len() > 64 || !charset_ok(name, &['_', '-']) {
        return Err(MetaError::invalid(format!(
            "name {name:?}: must be 1-64 characters of A-Z, a-z, 0-9, '_' and '-'"
        )));
    }
    Ok(())
}

/// Queue topic (RocketMQ): 1–127 characters of `[A-Za-z0-9%_-]`, not starting with `%`.
pub fn queue_topic(field: &str, name: &str) -> Result<(), MetaError> {
    if name.is_empty()
        || name.len() > 127
        || name.starts_with('%')
        || !charset_ok(name, &['%', '_', '-'])
    {
        return Err(MetaError::invalid(format!(
            "{field} {name:?}: a queue topic is 1-127 characters of A-Z, a-z, 0-9, '%', '_' and '-' (not starting with '%')"
        )));
    }
    Ok(())
}

/// A queue tag filter: `*`, or tags separated by `||` (no empty tag, no other `|`).
pub fn tag_filter(expr: &str) -> Result<(), MetaError> {
    let expr = expr.trim();
    if expr.is_empty() || expr == "*" {
        return Ok(());
    }
    for tag in expr.split("||") {
        let tag = tag.trim();
        if tag.is_empty() || tag.contains('|') {
            return Err(MetaError::invalid(format!(
                "tag_filter {expr:?}: must be '*' or tags separated by '||'"
            )));
        }
    }
    Ok(())
}

/// `host:port` of a remote endpoint.
pub fn endpoint(endpoint: &str) -> Result<(), MetaError> {
    let rest = endpoint
        .strip_prefix("http://")
        .unwrap_or(endpoint)
        .trim_end_matches('/');
    let ok = rest
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if ok {
        Ok(())
    } else {
        Err(MetaError::invalid(format!(
            "remote.endpoint {endpoint:?}: must be host:port"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        assert!(instance_id("mqtt-local").is_ok());
        assert!(instance_id("ab").is_err());
        assert!(instance_id("Upper").is_err());
        assert!(group_id("GID_test").is_ok());
        assert!(group_id("GID-abc").is_ok());
        assert!(group_id("GID_ab").is_err(), "6 characters");
        assert!(group_id("XID_test").is_err());
        assert!(group_id("GID_te st").is_err());
        assert_eq!(
            cloud_client_id("GID_x123@@@dev1", 64).unwrap(),
            ("GID_x123", "dev1")
        );
        assert!(cloud_client_id("GID_test@@@", 64).is_err());
        assert!(cloud_client_id("nogroup", 64).is_err());
        assert!(cloud_client_id("GID_test@@@d", 8).is_err());
        assert!(parent_topic("TopicA").is_ok());
        assert!(parent_topic("a/b").is_err());
        assert!(cloud_topic("TopicA/x/y", 3, 64, false).is_ok());
        assert!(cloud_topic("ab", 3, 64, false).is_err());
        assert!(cloud_topic("TopicA/+/#", 3, 64, true).is_ok());
        assert!(cloud_topic("TopicA/a.b", 3, 64, false).is_err());
        assert!(cloud_topic("TopicA/p2p/GID_test@@@dev2", 3, 64, false).is_ok());
        assert!(cloud_topic("TopicA/x/GID_test@@@dev2", 3, 64, false).is_err());
        let e = group_id("bad").unwrap_err();
        assert!(e.message.contains("GroupId"), "names the field: {e}");
    }
}
