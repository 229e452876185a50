//! A simple topic ACL: an ordered list of allow/deny rules for publish and subscribe, each for
//! everyone or for one user name; the first rule that applies decides.

use crate::topic;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Publish,
    Subscribe,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AclAction {
    Publish,
    Subscribe,
    All,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AclRule {
    pub allow: bool,
    pub action: AclAction,
    /// A topic filter (wildcards allowed).
    pub filter: String,
    /// The user name the rule is for; `None` for everyone.
    pub user: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acl {
    pub rules: Vec<AclRule>,
    /// The answer when no rule applies.
    pub default_allow: bool,
}

impl Default for Acl {
    fn default() -> Self {
        Acl {
            rules: Vec::new(),
            default_allow: true,
        }
    }
}

impl Acl {
    /// Whether `user` may publish to the topic name, or subscribe to the filter, `target`.
    /// A subscription filter is compared as written: a rule on `secret/#` also covers a
    /// subscription to `secret/+`.
    pub fn check(&self, user: Option<&str>, action: Action, target: &str) -> bool {
        for rule in &self.rules {
            let action_applies = matches!(
                (rule.action, action),
                (AclAction::All, _)
                    | (AclAction::Publish, Action::Publish)
                    | (AclAction::Subscribe, Action::Subscribe)
            );
            let user_applies = rule.user.as_deref().is_none_or(|u| Some(u) == user);
            if action_applies
                && user_applies
                && (rule.filter == target || topic::matches(&rule.filter, target))
            {
                return rule.allow;
            }
        }
        self.default_allow
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.default_allow
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(allow: bool, action: AclAction, filter: &str, user: Option<&str>) -> AclRule {
        AclRule {
            allow,
            action,
            filter: filter.into(),
            user: user.map(Into::into),
        }
    }

    #[test]
    fn first_matching_rule_wins() {
        let acl = Acl {
            rules: vec![
                rule(true, AclAction::All, "secret/#", Some("admin")),
                rule(false, AclAction::All, "secret/#", None),
                rule(false, AclAction::Subscribe, "test/nosubscribe", None),
            ],
            default_allow: true,
        };
        assert!(acl.check(Some("admin"), Action::Publish, "secret/a"));
        assert!(!acl.check(Some("bob"), Action::Publish, "secret/a"));
        assert!(!acl.check(None, Action::Subscribe, "secret/+"));
        assert!(!acl.check(None, Action::Subscribe, "test/nosubscribe"));
        assert!(acl.check(None, Action::Publish, "test/nosubscribe"));
        assert!(acl.check(None, Action::Subscribe, "other"));
        let closed = Acl {
            rules: vec![],
            default_allow: false,
        };
        assert!(!closed.check(None, Action::Publish, "a"));
    }
}

/// What one connection may do, on top of the ACL: granted by its credentials (an AccessKey's
/// permission, a token's resources).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Grant {
    #[default]
    All,
    Nothing,
    /// Only topics (publish) or filters (subscribe, compared as written) covered by one of
    /// these filters.
    Filters(Vec<String>),
}

impl Grant {
    pub fn allows(&self, target: &str) -> bool {
        match self {
            Grant::All => true,
            Grant::Nothing => false,
            Grant::Filters(filters) => filters
                .iter()
                .any(|f| f == target || topic::matches(f, target)),
        }
    }

    /// This grant limited to `filters` (no change when `filters` is empty).
    pub fn narrowed_to(self, filters: &[String]) -> Grant {
        match self {
            Grant::All if !filters.is_empty() => Grant::Filters(filters.to_vec()),
            other => other,
        }
    }
}

/// A connection's publish and subscribe grants.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Permissions {
    pub publish: Grant,
    pub subscribe: Grant,
}

impl Permissions {
    pub fn full() -> Self {
        Permissions::default()
    }
}

/// Instance rules on topics that need outside knowledge (the cloud profile: the first level must
/// be a created parent topic, levels and length follow the naming rules). Called from the
/// broker core for every PUBLISH topic and SUBSCRIBE filter, so it must be cheap.
pub trait TopicPolicy: Send + Sync {
    fn allows(&self, topic: &str, is_filter: bool) -> bool;
}
