//! [`Meta`]: the registry of instances and everything they own, and CONNECT authentication
//! against it. In memory for now; the storage issue puts it on disk.

use crate::auth::{
    parse_token_password, parse_username, secrets_equal, verify_signature, AuthError, AuthMode,
    Authenticated, HeldToken, Permissions, TokenType,
};
use crate::model::*;
use crate::{random_bytes, validate, MetaError};
use std::collections::BTreeMap;
use std::sync::RwLock;

/// Tokens live between these bounds (§1); longer requests are capped.
pub const TOKEN_MIN_TTL_MS: u64 = 60_000;
pub const TOKEN_MAX_TTL_MS: u64 = 30 * 24 * 3600 * 1000;

#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct Tenant {
    instance: Option<Instance>,
    topics: BTreeMap<String, ParentTopic>,
    groups: BTreeMap<String, Group>,
    keys: BTreeMap<String, AccessKey>,
    /// client id → credential.
    credentials: BTreeMap<String, DeviceCredential>,
    tokens: BTreeMap<String, Token>,
    /// name → rule.
    #[serde(default)]
    rules: BTreeMap<String, Rule>,
}

/// Rules one instance may have.
pub const MAX_RULES: usize = 100;

#[derive(Debug, Default)]
struct State {
    tenants: BTreeMap<String, Tenant>,
    admin_keys: BTreeMap<String, AdminKey>,
}

/// Where [`Meta`] writes through to, so that metadata survives restarts. Values are opaque
/// JSON documents; each `put` must be durable when it returns.
pub trait MetaStore: Send + Sync {
    fn put(&self, key: &str, value: Vec<u8>) -> Result<(), String>;
    fn delete(&self, key: &str) -> Result<(), String>;
    /// Every stored document, for loading at start-up.
    fn load(&self) -> Result<Vec<(String, Vec<u8>)>, String>;
}

/// What a write touched, to be written through.
enum Touched<'a> {
    Tenant(&'a str),
    Admin,
    All,
}

/// All metadata. Cheap to read from many threads; writes are rare.
#[derive(Default)]
pub struct Meta {
    state: RwLock<State>,
    store: Option<std::sync::Arc<dyn MetaStore>>,
}

impl std::fmt::Debug for Meta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meta")
            .field("persistent", &self.store.is_some())
            .finish()
    }
}

/// The stored form of a tenant: its resources with their secrets (which the API types never
/// serialize).
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredTenant {
    tenant: Tenant,
    key_secrets: BTreeMap<String, String>,
    credential_secrets: BTreeMap<String, String>,
    /// rule name → the remote endpoint's AccessKey secret.
    #[serde(default)]
    rule_secrets: BTreeMap<String, String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAdmin {
    keys: Vec<AdminKey>,
    secrets: BTreeMap<String, String>,
}

const TENANT_PREFIX: &str = "tenant/";
const ADMIN_KEY: &str = "admin-keys";

fn encode_tenant(t: &Tenant) -> Vec<u8> {
    let stored = StoredTenant {
        tenant: t.clone(),
        key_secrets: t
            .keys
            .iter()
            .map(|(id, k)| (id.clone(), k.secret.clone()))
            .collect(),
        credential_secrets: t
            .credentials
            .iter()
            .map(|(id, c)| (id.clone(), c.device_access_key_secret.clone()))
            .collect(),
        rule_secrets: t
            .rules
            .iter()
            .filter_map(|(name, r)| {
                Some((name.clone(), r.remote.as_ref()?.access_key_secret.clone()))
            })
            .collect(),
    };
    serde_json::to_vec(&stored).expect("metadata serializes")
}

fn decode_tenant(raw: &[u8]) -> Result<Tenant, String> {
    let mut stored: StoredTenant = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
    for (id, key) in stored.tenant.keys.iter_mut() {
        key.secret = stored.key_secrets.remove(id).unwrap_or_default();
    }
    for (id, cred) in stored.tenant.credentials.iter_mut() {
        cred.device_access_key_secret = stored.credential_secrets.remove(id).unwrap_or_default();
    }
    for (name, rule) in stored.tenant.rules.iter_mut() {
        if let Some(remote) = rule.remote.as_mut() {
            remote.access_key_secret = stored.rule_secrets.remove(name).unwrap_or_default();
        }
    }
    Ok(stored.tenant)
}

fn random_id(prefix: &str, bytes: usize) -> String {
    let raw: [u8; 24] = random_bytes();
    let mut s = String::from(prefix);
    for b in &raw[..bytes.min(24)] {
        s.push_str(&format!("{b:02X}"));
    }
    s
}

/// 32 random letters and digits (about 190 bits). Only alphanumerics, so a secret or token
/// never starts with `-` (a command line would take it for an option) and needs no escaping
/// in URLs or paths.
fn random_secret() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(32);
    while out.len() < 32 {
        let raw: [u8; 64] = random_bytes();
        // 248 = 4 × 62: dropping larger bytes keeps the choice uniform.
        for b in raw.iter().filter(|&&b| b < 248) {
            if out.len() == 32 {
                break;
            }
            out.push(ALPHABET[usize::from(*b) % ALPHABET.len()] as char);
        }
    }
    out
}

fn no_rule(name: &str) -> MetaError {
    MetaError::not_found("RuleNotFound", format!("rule {name:?} does not exist"))
}

fn no_instance(id: &str) -> MetaError {
    MetaError::not_found(
        "InstanceNotFound",
        format!("instance {id:?} does not exist"),
    )
}

impl Meta {
    pub fn new() -> Self {
        Self::default()
    }

    /// Metadata that writes through to `store`, loaded from it.
    pub fn with_store(store: std::sync::Arc<dyn MetaStore>) -> Result<Self, MetaError> {
        let mut state = State::default();
        let docs = store.load().map_err(MetaError::internal)?;
        for (key, raw) in docs {
            if let Some(id) = key.strip_prefix(TENANT_PREFIX) {
                let tenant = decode_tenant(&raw)
                    .map_err(|e| MetaError::internal(format!("stored instance {id:?}: {e}")))?;
                state.tenants.insert(id.to_string(), tenant);
            } else if key == ADMIN_KEY {
                let mut admin: StoredAdmin = serde_json::from_slice(&raw)
                    .map_err(|e| MetaError::internal(format!("stored admin keys: {e}")))?;
                for mut k in admin.keys {
                    k.secret = admin.secrets.remove(&k.access_key_id).unwrap_or_default();
                    state.admin_keys.insert(k.access_key_id.clone(), k);
                }
            }
        }
        Ok(Meta {
            state: RwLock::new(state),
            store: Some(store),
        })
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.state.read().expect("meta lock"))
    }

    /// Runs a change; with a store, what it touched is written through before the change is
    /// reported, and undone in memory if the store refuses it.
    fn write<T>(
        &self,
        touched: Touched<'_>,
        f: impl FnOnce(&mut State) -> Result<T, MetaError>,
    ) -> Result<T, MetaError> {
        let mut state = self.state.write().expect("meta lock");
        let Some(store) = &self.store else {
            return f(&mut state);
        };
        let before_tenants = match touched {
            Touched::Tenant(id) => Some(
                state
                    .tenants
                    .get(id)
                    .map(|t| vec![(id.to_string(), t.clone())])
                    .unwrap_or_default(),
            ),
            Touched::All => Some(
                state
                    .tenants
                    .iter()
                    .map(|(id, t)| (id.clone(), t.clone()))
                    .collect(),
            ),
            Touched::Admin => None,
        };
        let before_admin = matches!(touched, Touched::Admin).then(|| state.admin_keys.clone());
        let value = f(&mut state)?;
        let persisted = match touched {
            Touched::Tenant(id) => Self::persist_tenant(store.as_ref(), &state, id),
            Touched::All => state
                .tenants
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .iter()
                .try_for_each(|id| Self::persist_tenant(store.as_ref(), &state, id)),
            Touched::Admin => {
                let admin = StoredAdmin {
                    keys: state.admin_keys.values().cloned().collect(),
                    secrets: state
                        .admin_keys
                        .values()
                        .map(|k| (k.access_key_id.clone(), k.secret.clone()))
                        .collect(),
                };
                store.put(ADMIN_KEY, serde_json::to_vec(&admin).expect("serializes"))
            }
        };
        if let Err(e) = persisted {
            // Undo in memory what could not be stored.
            if let Some(tenants) = before_tenants {
                if let Touched::Tenant(id) = touched {
                    state.tenants.remove(id);
                }
                for (id, t) in tenants {
                    state.tenants.insert(id, t);
                }
            }
            if let Some(admin) = before_admin {
                state.admin_keys = admin;
            }
            return Err(MetaError::internal(format!("cannot store metadata: {e}")));
        }
        Ok(value)
    }

    /// Every value of one of an instance's resource maps.
    fn list<T: Clone>(
        &self,
        instance: &str,
        map: impl FnOnce(&Tenant) -> &BTreeMap<String, T>,
    ) -> Result<Vec<T>, MetaError> {
        self.read(|s| Ok(map(Self::tenant(s, instance)?).values().cloned().collect()))
    }

    /// Removes `name` from one of an instance's resource maps; `missing` is the error if it
    /// is not there.
    fn remove<T>(
        &self,
        instance: &str,
        name: &str,
        map: impl FnOnce(&mut Tenant) -> &mut BTreeMap<String, T>,
        missing: impl FnOnce() -> MetaError,
    ) -> Result<(), MetaError> {
        self.write(Touched::Tenant(instance), |s| {
            map(Self::tenant_mut(s, instance)?)
                .remove(name)
                .map(|_| ())
                .ok_or_else(missing)
        })
    }

    fn persist_tenant(store: &dyn MetaStore, state: &State, id: &str) -> Result<(), String> {
        let key = format!("{TENANT_PREFIX}{id}");
        match state.tenants.get(id) {
            Some(t) if t.instance.is_some() => store.put(&key, encode_tenant(t)),
            _ => store.delete(&key),
        }
    }

    fn tenant<'a>(state: &'a State, id: &str) -> Result<&'a Tenant, MetaError> {
        state
            .tenants
            .get(id)
            .filter(|t| t.instance.is_some())
            .ok_or_else(|| no_instance(id))
    }

    fn tenant_mut<'a>(state: &'a mut State, id: &str) -> Result<&'a mut Tenant, MetaError> {
        state
            .tenants
            .get_mut(id)
            .filter(|t| t.instance.is_some())
            .ok_or_else(|| no_instance(id))
    }

    // ------------------------------------------------------------------------------------
    // Instances

    pub fn create_instance(
        &self,
        id: &str,
        name: &str,
        profile: Profile,
        settings: Option<InstanceSettings>,
        now: u64,
    ) -> Result<Instance, MetaError> {
        validate::instance_id(id)?;
        if name.chars().count() > 128 {
            return Err(MetaError::invalid("InstanceName: at most 128 characters"));
        }
        let instance = Instance {
            id: id.to_string(),
            name: if name.is_empty() {
                id.to_string()
            } else {
                name.to_string()
            },
            profile,
            settings: settings.unwrap_or_else(|| InstanceSettings::for_profile(profile)),
            created_at: now,
        };
        self.write(Touched::Tenant(id), |s| {
            if s.tenants.get(id).is_some_and(|t| t.instance.is_some()) {
                return Err(MetaError::conflict(
                    "InstanceAlreadyExisted",
                    format!("instance {id:?} exists already"),
                ));
            }
            s.tenants.insert(
                id.to_string(),
                Tenant {
                    instance: Some(instance.clone()),
                    ..Default::default()
                },
            );
            Ok(instance)
        })
    }

    pub fn instance(&self, id: &str) -> Result<Instance, MetaError> {
        self.read(|s| Ok(Self::tenant(s, id)?.instance.clone().expect("present")))
    }

    pub fn instances(&self) -> Vec<Instance> {
        self.read(|s| {
            s.tenants
                .values()
                .filter_map(|t| t.instance.clone())
                .collect()
        })
    }

    pub fn update_settings(
        &self,
        id: &str,
        settings: InstanceSettings,
    ) -> Result<Instance, MetaError> {
        self.write(Touched::Tenant(id), |s| {
            let t = Self::tenant_mut(s, id)?;
            let inst = t.instance.as_mut().expect("present");
            inst.settings = settings;
            Ok(inst.clone())
        })
    }

    pub fn delete_instance(&self, id: &str) -> Result<(), MetaError> {
        self.write(Touched::Tenant(id), |s| {
            Self::tenant(s, id)?;
            s.tenants.remove(id);
            Ok(())
        })
    }

    // ------------------------------------------------------------------------------------
    // Parent topics

    pub fn create_topic(
        &self,
        instance: &str,
        name: &str,
        now: u64,
    ) -> Result<ParentTopic, MetaError> {
        validate::parent_topic(name)?;
        self.write(Touched::Tenant(instance), |s| {
            let t = Self::tenant_mut(s, instance)?;
            let max = t
                .instance
                .as_ref()
                .expect("present")
                .settings
                .max_parent_topics;
            if t.topics.keys().any(|k| k.eq_ignore_ascii_case(name)) {
                return Err(MetaError::conflict(
                    "TopicAlreadyExisted",
                    format!("parent topic {name:?} exists already (names are case-insensitive)"),
                ));
            }
            if t.topics.len() as u32 >= max {
                return Err(MetaError::limit(
                    "TopicCountLimit",
                    format!("instance {instance:?} has its maximum of {max} parent topics"),
                ));
            }
            let topic = ParentTopic {
                name: name.to_string(),
                created_at: now,
            };
            t.topics.insert(name.to_string(), topic.clone());
            Ok(topic)
        })
    }

    pub fn topics(&self, instance: &str) -> Result<Vec<ParentTopic>, MetaError> {
        self.list(instance, |t| &t.topics)
    }

    pub fn delete_topic(&self, instance: &str, name: &str) -> Result<(), MetaError> {
        self.remove(
            instance,
            name,
            |t| &mut t.topics,
            || {
                MetaError::not_found(
                    "TopicNotFound",
                    format!("parent topic {name:?} does not exist"),
                )
            },
        )
    }

    /// Whether `parent` is a created parent topic of the instance (exact match).
    pub fn has_topic(&self, instance: &str, parent: &str) -> bool {
        self.read(|s| {
            s.tenants
                .get(instance)
                .is_some_and(|t| t.topics.contains_key(parent))
        })
    }

    // ------------------------------------------------------------------------------------
    // Rules

    /// Creates a rule after checking it (names, the referenced parent topic or group, and
    /// §6.2's limits: one status rule per group, one inflow and one outflow per parent topic).
    pub fn create_rule(&self, instance: &str, rule: Rule) -> Result<Rule, MetaError> {
        validate::rule_name(&rule.name)?;
        let mut rule = rule;
        match rule.rule_type {
            RuleType::Inflow => {
                validate::queue_topic("source", &rule.source)?;
                validate::parent_topic(&rule.target)
                    .map_err(|e| MetaError::invalid(format!("target: {}", e.message)))?;
                if rule.tag_filter.trim().is_empty() {
                    rule.tag_filter = "*".into();
                }
                validate::tag_filter(&rule.tag_filter)?;
            }
            RuleType::Outflow => {
                validate::parent_topic(&rule.source)
                    .map_err(|e| MetaError::invalid(format!("source: {}", e.message)))?;
                validate::queue_topic("target", &rule.target)?;
            }
            RuleType::Status => {
                validate::group_id(&rule.source)
                    .map_err(|e| MetaError::invalid(format!("source: {}", e.message)))?;
                validate::queue_topic("target", &rule.target)?;
            }
        }
        if rule.rule_type != RuleType::Inflow && !rule.tag_filter.is_empty() {
            return Err(MetaError::invalid(format!(
                "tag_filter: only inflow rules filter by tag, this is an {} rule",
                rule.rule_type.as_str()
            )));
        }
        if let Some(remote) = &rule.remote {
            validate::endpoint(&remote.endpoint)?;
            if remote.access_key_id.is_some() && remote.access_key_secret.is_empty() {
                return Err(MetaError::invalid(
                    "remote.access_key_secret: required with remote.access_key_id",
                ));
            }
        }
        self.write(Touched::Tenant(instance), |s| {
            let t = Self::tenant_mut(s, instance)?;
            if t.rules.contains_key(&rule.name) {
                return Err(MetaError::conflict(
                    "RuleAlreadyExists",
                    format!("rule {:?} exists already", rule.name),
                ));
            }
            if t.rules.len() >= MAX_RULES {
                return Err(MetaError::limit(
                    "RuleLimitExceeded",
                    format!("an instance has at most {MAX_RULES} rules"),
                ));
            }
            let requires_parent = t
                .instance
                .as_ref()
                .is_some_and(|i| i.settings.require_parent_topic);
            let (parent, side) = match rule.rule_type {
                RuleType::Inflow => (Some(&rule.target), "target"),
                RuleType::Outflow => (Some(&rule.source), "source"),
                RuleType::Status => (None, "source"),
            };
            if let Some(parent) = parent {
                if requires_parent && !t.topics.contains_key(parent.as_str()) {
                    return Err(MetaError::not_found(
                        "TopicNotFound",
                        format!("{side}: parent topic {parent:?} does not exist"),
                    ));
                }
            } else if !t.groups.contains_key(&rule.source) {
                return Err(MetaError::not_found(
                    "GroupIdNotFound",
                    format!("source: group {:?} does not exist", rule.source),
                ));
            }
            let clash = t.rules.values().find(|r| {
                r.rule_type == rule.rule_type
                    && match rule.rule_type {
                        RuleType::Inflow => r.target == rule.target,
                        RuleType::Outflow | RuleType::Status => r.source == rule.source,
                    }
            });
            if let Some(other) = clash {
                let what = match rule.rule_type {
                    RuleType::Inflow => {
                        format!("parent topic {:?} has an inflow rule", rule.target)
                    }
                    RuleType::Outflow => {
                        format!("parent topic {:?} has an outflow rule", rule.source)
                    }
                    RuleType::Status => format!("group {:?} has a status rule", rule.source),
                };
                return Err(MetaError::conflict(
                    "RuleConflict",
                    format!("{what} already: {:?}", other.name),
                ));
            }
            t.rules.insert(rule.name.clone(), rule.clone());
            Ok(rule)
        })
    }

    /// The instance's rules (with remote secrets: never serialized).
    pub fn rules(&self, instance: &str) -> Result<Vec<Rule>, MetaError> {
        self.list(instance, |t| &t.rules)
    }

    pub fn rule(&self, instance: &str, name: &str) -> Result<Rule, MetaError> {
        self.read(|s| {
            Self::tenant(s, instance)?
                .rules
                .get(name)
                .cloned()
                .ok_or_else(|| no_rule(name))
        })
    }

    /// Turns a rule on or off.
    pub fn set_rule_enabled(
        &self,
        instance: &str,
        name: &str,
        enabled: bool,
    ) -> Result<Rule, MetaError> {
        self.write(Touched::Tenant(instance), |s| {
            let rule = Self::tenant_mut(s, instance)?
                .rules
                .get_mut(name)
                .ok_or_else(|| no_rule(name))?;
            rule.enabled = enabled;
            Ok(rule.clone())
        })
    }

    pub fn delete_rule(&self, instance: &str, name: &str) -> Result<(), MetaError> {
        self.remove(instance, name, |t| &mut t.rules, || no_rule(name))
    }

    /// Every rule of every instance: (instance, rule).
    pub fn all_rules(&self) -> Vec<(String, Rule)> {
        self.read(|s| {
            s.tenants
                .iter()
                .filter(|(_, t)| t.instance.is_some())
                .flat_map(|(id, t)| t.rules.values().map(move |r| (id.clone(), r.clone())))
                .collect()
        })
    }

    // ------------------------------------------------------------------------------------
    // Groups

    pub fn create_group(
        &self,
        instance: &str,
        group_id: &str,
        now: u64,
    ) -> Result<Group, MetaError> {
        validate::group_id(group_id)?;
        self.write(Touched::Tenant(instance), |s| {
            let t = Self::tenant_mut(s, instance)?;
            if t.groups.contains_key(group_id) {
                return Err(MetaError::conflict(
                    "GroupIdAlreadyExsited",
                    format!("group {group_id:?} exists already"),
                ));
            }
            let g = Group {
                group_id: group_id.to_string(),
                created_at: now,
            };
            t.groups.insert(group_id.to_string(), g.clone());
            Ok(g)
        })
    }

    pub fn groups(&self, instance: &str) -> Result<Vec<Group>, MetaError> {
        self.list(instance, |t| &t.groups)
    }

    /// Deleting a group does not drop its connected clients; they fail on their next connect.
    pub fn delete_group(&self, instance: &str, group_id: &str) -> Result<(), MetaError> {
        self.remove(
            instance,
            group_id,
            |t| &mut t.groups,
            || {
                MetaError::not_found(
                    "GroupIdNotFound",
                    format!("group {group_id:?} does not exist"),
                )
            },
        )
    }

    // ------------------------------------------------------------------------------------
    // AccessKeys

    /// Creates an AccessKey; the returned value is the only time its secret is shown.
    pub fn create_key(
        &self,
        instance: &str,
        permission: KeyPermission,
        topic_filters: Vec<String>,
        now: u64,
    ) -> Result<AccessKey, MetaError> {
        for f in &topic_filters {
            ferry_core::topic::validate_filter(f).map_err(|e| {
                MetaError::invalid(format!("TopicFilters: {f:?} is not a topic filter: {e}"))
            })?;
        }
        let key = AccessKey {
            access_key_id: random_id("LTAI", 8),
            secret: random_secret(),
            permission,
            topic_filters,
            created_at: now,
        };
        self.write(Touched::Tenant(instance), |s| {
            Self::tenant_mut(s, instance)?
                .keys
                .insert(key.access_key_id.clone(), key.clone());
            Ok(key)
        })
    }

    pub fn keys(&self, instance: &str) -> Result<Vec<AccessKey>, MetaError> {
        self.list(instance, |t| &t.keys)
    }

    pub fn delete_key(&self, instance: &str, key_id: &str) -> Result<(), MetaError> {
        self.remove(
            instance,
            key_id,
            |t| &mut t.keys,
            || {
                MetaError::not_found(
                    "AccessKeyNotFound",
                    format!("AccessKey {key_id:?} does not exist"),
                )
            },
        )
    }

    // ------------------------------------------------------------------------------------
    // Device credentials

    /// Registers (or replaces) the credential of `client_id`.
    pub fn register_credential(
        &self,
        instance: &str,
        client_id: &str,
        now: u64,
    ) -> Result<DeviceCredential, MetaError> {
        self.write(Touched::Tenant(instance), |s| {
            let t = Self::tenant_mut(s, instance)?;
            let settings = &t.instance.as_ref().expect("present").settings;
            if settings.require_group_client_id {
                let (group, _) =
                    validate::cloud_client_id(client_id, settings.max_client_id_len as usize)?;
                if !t.groups.contains_key(group) {
                    return Err(MetaError::not_found(
                        "GroupIdNotFound",
                        format!("group {group:?} does not exist"),
                    ));
                }
            } else if client_id.is_empty() {
                return Err(MetaError::invalid("ClientId: must not be empty"));
            }
            let cred = DeviceCredential {
                client_id: client_id.to_string(),
                device_access_key_id: random_id("DC.", 12),
                device_access_key_secret: format!("DC.{}", random_secret()),
                created_at: now,
                updated_at: now,
            };
            t.credentials.insert(client_id.to_string(), cred.clone());
            Ok(cred)
        })
    }

    pub fn credential(
        &self,
        instance: &str,
        client_id: &str,
    ) -> Result<DeviceCredential, MetaError> {
        self.read(|s| {
            Self::tenant(s, instance)?
                .credentials
                .get(client_id)
                .cloned()
                .ok_or_else(|| {
                    MetaError::not_found(
                        "DeviceCredentialNotFound",
                        format!("no credential for client {client_id:?}"),
                    )
                })
        })
    }

    /// A new secret for an existing credential.
    pub fn refresh_credential(
        &self,
        instance: &str,
        client_id: &str,
        now: u64,
    ) -> Result<DeviceCredential, MetaError> {
        self.write(Touched::Tenant(instance), |s| {
            let cred = Self::tenant_mut(s, instance)?
                .credentials
                .get_mut(client_id)
                .ok_or_else(|| {
                    MetaError::not_found(
                        "DeviceCredentialNotFound",
                        format!("no credential for client {client_id:?}"),
                    )
                })?;
            cred.device_access_key_secret = format!("DC.{}", random_secret());
            cred.updated_at = now;
            Ok(cred.clone())
        })
    }

    pub fn unregister_credential(&self, instance: &str, client_id: &str) -> Result<(), MetaError> {
        self.remove(
            instance,
            client_id,
            |t| &mut t.credentials,
            || {
                MetaError::not_found(
                    "DeviceCredentialNotFound",
                    format!("no credential for client {client_id:?}"),
                )
            },
        )
    }

    pub fn credential_client_ids(&self, instance: &str) -> Result<Vec<String>, MetaError> {
        self.read(|s| {
            Ok(Self::tenant(s, instance)?
                .credentials
                .keys()
                .cloned()
                .collect())
        })
    }

    // ------------------------------------------------------------------------------------
    // Tokens

    /// Issues a token. `expire_at` is absolute (ms); it must be at least 60 s away, and more
    /// than 30 days away is capped to 30 days.
    pub fn apply_token(
        &self,
        instance: &str,
        resources: Vec<String>,
        actions: TokenActions,
        expire_at: u64,
        now: u64,
    ) -> Result<Token, MetaError> {
        validate::token_resources(&resources)?;
        if expire_at < now + TOKEN_MIN_TTL_MS {
            return Err(MetaError::invalid(
                "ExpireTime: must be at least 60 seconds in the future",
            ));
        }
        let token = Token {
            token: random_secret() + &random_secret(),
            resources,
            actions,
            expire_at: expire_at.min(now + TOKEN_MAX_TTL_MS),
            created_at: now,
            revoked: false,
        };
        self.write(Touched::Tenant(instance), |s| {
            Self::tenant_mut(s, instance)?
                .tokens
                .insert(token.token.clone(), token.clone());
            Ok(token)
        })
    }

    pub fn token(&self, instance: &str, token: &str) -> Result<Token, MetaError> {
        self.read(|s| {
            Self::tenant(s, instance)?
                .tokens
                .get(token)
                .cloned()
                .ok_or_else(|| MetaError::not_found("TokenNotFound", "no such token"))
        })
    }

    pub fn revoke_token(&self, instance: &str, token: &str) -> Result<(), MetaError> {
        self.write(Touched::Tenant(instance), |s| {
            let t = Self::tenant_mut(s, instance)?
                .tokens
                .get_mut(token)
                .ok_or_else(|| MetaError::not_found("TokenNotFound", "no such token"))?;
            t.revoked = true;
            Ok(())
        })
    }

    /// Removes tokens that expired before `before`. Callers keep a grace period after expiry so
    /// that a recently expired token is still reported as expired (code 2) rather than unknown.
    pub fn purge_expired_tokens(&self, before: u64) -> usize {
        self.write(Touched::All, |s| {
            let mut n = 0;
            for t in s.tenants.values_mut() {
                let count = t.tokens.len();
                t.tokens.retain(|_, tok| tok.expire_at > before);
                n += count - t.tokens.len();
            }
            Ok(n)
        })
        .unwrap_or(0)
    }

    // ------------------------------------------------------------------------------------
    // Admin keys

    pub fn create_admin_key(&self, now: u64) -> Result<AdminKey, MetaError> {
        let key = AdminKey {
            access_key_id: random_id("FERRY", 8),
            secret: random_secret(),
            created_at: now,
        };
        self.write(Touched::Admin, |s| {
            s.admin_keys.insert(key.access_key_id.clone(), key.clone());
            Ok(())
        })?;
        Ok(key)
    }

    /// Adds an admin key loaded from disk.
    pub fn insert_admin_key(&self, key: AdminKey) -> Result<(), MetaError> {
        self.write(Touched::Admin, |s| {
            s.admin_keys.insert(key.access_key_id.clone(), key);
            Ok(())
        })
    }

    pub fn admin_keys(&self) -> Vec<AdminKey> {
        self.read(|s| s.admin_keys.values().cloned().collect())
    }

    pub fn delete_admin_key(&self, id: &str) -> Result<(), MetaError> {
        self.write(Touched::Admin, |s| {
            s.admin_keys.remove(id).map(|_| ()).ok_or_else(|| {
                MetaError::not_found(
                    "AccessKeyNotFound",
                    format!("admin key {id:?} does not exist"),
                )
            })
        })
    }

    /// The secret of an admin key, for checking request signatures.
    pub fn admin_secret(&self, id: &str) -> Option<String> {
        self.read(|s| s.admin_keys.get(id).map(|k| k.secret.clone()))
    }

    /// Checks an admin key id and secret in constant time.
    pub fn verify_admin(&self, id: &str, secret: &str) -> bool {
        self.admin_secret(id)
            .is_some_and(|s| secrets_equal(&s, secret))
    }

    // ------------------------------------------------------------------------------------
    // Authentication

    /// Checks the client id against the instance's rules (cloud: `GID_…@@@device` with an
    /// existing group).
    pub fn check_client_id(&self, instance: &str, client_id: &str) -> Result<(), AuthError> {
        self.read(|s| {
            let t = Self::tenant(s, instance).map_err(|e| AuthError::not_authorized(e.message))?;
            let settings = &t.instance.as_ref().expect("present").settings;
            if client_id.len() > settings.max_client_id_len as usize {
                return Err(AuthError::client_id("client id too long"));
            }
            if settings.require_group_client_id {
                let (group, _) =
                    validate::cloud_client_id(client_id, settings.max_client_id_len as usize)
                        .map_err(|e| AuthError::client_id(e.message))?;
                if !t.groups.contains_key(group) {
                    return Err(AuthError::client_id(format!(
                        "group {group:?} does not exist"
                    )));
                }
            }
            Ok(())
        })
    }

    /// Authenticates a CONNECT whose user name is `<Mode>|<KeyId>|<InstanceId>`. Returns
    /// `None` when the user name is not of that form (the listener's own users apply).
    pub fn authenticate(
        &self,
        username: &str,
        password: &[u8],
        client_id: &str,
        now: u64,
    ) -> Option<Result<Authenticated, AuthError>> {
        let user = match parse_username(username)? {
            Ok(u) => u,
            Err(e) => return Some(Err(e)),
        };
        Some(self.authenticate_cloud(
            user.mode,
            user.key_id,
            user.instance,
            password,
            client_id,
            now,
        ))
    }

    fn authenticate_cloud(
        &self,
        mode: AuthMode,
        key_id: &str,
        instance: &str,
        password: &[u8],
        client_id: &str,
        now: u64,
    ) -> Result<Authenticated, AuthError> {
        self.check_client_id(instance, client_id)?;
        self.read(|s| {
            let t = Self::tenant(s, instance).map_err(|e| AuthError::not_authorized(e.message))?;
            let mut out = Authenticated {
                instance: instance.to_string(),
                mode: Some(mode),
                key_id: Some(key_id.to_string()),
                permissions: Permissions::full(),
                tokens: Vec::new(),
            };
            match mode {
                AuthMode::Signature => {
                    let key = t
                        .keys
                        .get(key_id)
                        .ok_or_else(|| AuthError::bad("unknown AccessKey"))?;
                    if !verify_signature(&key.secret, client_id, password) {
                        return Err(AuthError::bad("signature mismatch"));
                    }
                    out.permissions =
                        crate::auth::key_permissions(key.permission, &key.topic_filters);
                }
                AuthMode::DeviceCredential => {
                    let cred = t
                        .credentials
                        .values()
                        .find(|c| c.device_access_key_id == key_id)
                        .ok_or_else(|| AuthError::bad("unknown device credential"))?;
                    if cred.client_id != client_id {
                        return Err(AuthError::not_authorized(
                            "the device credential belongs to another client id",
                        ));
                    }
                    if !verify_signature(&cred.device_access_key_secret, client_id, password) {
                        return Err(AuthError::bad("signature mismatch"));
                    }
                }
                AuthMode::Token => {
                    if !t.keys.contains_key(key_id) {
                        return Err(AuthError::bad("unknown AccessKey"));
                    }
                    let password = std::str::from_utf8(password)
                        .map_err(|_| AuthError::token(1, "token password is not UTF-8"))?;
                    for (kind, token) in parse_token_password(password)? {
                        let tok = Self::check_token(t, kind, token, now)?;
                        out.tokens.push(HeldToken {
                            kind,
                            token: token.to_string(),
                            expire_at: tok.expire_at,
                            resources: tok.resources.clone(),
                        });
                    }
                    out.permissions = crate::auth::token_permissions(&out.tokens);
                }
            }
            Ok(out)
        })
    }

    /// A token's validity for `kind`: codes 1 unknown, 2 expired, 3 revoked, 5 action mismatch.
    fn check_token<'a>(
        t: &'a Tenant,
        kind: TokenType,
        token: &str,
        now: u64,
    ) -> Result<&'a Token, AuthError> {
        let tok = t
            .tokens
            .get(token)
            .ok_or_else(|| AuthError::token(1, "unknown token"))?;
        if tok.revoked {
            return Err(AuthError::token(3, "token revoked"));
        }
        if tok.expire_at <= now {
            return Err(AuthError::token(2, "token expired"));
        }
        let ok = match kind {
            TokenType::R => tok.actions.read(),
            TokenType::W => tok.actions.write(),
            TokenType::RW => tok.actions == TokenActions::ReadWrite,
        };
        if !ok {
            return Err(AuthError::token(5, "token actions do not match its type"));
        }
        Ok(tok)
    }

    /// Re-checks a held token (revocation, expiry): `Err` carries the notice code.
    pub fn token_status(
        &self,
        instance: &str,
        held: &HeldToken,
        now: u64,
    ) -> Result<(), AuthError> {
        self.read(|s| {
            let t = Self::tenant(s, instance).map_err(|e| AuthError::not_authorized(e.message))?;
            Self::check_token(t, held.kind, &held.token, now).map(|_| ())
        })
    }

    /// Validates a token uploaded on `$SYS/uploadToken`: the new grant for its type.
    pub fn upload_token(
        &self,
        instance: &str,
        kind: TokenType,
        token: &str,
        now: u64,
    ) -> Result<HeldToken, AuthError> {
        self.read(|s| {
            let t = Self::tenant(s, instance).map_err(|e| AuthError::not_authorized(e.message))?;
            let tok = Self::check_token(t, kind, token, now)?;
            Ok(HeldToken {
                kind,
                token: token.to_string(),
                expire_at: tok.expire_at,
                resources: tok.resources.clone(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::hmac_sha1_base64;

    fn cloud(meta: &Meta) {
        meta.create_instance("mqtt-a", "A", Profile::Cloud, None, 0)
            .unwrap();
        meta.create_group("mqtt-a", "GID_test", 0).unwrap();
        meta.create_topic("mqtt-a", "TopicA", 0).unwrap();
    }

    #[test]
    fn secrets_and_tokens_are_plain_alphanumerics() {
        for _ in 0..200 {
            let s = random_secret();
            assert_eq!(s.len(), 32);
            assert!(s.bytes().all(|b| b.is_ascii_alphanumeric()), "{s}");
        }
    }

    #[test]
    fn resources_and_their_errors() {
        let m = Meta::new();
        cloud(&m);
        assert_eq!(
            m.create_group("mqtt-a", "GID_test", 0).unwrap_err().code,
            "GroupIdAlreadyExsited"
        );
        assert_eq!(
            m.create_topic("mqtt-a", "topica", 0).unwrap_err().code,
            "TopicAlreadyExisted"
        );
        assert_eq!(
            m.create_group("nope", "GID_test", 0).unwrap_err().code,
            "InstanceNotFound"
        );
        for i in 1..25 {
            m.create_topic("mqtt-a", &format!("T{i}"), 0).unwrap();
        }
        assert_eq!(
            m.create_topic("mqtt-a", "T25", 0).unwrap_err().code,
            "TopicCountLimit"
        );
        assert!(m.has_topic("mqtt-a", "TopicA"));
        assert!(!m.has_topic("mqtt-a", "topica"));
    }

    #[test]
    fn signature_mode() {
        let m = Meta::new();
        cloud(&m);
        let key = m
            .create_key("mqtt-a", KeyPermission::Full, vec![], 0)
            .unwrap();
        let user = format!("Signature|{}|mqtt-a", key.access_key_id);
        let good = hmac_sha1_base64(&key.secret, "GID_test@@@dev1");
        let a = m
            .authenticate(&user, good.as_bytes(), "GID_test@@@dev1", 0)
            .unwrap()
            .unwrap();
        assert_eq!(a.instance, "mqtt-a");
        let e = m
            .authenticate(&user, b"wrong", "GID_test@@@dev1", 0)
            .unwrap()
            .unwrap_err();
        assert_eq!(e.code, ferry_codec::ReasonCode::BAD_USER_NAME_OR_PASSWORD);
        let e = m
            .authenticate(&user, good.as_bytes(), "GID_other@@@dev1", 0)
            .unwrap()
            .unwrap_err();
        assert_eq!(e.code, ferry_codec::ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
        assert!(m.authenticate("plain", b"", "c", 0).is_none());
    }

    #[test]
    fn device_credential_mode() {
        let m = Meta::new();
        cloud(&m);
        let c = m
            .register_credential("mqtt-a", "GID_test@@@dev1", 0)
            .unwrap();
        assert!(c.device_access_key_id.starts_with("DC."));
        assert!(c.device_access_key_secret.starts_with("DC."));
        let user = format!("DeviceCredential|{}|mqtt-a", c.device_access_key_id);
        let pw = hmac_sha1_base64(&c.device_access_key_secret, "GID_test@@@dev1");
        assert!(m
            .authenticate(&user, pw.as_bytes(), "GID_test@@@dev1", 0)
            .unwrap()
            .is_ok());
        // Another client id may not use it.
        let pw2 = hmac_sha1_base64(&c.device_access_key_secret, "GID_test@@@dev2");
        assert!(m
            .authenticate(&user, pw2.as_bytes(), "GID_test@@@dev2", 0)
            .unwrap()
            .is_err());
        // Re-registering replaces it.
        m.register_credential("mqtt-a", "GID_test@@@dev1", 1)
            .unwrap();
        assert!(m
            .authenticate(&user, pw.as_bytes(), "GID_test@@@dev1", 0)
            .unwrap()
            .is_err());
    }

    #[test]
    fn token_mode() {
        let m = Meta::new();
        cloud(&m);
        let key = m
            .create_key("mqtt-a", KeyPermission::Full, vec![], 0)
            .unwrap();
        let now = 1_000_000;
        let r = m
            .apply_token(
                "mqtt-a",
                vec!["TopicA/#".into()],
                TokenActions::Read,
                now + 3_600_000,
                now,
            )
            .unwrap();
        let user = format!("Token|{}|mqtt-a", key.access_key_id);
        let a = m
            .authenticate(
                &user,
                format!("R|{}", r.token).as_bytes(),
                "GID_test@@@d",
                now,
            )
            .unwrap()
            .unwrap();
        assert!(a.permissions.subscribe.allows("TopicA/x"));
        assert!(!a.permissions.publish.allows("TopicA/x"));
        // W with a read-only token: action mismatch (5).
        let e = m
            .authenticate(
                &user,
                format!("W|{}", r.token).as_bytes(),
                "GID_test@@@d",
                now,
            )
            .unwrap()
            .unwrap_err();
        assert_eq!(e.token_code, Some(5));
        let e = m
            .authenticate(&user, b"R|forged", "GID_test@@@d", now)
            .unwrap()
            .unwrap_err();
        assert_eq!(e.token_code, Some(1));
        m.revoke_token("mqtt-a", &r.token).unwrap();
        let e = m
            .authenticate(
                &user,
                format!("R|{}", r.token).as_bytes(),
                "GID_test@@@d",
                now,
            )
            .unwrap()
            .unwrap_err();
        assert_eq!(e.token_code, Some(3));
        // Lifetime bounds.
        assert!(m
            .apply_token(
                "mqtt-a",
                vec!["a".into()],
                TokenActions::Read,
                now + 1000,
                now
            )
            .is_err());
        let long = m
            .apply_token(
                "mqtt-a",
                vec!["a".into()],
                TokenActions::Read,
                now + 10 * TOKEN_MAX_TTL_MS,
                now,
            )
            .unwrap();
        assert_eq!(long.expire_at, now + TOKEN_MAX_TTL_MS);
        let e = m
            .authenticate(
                &user,
                format!("R|{}", long.token).as_bytes(),
                "GID_test@@@d",
                now + TOKEN_MAX_TTL_MS,
            )
            .unwrap()
            .unwrap_err();
        assert_eq!(e.token_code, Some(2));
    }
}

#[cfg(test)]
mod store_tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Docs {
        map: Mutex<BTreeMap<String, Vec<u8>>>,
        fail: Mutex<bool>,
    }

    impl MetaStore for Docs {
        fn put(&self, key: &str, value: Vec<u8>) -> Result<(), String> {
            if *self.fail.lock().unwrap() {
                return Err("disk full".into());
            }
            self.map.lock().unwrap().insert(key.to_string(), value);
            Ok(())
        }
        fn delete(&self, key: &str) -> Result<(), String> {
            self.map.lock().unwrap().remove(key);
            Ok(())
        }
        fn load(&self) -> Result<Vec<(String, Vec<u8>)>, String> {
            Ok(self.map.lock().unwrap().clone().into_iter().collect())
        }
    }

    #[test]
    fn everything_survives_a_reload_secrets_included() {
        let docs = Arc::new(Docs::default());
        let m = Meta::with_store(docs.clone()).unwrap();
        m.create_instance("mqtt-a", "A", Profile::Cloud, None, 1)
            .unwrap();
        m.create_group("mqtt-a", "GID_test", 1).unwrap();
        m.create_topic("mqtt-a", "TopicA", 1).unwrap();
        let key = m
            .create_key("mqtt-a", KeyPermission::PubOnly, vec!["TopicA/#".into()], 1)
            .unwrap();
        let cred = m.register_credential("mqtt-a", "GID_test@@@d", 1).unwrap();
        let tok = m
            .apply_token(
                "mqtt-a",
                vec!["TopicA/#".into()],
                TokenActions::Read,
                10_000_000,
                1,
            )
            .unwrap();
        m.revoke_token("mqtt-a", &tok.token).unwrap();
        let admin = m.create_admin_key(1).unwrap();

        let again = Meta::with_store(docs.clone()).unwrap();
        assert_eq!(again.instance("mqtt-a").unwrap().profile, Profile::Cloud);
        assert_eq!(again.groups("mqtt-a").unwrap().len(), 1);
        assert!(again.has_topic("mqtt-a", "TopicA"));
        assert_eq!(again.keys("mqtt-a").unwrap()[0].secret, key.secret);
        assert_eq!(
            again
                .credential("mqtt-a", "GID_test@@@d")
                .unwrap()
                .device_access_key_secret,
            cred.device_access_key_secret
        );
        assert!(again.token("mqtt-a", &tok.token).unwrap().revoked);
        assert!(again.verify_admin(&admin.access_key_id, &admin.secret));
        again.delete_instance("mqtt-a").unwrap();
        let third = Meta::with_store(docs).unwrap();
        assert!(third.instance("mqtt-a").is_err());
        assert!(third.verify_admin(&admin.access_key_id, &admin.secret));
    }

    #[test]
    fn a_refused_write_changes_nothing() {
        let docs = Arc::new(Docs::default());
        let m = Meta::with_store(docs.clone()).unwrap();
        m.create_instance("mqtt-a", "A", Profile::Standard, None, 1)
            .unwrap();
        *docs.fail.lock().unwrap() = true;
        let e = m.create_group("mqtt-a", "GID_test", 1).unwrap_err();
        assert_eq!(e.http_status(), 500);
        assert!(m.groups("mqtt-a").unwrap().is_empty(), "undone in memory");
        assert!(m.create_admin_key(1).is_err());
        assert!(m.admin_keys().is_empty());
        *docs.fail.lock().unwrap() = false;
        m.create_group("mqtt-a", "GID_test", 1).unwrap();
    }
}
