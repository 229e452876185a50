//! The resources of the product contract (§1).

use serde::{Deserialize, Serialize};

/// `cloud` enforces the cloud service's naming rules and limits; `standard` behaves like a
/// plain MQTT broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    Cloud,
    Standard,
}

/// Per-instance limits and switches. A profile only chooses the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InstanceSettings {
    /// Topics must start with a created parent topic and follow the naming rules.
    pub require_parent_topic: bool,
    /// Client ids must be `<GroupID>@@@<DeviceID>` with an existing group.
    pub require_group_client_id: bool,
    pub max_parent_topics: u32,
    /// Whole topic length bounds (parent + sub-levels), when `require_parent_topic`.
    pub topic_min_len: u32,
    pub topic_max_len: u32,
    /// Subscriptions per client; 0 = unlimited.
    pub max_subscriptions_per_client: u32,
    /// Largest PUBLISH payload in bytes; 0 = only the packet limit applies.
    pub max_payload_size: u32,
    pub max_packet_size: u32,
    /// Keep-alive ceiling in seconds; 0 = none.
    pub max_keep_alive: u16,
    pub max_client_id_len: u32,
    /// `<parent>/p2p/<clientId>` reaches that client only, without a subscription.
    pub p2p: bool,
    /// Seconds a queued message waits for an offline persistent session before it is dropped;
    /// 0 = until the session ends.
    pub offline_retention_secs: u64,
    /// Queued messages kept for offline persistent sessions, all of the instance's together;
    /// beyond it the oldest are evicted (counted, and an alarm event is raised).
    pub max_offline_messages: u64,
}

impl InstanceSettings {
    pub fn for_profile(profile: Profile) -> Self {
        match profile {
            Profile::Cloud => InstanceSettings {
                require_parent_topic: true,
                require_group_client_id: true,
                max_parent_topics: 25,
                topic_min_len: 3,
                topic_max_len: 64,
                max_subscriptions_per_client: 30,
                max_payload_size: 64 * 1024,
                max_packet_size: 128 * 1024,
                max_keep_alive: 480,
                max_client_id_len: 64,
                p2p: true,
                offline_retention_secs: 3 * 24 * 3600,
                max_offline_messages: 1_000_000,
            },
            Profile::Standard => InstanceSettings {
                require_parent_topic: false,
                require_group_client_id: false,
                max_parent_topics: 25,
                topic_min_len: 1,
                topic_max_len: 65_535,
                max_subscriptions_per_client: 0,
                max_payload_size: 0,
                max_packet_size: 1024 * 1024,
                max_keep_alive: 0,
                max_client_id_len: 65_535,
                p2p: false,
                offline_retention_secs: 3 * 24 * 3600,
                max_offline_messages: 1_000_000,
            },
        }
    }
}

impl Default for InstanceSettings {
    fn default() -> Self {
        Self::for_profile(Profile::Standard)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub name: String,
    pub profile: Profile,
    pub settings: InstanceSettings,
    pub created_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentTopic {
    pub name: String,
    pub created_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub group_id: String,
    pub created_at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyPermission {
    Full,
    PubOnly,
    SubOnly,
}

/// An instance AccessKey. The secret is needed on the server to check HMAC passwords; it is
/// shown once at creation and never listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessKey {
    pub access_key_id: String,
    #[serde(skip_serializing, default)]
    pub secret: String,
    pub permission: KeyPermission,
    /// Topic filters the key is narrowed to; empty = the whole instance.
    pub topic_filters: Vec<String>,
    pub created_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCredential {
    pub client_id: String,
    pub device_access_key_id: String,
    #[serde(skip_serializing, default)]
    pub device_access_key_secret: String,
    pub created_at: u64,
    pub updated_at: u64,
}

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenActions {
    #[serde(rename = "R")]
    Read,
    #[serde(rename = "W")]
    Write,
    #[serde(rename = "R,W")]
    ReadWrite,
}

impl TokenActions {
    pub fn parse(s: &str) -> Option<TokenActions> {
        match s.replace(' ', "").as_str() {
            "R" => Some(TokenActions::Read),
            "W" => Some(TokenActions::Write),
            "R,W" | "W,R" | "RW" => Some(TokenActions::ReadWrite),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            TokenActions::Read => "R",
            TokenActions::Write => "W",
            TokenActions::ReadWrite => "R,W",
        }
    }
    pub fn read(self) -> bool {
        self != TokenActions::Write
    }
    pub fn write(self) -> bool {
        self != TokenActions::Read
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub token: String,
    /// Topic filters (`+` / `#` allowed), at most 100.
    pub resources: Vec<String>,
    pub actions: TokenActions,
    pub expire_at: u64,
    pub created_at: u64,
    pub revoked: bool,
}

/// An account-level admin key: signs cloud RPC calls and authenticates REST calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminKey {
    pub access_key_id: String,
    #[serde(skip_serializing, default)]
    pub secret: String,
    pub created_at: u64,
}

/// What a rule connects (§6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleType {
    /// Queue topic → MQTT parent topic.
    Inflow,
    /// MQTT parent topic → queue topic.
    Outflow,
    /// Status events of a Group ID's clients → queue topic.
    Status,
}

impl RuleType {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleType::Inflow => "inflow",
            RuleType::Outflow => "outflow",
            RuleType::Status => "status",
        }
    }
}

/// An external RocketMQ 5 endpoint a rule targets (outflow, status) or sources (inflow) instead
/// of the embedded queue. The secret is write-only: it is stored, never shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteEndpoint {
    /// `host:port` of the RocketMQ 5 gRPC endpoint (plaintext).
    pub endpoint: String,
    /// AccessKey id; absent = anonymous.
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default, skip_serializing)]
    pub access_key_secret: String,
    /// The namespace (`x-mq-namespace`); empty = the server's default.
    #[serde(default)]
    pub namespace: String,
}

/// A rule (§6.2). `source` and `target` mean, by type: inflow = queue topic → parent topic;
/// outflow = parent topic → queue topic; status = Group ID → queue topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub name: String,
    #[serde(rename = "type")]
    pub rule_type: RuleType,
    pub source: String,
    pub target: String,
    /// Inflow only: the queue tag filter (`*` or `a||b`).
    pub tag_filter: String,
    pub enabled: bool,
    /// The external RocketMQ the queue side is on; `None` = the embedded queue.
    pub remote: Option<RemoteEndpoint>,
    pub created_at: u64,
}
