//! The TOML configuration file and its mapping onto the runtime's [`ferry_broker::Config`].

use anyhow::{bail, Context, Result};
use ferry_broker::{Authenticator, User};
use ferry_codec::QoS;
use ferry_core::{Acl, AclAction, AclRule};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub log_level: Option<String>,
    /// Where Ferry keeps its files (the store, the admin key, the API endpoint for `ferry ctl`).
    pub data_dir: Option<std::path::PathBuf>,
    /// `sync` (default): QoS 1/2 messages for persistent sessions and retained messages are
    /// acknowledged only once on disk. `async`: acknowledged once handed to the operating
    /// system, before it reaches the disk — faster, and a machine crash can lose the last
    /// moments of acknowledged messages.
    pub durability: Option<String>,
    #[serde(default)]
    pub api: Api,
    /// Instances to create at start if they do not exist yet (the default one always is).
    #[serde(default)]
    pub instances: Vec<InstanceFile>,
    #[serde(default)]
    pub mqtt: Mqtt,
    #[serde(default)]
    pub auth: Auth,
    #[serde(default)]
    pub acl: AclFile,
    /// The embedded RocketMQ-5-compatible queue (gRPC).
    #[serde(default)]
    pub queue: QueueFile,
}

/// `[queue]`: the embedded server-side queue, speaking the RocketMQ 5 gRPC protocol.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueFile {
    pub enabled: bool,
    /// gRPC listen address; TLS and plaintext are served on the same port.
    pub listen: SocketAddr,
    /// PEM certificate and key for TLS; unset: a self-signed certificate made at start.
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    /// Whether clients without an AccessKey may use the default instance. Unset: only when
    /// the queue listener is bound to a loopback address (as `auth.allow_anonymous`).
    pub allow_anonymous: Option<bool>,
    /// How long messages are kept, acknowledged or not.
    pub retention_secs: u64,
    /// Deliveries of a message to a group before it goes to `%DLQ%<group>`.
    pub max_attempts: u32,
    /// Whether sending to or consuming from an unknown topic creates it.
    pub auto_create_topics: bool,
}

impl Default for QueueFile {
    fn default() -> Self {
        let q = ferry_queue::QueueConfig::default();
        QueueFile {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            tls_cert: None,
            tls_key: None,
            allow_anonymous: None,
            retention_secs: q.retention.as_secs(),
            max_attempts: q.max_attempts,
            auto_create_topics: q.auto_create_topics,
        }
    }
}

impl QueueFile {
    /// Checks the values and builds the queue's configuration.
    pub fn to_config(&self) -> Result<ferry_queue::QueueConfig> {
        if self.max_attempts == 0 {
            bail!("queue.max_attempts: must be at least 1");
        }
        if self.retention_secs == 0 {
            bail!("queue.retention_secs: must be at least 1");
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            bail!("queue.tls_cert and queue.tls_key: set both or neither");
        }
        Ok(ferry_queue::QueueConfig {
            retention: Duration::from_secs(self.retention_secs),
            max_attempts: self.max_attempts,
            auto_create_topics: self.auto_create_topics,
            ..ferry_queue::QueueConfig::default()
        })
    }

    pub fn tls(&self) -> Option<ferry_queue::TlsFiles> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(ferry_queue::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mqtt {
    pub listen: SocketAddr,
    /// MQTT over TLS; unset: no TLS listener.
    pub tls_listen: Option<SocketAddr>,
    /// MQTT over WebSocket, and over WebSocket over TLS; unset: none.
    pub ws_listen: Option<SocketAddr>,
    pub wss_listen: Option<SocketAddr>,
    /// The HTTP path of the WebSocket listeners.
    pub ws_path: String,
    /// PEM certificate (chain) and key of the TLS and WSS listeners; unset: a self-signed
    /// certificate for `localhost` and `127.0.0.1`, made at start.
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    pub max_connections: usize,
    pub handshake_timeout_secs: u64,
    pub max_packet_size: u32,
    pub max_keep_alive: u16,
    pub receive_maximum: u16,
    pub max_inflight: u16,
    pub max_queued_messages: usize,
    pub topic_alias_maximum: u16,
    pub max_session_expiry_secs: u32,
    pub retain_available: bool,
    pub max_qos: u8,
    pub max_client_id_len: usize,
    pub outbox_qos0_limit: usize,
    pub shutdown_grace_secs: u64,
    /// The instance of clients without a `<Mode>|<Key>|<InstanceId>` user name.
    pub default_instance: String,
    pub max_failed_logins_per_minute: u32,
}

impl Default for Mqtt {
    fn default() -> Self {
        let c = ferry_broker::Config::default();
        Mqtt {
            listen: c.listen,
            tls_listen: None,
            ws_listen: None,
            wss_listen: None,
            ws_path: c.ws_path.clone(),
            tls_cert: None,
            tls_key: None,
            max_connections: c.max_connections,
            handshake_timeout_secs: c.handshake_timeout.as_secs(),
            max_packet_size: c.limits.max_packet_size,
            max_keep_alive: c.limits.max_keep_alive,
            receive_maximum: c.limits.receive_maximum,
            max_inflight: c.limits.max_inflight,
            max_queued_messages: c.limits.max_queued_messages,
            topic_alias_maximum: c.limits.topic_alias_maximum,
            max_session_expiry_secs: c.limits.max_session_expiry,
            retain_available: c.limits.retain_available,
            max_qos: c.limits.max_qos as u8,
            max_client_id_len: c.limits.max_client_id_len,
            outbox_qos0_limit: c.outbox_qos0_limit,
            shutdown_grace_secs: c.shutdown_grace.as_secs(),
            default_instance: c.default_instance,
            max_failed_logins_per_minute: c.max_failed_logins_per_minute,
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// Whether clients without credentials may connect to the default instance. Unset: only
    /// when the MQTT listener is bound to a loopback address (as Mosquitto 2 does).
    pub allow_anonymous: Option<bool>,
    pub users: Vec<UserFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Api {
    /// REST API, cloud RPC API; `enabled = false` turns the listener off.
    pub listen: SocketAddr,
    pub enabled: bool,
}

impl Default for Api {
    fn default() -> Self {
        Api {
            listen: SocketAddr::from(([127, 0, 0, 1], 18083)),
            enabled: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceFile {
    pub id: String,
    #[serde(default)]
    pub name: String,
    /// `cloud` or `standard`.
    pub profile: ferry_meta::Profile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserFile {
    pub name: String,
    pub password: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AclFile {
    /// `allow` or `deny`: the answer when no rule applies.
    pub default: String,
    pub rules: Vec<AclRuleFile>,
}

impl Default for AclFile {
    fn default() -> Self {
        AclFile {
            default: "allow".into(),
            rules: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRuleFile {
    /// `allow` or `deny`.
    pub permission: String,
    /// `publish`, `subscribe` or `all`.
    pub action: String,
    pub filter: String,
    pub user: Option<String>,
}

fn permission(value: &str, field: &str) -> Result<bool> {
    match value {
        "allow" => Ok(true),
        "deny" => Ok(false),
        other => bail!("{field}: expected \"allow\" or \"deny\", got {other:?}"),
    }
}

impl File {
    pub fn durability(&self) -> Result<ferry_store::Durability> {
        match self.durability.as_deref() {
            None | Some("sync") => Ok(ferry_store::Durability::Sync),
            Some("async") => Ok(ferry_store::Durability::Async),
            Some(other) => bail!("durability: expected \"sync\" or \"async\", got {other:?}"),
        }
    }

    pub fn load(path: &Path) -> Result<File> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    /// Checks the values and builds the runtime configuration.
    pub fn to_runtime(&self) -> Result<ferry_broker::Config> {
        let m = &self.mqtt;
        let max_qos = match m.max_qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            2 => QoS::ExactlyOnce,
            q => bail!("mqtt.max_qos: must be 0, 1 or 2, got {q}"),
        };
        if m.max_packet_size < 64 || m.max_packet_size > ferry_codec::MAX_VARINT + 5 {
            bail!(
                "mqtt.max_packet_size: must be between 64 and 268435460 bytes, got {}",
                m.max_packet_size
            );
        }
        if m.receive_maximum == 0 {
            bail!("mqtt.receive_maximum: must be at least 1");
        }
        if m.max_inflight == 0 || m.max_inflight == u16::MAX {
            bail!("mqtt.max_inflight: must be between 1 and 65534");
        }
        if m.max_connections == 0 {
            bail!("mqtt.max_connections: must be at least 1");
        }
        ferry_meta::validate::instance_id(&m.default_instance)
            .map_err(|e| anyhow::anyhow!("mqtt.default_instance: {}", e.message))?;
        for (i, inst) in self.instances.iter().enumerate() {
            ferry_meta::validate::instance_id(&inst.id)
                .map_err(|e| anyhow::anyhow!("instances[{i}].id: {}", e.message))?;
        }
        if m.handshake_timeout_secs == 0 {
            bail!("mqtt.handshake_timeout_secs: must be at least 1");
        }
        let tls_wanted = m.tls_listen.is_some() || m.wss_listen.is_some();
        let tls_config = match (&m.tls_cert, &m.tls_key) {
            (Some(_), None) | (None, Some(_)) => {
                bail!("mqtt.tls_cert and mqtt.tls_key: set both or neither")
            }
            (Some(_), Some(_)) if !tls_wanted => bail!(
                "mqtt.tls_cert: set, but neither mqtt.tls_listen nor mqtt.wss_listen is (no TLS \
                 listener)"
            ),
            _ if !tls_wanted => None,
            (cert, key) => {
                let files =
                    cert.as_ref()
                        .zip(key.as_ref())
                        .map(|(cert, key)| ferry_queue::TlsFiles {
                            cert: cert.clone(),
                            key: key.clone(),
                        });
                Some(ferry_queue::tls_server_config(files.as_ref(), "mqtt")?)
            }
        };
        let tls_listener = |addr: Option<SocketAddr>| {
            addr.zip(tls_config.clone())
                .map(|(addr, config)| ferry_broker::TlsListener::new(addr, config))
        };
        if !m.ws_path.starts_with('/') || m.ws_path.contains(char::is_whitespace) {
            bail!(
                "mqtt.ws_path: must start with / and hold no spaces, got {:?}",
                m.ws_path
            );
        }
        // Anonymous clients by default only when every MQTT listener is on a loopback address.
        let all_loopback = [Some(m.listen), m.tls_listen, m.ws_listen, m.wss_listen]
            .into_iter()
            .flatten()
            .all(|a| a.ip().is_loopback());
        let mut rules = Vec::with_capacity(self.acl.rules.len());
        for (i, r) in self.acl.rules.iter().enumerate() {
            let field = format!("acl.rules[{i}]");
            let action = match r.action.as_str() {
                "publish" => AclAction::Publish,
                "subscribe" => AclAction::Subscribe,
                "all" => AclAction::All,
                other => bail!(
                    "{field}.action: expected \"publish\", \"subscribe\" or \"all\", got {other:?}"
                ),
            };
            ferry_core::topic::validate_filter(&r.filter).map_err(|e| {
                anyhow::anyhow!(
                    "{field}.filter: {:?} is not a valid topic filter: {e}",
                    r.filter
                )
            })?;
            rules.push(AclRule {
                allow: permission(&r.permission, &format!("{field}.permission"))?,
                action,
                filter: r.filter.clone(),
                user: r.user.clone(),
            });
        }
        let acl = Acl {
            rules,
            default_allow: permission(&self.acl.default, "acl.default")?,
        };
        let defaults = ferry_broker::Config::default();
        Ok(ferry_broker::Config {
            listen: m.listen,
            tls: tls_listener(m.tls_listen),
            ws: m.ws_listen,
            wss: tls_listener(m.wss_listen),
            ws_path: m.ws_path.clone(),
            limits: ferry_core::Limits {
                max_packet_size: m.max_packet_size,
                max_keep_alive: m.max_keep_alive,
                receive_maximum: m.receive_maximum,
                max_inflight: m.max_inflight,
                max_queued_messages: m.max_queued_messages,
                topic_alias_maximum: m.topic_alias_maximum,
                max_session_expiry: m.max_session_expiry_secs,
                retain_available: m.retain_available,
                max_qos,
                max_client_id_len: m.max_client_id_len,
                ..ferry_core::Limits::default()
            },
            acl,
            auth: Authenticator {
                allow_anonymous: self.auth.allow_anonymous.unwrap_or(all_loopback),
                users: self
                    .auth
                    .users
                    .iter()
                    .map(|u| User {
                        name: u.name.clone(),
                        password: u.password.clone(),
                    })
                    .collect(),
            },
            handshake_timeout: Duration::from_secs(m.handshake_timeout_secs),
            max_connections: m.max_connections,
            outbox_qos0_limit: m.outbox_qos0_limit,
            router_queue: defaults.router_queue,
            shutdown_grace: Duration::from_secs(m.shutdown_grace_secs),
            default_instance: m.default_instance.clone(),
            max_failed_logins_per_minute: m.max_failed_logins_per_minute,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_build() {
        let c = File::default().to_runtime().unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:1883");
        assert_eq!(c.limits.max_packet_size, 1024 * 1024);
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
    }

    #[test]
    fn acl_and_limits_parse() {
        let f: File = toml::from_str(
            r#"
            [mqtt]
            listen = "127.0.0.1:0"
            max_keep_alive = 60
            [[acl.rules]]
            permission = "deny"
            action = "subscribe"
            filter = "test/nosubscribe"
            "#,
        )
        .unwrap();
        let c = f.to_runtime().unwrap();
        assert_eq!(c.limits.max_keep_alive, 60);
        assert!(!c
            .acl
            .check(None, ferry_core::Action::Subscribe, "test/nosubscribe"));
        assert!(c
            .acl
            .check(None, ferry_core::Action::Publish, "test/nosubscribe"));
    }

    #[test]
    fn bad_values_name_the_field() {
        let f: File = toml::from_str("[mqtt]\nmax_qos = 3\n").unwrap();
        let e = f.to_runtime().unwrap_err().to_string();
        assert!(e.contains("mqtt.max_qos"), "{e}");
        let f: File = toml::from_str(
            "[[acl.rules]]\npermission = \"maybe\"\naction = \"all\"\nfilter = \"a\"\n",
        )
        .unwrap();
        let e = f.to_runtime().unwrap_err().to_string();
        assert!(e.contains("acl.rules[0].permission"), "{e}");
        let f: File = toml::from_str(
            "[[acl.rules]]\npermission = \"deny\"\naction = \"all\"\nfilter = \"a/#/b\"\n",
        )
        .unwrap();
        assert!(f
            .to_runtime()
            .unwrap_err()
            .to_string()
            .contains("acl.rules[0].filter"));
        assert!(toml::from_str::<File>("[mqtt]\nlisten_port = 1\n").is_err());
    }

    #[test]
    fn the_tls_listener_is_checked_and_built() {
        let err = |toml: &str| {
            let f: File = toml::from_str(toml).unwrap();
            f.to_runtime().unwrap_err().to_string()
        };
        let e = err("[mqtt]\ntls_listen = \"127.0.0.1:0\"\ntls_cert = \"c.pem\"\n");
        assert!(
            e.contains("mqtt.tls_cert and mqtt.tls_key: set both"),
            "{e}"
        );
        let e = err("[mqtt]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n");
        assert!(
            e.contains("neither mqtt.tls_listen nor mqtt.wss_listen"),
            "{e}"
        );
        let e = err("[mqtt]\nws_listen = \"127.0.0.1:0\"\nws_path = \"mqtt\"\n");
        assert!(e.contains("mqtt.ws_path"), "{e}");
        let e = err(concat!(
            "[mqtt]\ntls_listen = \"127.0.0.1:0\"\n",
            "tls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/nonexistent/k.pem\"\n"
        ));
        assert!(e.contains("mqtt.tls_cert /nonexistent/c.pem"), "{e}");

        // No certificate: a self-signed one. Anonymous clients stay allowed only while every
        // listener is on loopback.
        let f: File = toml::from_str("[mqtt]\ntls_listen = \"127.0.0.1:0\"\n").unwrap();
        let c = f.to_runtime().unwrap();
        assert!(c.tls.is_some());
        assert!(c.auth.allow_anonymous);
        let f: File = toml::from_str("[mqtt]\ntls_listen = \"0.0.0.0:8883\"\n").unwrap();
        assert!(!f.to_runtime().unwrap().auth.allow_anonymous);
        let f: File = toml::from_str("[mqtt]\nws_listen = \"0.0.0.0:8083\"\n").unwrap();
        assert!(!f.to_runtime().unwrap().auth.allow_anonymous);
        let f: File = toml::from_str("[mqtt]\nwss_listen = \"127.0.0.1:0\"\n").unwrap();
        let c = f.to_runtime().unwrap();
        assert!(c.wss.is_some() && c.tls.is_none() && c.ws.is_none());
        assert_eq!(c.ws_path, "/mqtt");
        assert!(File::default().to_runtime().unwrap().tls.is_none());
    }
}
