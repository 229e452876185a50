//! `ferry ctl`: the command-line client of the management REST API (`/api/v1`).
//!
//! Every command is one HTTP call. Human output is an aligned table (lists) or `key: value`
//! lines (single resources); `--json` prints the API's JSON document as it came. Any failure
//! is one line on stderr starting with `error:` and exit code 1 (usage errors exit with 2, as
//! clap does).

use crate::datadir;
use anyhow::{anyhow, Result};
use base64::Engine as _;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Map, Value};
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::time::Duration;

const DEFAULT_API: &str = "http://127.0.0.1:18083";

#[derive(Args)]
#[command(
    about = "Manage a running Ferry through its REST API",
    long_about = "Manage a running Ferry through its REST API.\n\n\
        The API URL comes from --api, else FERRY_API, else <data-dir>/api-endpoint (written by \
        `ferry serve`), else http://127.0.0.1:18083. The admin key comes from --key-id and \
        --key-secret (or FERRY_KEY_ID / FERRY_KEY_SECRET), else <data-dir>/admin-key.json."
)]
pub struct CtlArgs {
    /// API base URL, e.g. http://127.0.0.1:18083.
    #[arg(long, env = "FERRY_API", global = true, value_name = "URL")]
    api: Option<String>,
    /// Data directory of the local `ferry serve` (default ./ferry-data).
    #[arg(long, env = "FERRY_DATA_DIR", global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Admin AccessKeyId (instead of the data directory's admin key).
    #[arg(long, env = "FERRY_KEY_ID", global = true, value_name = "ID")]
    key_id: Option<String>,
    /// Admin AccessKeySecret (with --key-id).
    #[arg(
        long,
        env = "FERRY_KEY_SECRET",
        global = true,
        value_name = "SECRET",
        hide_env_values = true
    )]
    key_secret: Option<String>,
    /// Print the API's JSON response instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Instance to act on.
    #[arg(
        short,
        long,
        env = "FERRY_INSTANCE",
        global = true,
        default_value = "default",
        value_name = "ID"
    )]
    instance: String,
    #[command(subcommand)]
    resource: Resource,
}

#[derive(Subcommand)]
enum Resource {
    /// Instances (tenants).
    #[command(subcommand)]
    Instances(InstanceCmd),
    /// Parent topics of an instance.
    #[command(subcommand)]
    Topics(TopicCmd),
    /// Group IDs of an instance.
    #[command(subcommand)]
    Groups(GroupCmd),
    /// AccessKeys of an instance (for Signature and Token mode logins).
    #[command(subcommand)]
    Keys(KeyCmd),
    /// Device credentials (DeviceCredential mode logins).
    #[command(subcommand)]
    Credentials(CredentialCmd),
    /// Tokens (Token mode logins).
    #[command(subcommand)]
    Tokens(TokenCmd),
    /// Connected and persisted clients.
    #[command(subcommand)]
    Clients(ClientCmd),
    /// How many clients subscribe to a topic.
    Subscribers {
        /// Topic name (no wildcards).
        topic: String,
    },
    /// Publish a message as the server.
    Publish(PublishArgs),
    /// Admin keys (they authenticate API calls).
    #[command(subcommand)]
    AdminKeys(AdminKeyCmd),
    /// Rules between MQTT and the server-side queue (inflow, outflow, status).
    #[command(subcommand)]
    Rules(RuleCmd),
    /// The instance's alarm events (e.g. offline messages evicted at its cap).
    Alarms,
    /// The broker's counters, all instances (`/metrics`, Prometheus text format; with --json,
    /// one object of series and values).
    Metrics,
}

#[derive(Clone, Copy, ValueEnum)]
enum RuleTypeArg {
    /// Queue topic → MQTT parent topic.
    Inflow,
    /// MQTT parent topic → queue topic.
    Outflow,
    /// Status events of a Group ID's clients → queue topic.
    Status,
}

#[derive(Subcommand)]
enum RuleCmd {
    /// List rules.
    List,
    /// Show one rule.
    Show { name: String },
    /// Create a rule: inflow SOURCE = queue topic, TARGET = parent topic; outflow SOURCE =
    /// parent topic, TARGET = queue topic; status SOURCE = Group ID, TARGET = queue topic.
    Create {
        name: String,
        #[arg(long = "type", value_enum)]
        rule_type: RuleTypeArg,
        #[arg(long)]
        source: String,
        #[arg(long)]
        target: String,
        /// Inflow only: queue tag filter, `*` (default) or `a||b`.
        #[arg(long)]
        tag_filter: Option<String>,
        /// Create it disabled.
        #[arg(long)]
        disabled: bool,
        /// An external RocketMQ 5 endpoint (host:port) instead of the embedded queue.
        #[arg(long)]
        remote_endpoint: Option<String>,
        /// The external endpoint's AccessKey id.
        #[arg(long, requires = "remote_endpoint")]
        remote_key_id: Option<String>,
        /// The external endpoint's AccessKey secret.
        #[arg(long, requires = "remote_key_id")]
        remote_key_secret: Option<String>,
        /// The external endpoint's namespace.
        #[arg(long, requires = "remote_endpoint")]
        remote_namespace: Option<String>,
    },
    /// Turn a rule on.
    Enable { name: String },
    /// Turn a rule off.
    Disable { name: String },
    /// Delete a rule.
    Delete { name: String },
}

#[derive(Clone, Copy, ValueEnum)]
enum ProfileArg {
    Cloud,
    Standard,
}

#[derive(Subcommand)]
enum InstanceCmd {
    /// List instances.
    List,
    /// Show one instance with its settings.
    Show { id: String },
    /// Create an instance.
    Create {
        /// Instance id: 3-64 characters of a-z, 0-9 and '-'.
        id: String,
        /// Display name (default: the id).
        #[arg(long)]
        name: Option<String>,
        /// Defaults for limits and naming rules.
        #[arg(long, value_enum, default_value = "standard")]
        profile: ProfileArg,
        /// Override a setting, e.g. --set max_subscriptions_per_client=50 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_setting)]
        settings: Vec<(String, Value)>,
    },
    /// Change settings of an instance (a running instance keeps its limits until restart).
    Update {
        id: String,
        /// A setting, e.g. --set p2p=true (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_setting, required = true)]
        settings: Vec<(String, Value)>,
    },
    /// Delete an instance.
    Delete { id: String },
}

#[derive(Subcommand)]
enum TopicCmd {
    /// List parent topics.
    List,
    /// Create a parent topic.
    Create { name: String },
    /// Delete a parent topic.
    Delete { name: String },
}

#[derive(Subcommand)]
enum GroupCmd {
    /// List groups.
    List,
    /// Create a group (GID_ or GID- prefix, 7-64 characters).
    Create { group_id: String },
    /// Delete a group (connected clients stay until they reconnect).
    Delete { group_id: String },
    /// How many clients of the group are online.
    Online { group_id: String },
}

#[derive(Clone, Copy, ValueEnum)]
enum PermissionArg {
    Full,
    PubOnly,
    SubOnly,
}

impl PermissionArg {
    fn as_str(self) -> &'static str {
        match self {
            PermissionArg::Full => "full",
            PermissionArg::PubOnly => "pub-only",
            PermissionArg::SubOnly => "sub-only",
        }
    }
}

#[derive(Subcommand)]
enum KeyCmd {
    /// List AccessKeys (without secrets).
    List,
    /// Create an AccessKey; its secret is shown only this once.
    Create {
        #[arg(long, value_enum, default_value = "full")]
        permission: PermissionArg,
        /// Narrow the key to a topic filter (repeatable).
        #[arg(long = "filter", value_name = "FILTER")]
        filters: Vec<String>,
    },
    /// Delete an AccessKey.
    Delete { access_key_id: String },
}

#[derive(Subcommand)]
enum CredentialCmd {
    /// List the client ids that have a credential.
    List,
    /// Register (or replace) the credential of a client id; shows its secret.
    Register { client_id: String },
    /// Show the credential of a client id, secret included.
    Show { client_id: String },
    /// Give a client id's credential a new secret.
    Refresh { client_id: String },
    /// Delete the credential of a client id.
    Delete { client_id: String },
}

#[derive(Args)]
#[group(id = "expiry", required = true, multiple = false)]
struct Expiry {
    /// Lifetime in seconds (60 s to 30 days).
    #[arg(long, value_name = "SECS")]
    ttl: Option<u64>,
    /// Absolute expiry, epoch milliseconds.
    #[arg(long, value_name = "MS")]
    expire_at: Option<u64>,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Issue a token.
    Apply {
        /// A topic filter the token grants (repeatable, '+' and '#' allowed).
        #[arg(long = "resource", value_name = "FILTER", required = true)]
        resources: Vec<String>,
        /// R, W or R,W.
        #[arg(long, value_parser = parse_actions)]
        actions: String,
        #[command(flatten)]
        expiry: Expiry,
    },
    /// Show a token.
    Show { token: String },
    /// Revoke a token (clients holding it are notified and disconnected).
    Revoke { token: String },
}

#[derive(Subcommand)]
enum ClientCmd {
    /// List clients (online ones and persistent sessions).
    List,
    /// Show one client with its subscriptions.
    Show { client_id: String },
    /// Disconnect a client.
    Kick { client_id: String },
}

#[derive(Args)]
struct PublishArgs {
    topic: String,
    /// The payload (UTF-8 text, or Base64 with --base64).
    payload: String,
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    #[arg(long)]
    retain: bool,
    /// The payload argument is Base64 (for binary payloads).
    #[arg(long)]
    base64: bool,
    /// An MQTT 5 user property (repeatable).
    #[arg(long = "user-property", value_name = "KEY=VALUE", value_parser = parse_pair)]
    user_properties: Vec<(String, String)>,
}

#[derive(Subcommand)]
enum AdminKeyCmd {
    /// List admin keys (without secrets).
    List,
    /// Create an admin key; its secret is shown only this once.
    Create,
    /// Delete an admin key.
    Delete { access_key_id: String },
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// `key=value`; the value is JSON when it parses as such (numbers, booleans), else a string.
fn parse_setting(s: &str) -> Result<(String, Value), String> {
    let (k, v) = parse_pair(s)?;
    let value = serde_json::from_str(&v).unwrap_or(Value::String(v));
    Ok((k, value))
}

fn parse_actions(s: &str) -> Result<String, String> {
    match s.replace(' ', "").to_ascii_uppercase().as_str() {
        "R" => Ok("R".into()),
        "W" => Ok("W".into()),
        "R,W" | "W,R" | "RW" => Ok("R,W".into()),
        _ => Err(format!("expected R, W or R,W, got {s:?}")),
    }
}

/// Runs a `ferry ctl` command; on failure prints one `error:` line and exits with code 1.
pub fn run(args: CtlArgs) -> Result<()> {
    match execute(args) {
        Ok(text) => {
            let mut out = std::io::stdout().lock();
            // A closed pipe (`ferry ctl … | head`) is not an error worth reporting.
            let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
            Ok(())
        }
        Err(e) => {
            let line = format!("{e:#}").replace(['\n', '\r'], " ");
            eprintln!("error: {line}");
            std::process::exit(1);
        }
    }
}

struct Api {
    agent: ureq::Agent,
    base: String,
    auth: String,
}

enum Method {
    Get,
    Post,
    Patch,
    Delete,
}

impl Method {
    fn name(&self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }
}

/// A successful response: its raw body (may be empty) and the parsed JSON, if any.
struct Reply {
    raw: String,
    json: Value,
}

impl Api {
    fn new(args: &CtlArgs) -> Result<Api> {
        let data_dir = args
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(datadir::DEFAULT_DIR));
        let base = match &args.api {
            Some(url) => url.clone(),
            None => datadir::read_endpoint(&data_dir)
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| DEFAULT_API.to_string()),
        };
        let base = normalize_base(&base)?;
        let (id, secret) = match (&args.key_id, &args.key_secret) {
            (Some(id), Some(secret)) => (id.clone(), secret.clone()),
            (Some(_), None) => return Err(anyhow!("--key-id needs --key-secret too")),
            (None, Some(_)) => return Err(anyhow!("--key-secret needs --key-id too")),
            (None, None) => {
                let key = datadir::read_key(&data_dir)?;
                (key.access_key_id, key.access_key_secret)
            }
        };
        let auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
        );
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(Duration::from_secs(30)))
            .build();
        Ok(Api {
            agent: config.into(),
            base,
            auth,
        })
    }

    /// One REST call (`path` under `/api/v1`); the reply parsed as JSON.
    fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Reply> {
        let name = method.name();
        let (raw, url) = self.send(method, &format!("/api/v1{path}"), body)?;
        let json = if raw.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&raw).map_err(|e| {
                anyhow!(
                    "the API at {} answered {name} {url} with invalid JSON: {e}",
                    self.base
                )
            })?
        };
        Ok(Reply { raw, json })
    }

    /// One HTTP call to `path` (from the root); the body of a successful answer, and the URL.
    fn send(&self, method: Method, path: &str, body: Option<Value>) -> Result<(String, String)> {
        let url = format!("{}{}", self.base, path);
        let result = match (&method, body) {
            (Method::Get, _) => self
                .agent
                .get(&url)
                .header("Authorization", &self.auth)
                .header("Accept", "application/json")
                .call(),
            (Method::Delete, _) => self
                .agent
                .delete(&url)
                .header("Authorization", &self.auth)
                .header("Accept", "application/json")
                .call(),
            (Method::Post | Method::Patch, body) => {
                let req = match method {
                    Method::Patch => self.agent.patch(&url),
                    _ => self.agent.post(&url),
                };
                let req = req
                    .header("Authorization", &self.auth)
                    .header("Accept", "application/json");
                match body {
                    Some(body) => req
                        .content_type("application/json")
                        .send(body.to_string().as_bytes()),
                    None => req.send_empty(),
                }
            }
        };
        let mut response = result.map_err(|e| self.transport_error(e))?;
        let status = response.status();
        let mut raw = String::new();
        response
            .body_mut()
            .as_reader()
            .read_to_string(&mut raw)
            .map_err(|e| {
                anyhow!(
                    "cannot read the response of the Ferry API at {}: {e}",
                    self.base
                )
            })?;
        if !status.is_success() {
            return Err(api_error(status, &raw, method.name(), &url));
        }
        Ok((raw, url))
    }

    fn transport_error(&self, e: ureq::Error) -> anyhow::Error {
        let reason = match &e {
            ureq::Error::Io(io) => match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
                std::io::ErrorKind::ConnectionReset => "connection reset".to_string(),
                std::io::ErrorKind::TimedOut => "timed out".to_string(),
                _ => io.to_string(),
            },
            ureq::Error::Timeout(_) => "timed out".to_string(),
            ureq::Error::HostNotFound => "host not found".to_string(),
            other => other.to_string(),
        };
        anyhow!("cannot reach the Ferry API at {}: {reason}", self.base)
    }
}

/// The samples of a Prometheus text exposition, series (name and labels, as written) to value:
/// whole numbers as JSON integers.
fn metric_samples(text: &str) -> Map<String, Value> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.trim().rsplit_once(' ')?;
            let value = match value.parse::<u64>() {
                Ok(n) => Value::from(n),
                Err(_) => Value::from(value.parse::<f64>().ok()?),
            };
            Some((series.to_string(), value))
        })
        .collect()
}

/// `http://host:port` without a trailing slash; a bare `host:port` gets `http://`.
fn normalize_base(url: &str) -> Result<String> {
    let url = url.trim().trim_end_matches('/');
    if url.starts_with("https://") {
        return Err(anyhow!(
            "{url}: ferry ctl speaks plain HTTP only; use an http:// URL (or an SSH tunnel)"
        ));
    }
    let url = if url.starts_with("http://") {
        url.to_string()
    } else if url.contains("://") {
        return Err(anyhow!("{url}: not an http:// URL"));
    } else {
        format!("http://{url}")
    };
    // Also accept a base that already ends in /api/v1.
    Ok(url.trim_end_matches("/api/v1").to_string())
}

fn api_error(status: ureq::http::StatusCode, raw: &str, method: &str, url: &str) -> anyhow::Error {
    if let Ok(v) = serde_json::from_str::<Value>(raw) {
        let code = v.get("code").and_then(Value::as_str);
        let message = v.get("message").and_then(Value::as_str);
        if code.is_some() || message.is_some() {
            return anyhow!(
                "{}: {} (HTTP {})",
                code.unwrap_or("Error"),
                message.unwrap_or("(no message)"),
                status.as_u16()
            );
        }
    }
    let reason = status.canonical_reason().unwrap_or("");
    let body = raw.trim();
    let body = if body.is_empty() {
        String::new()
    } else {
        format!(": {}", truncate(body, 200))
    };
    anyhow!("HTTP {} {reason} for {method} {url}{body}", status.as_u16())
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Percent-encodes one path segment or query value (everything but RFC 3986 unreserved).
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'@') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn execute(args: CtlArgs) -> Result<String> {
    let api = Api::new(&args)?;
    let json = args.json;
    let inst = format!("/instances/{}", enc(&args.instance));
    let mut out = Out::default();
    // Each arm makes one call and renders its reply (or, with --json, prints it as is).
    let (reply, show_reply): (Reply, Render) = match args.resource {
        Resource::Instances(cmd) => match cmd {
            InstanceCmd::List => (
                api.call(Method::Get, "/instances", None)?,
                Box::new(|o, v| {
                    o.table(
                        v,
                        &[
                            ("ID", "id"),
                            ("NAME", "name"),
                            ("PROFILE", "profile"),
                            ("CREATED", "created_at"),
                        ],
                    )
                }),
            ),
            InstanceCmd::Show { id } => (
                api.call(Method::Get, &format!("/instances/{}", enc(&id)), None)?,
                Box::new(|o, v| o.instance(v)),
            ),
            InstanceCmd::Create {
                id,
                name,
                profile,
                settings,
            } => {
                let mut body = json!({
                    "id": id,
                    "profile": match profile { ProfileArg::Cloud => "cloud", ProfileArg::Standard => "standard" },
                });
                if let Some(name) = name {
                    body["name"] = Value::String(name);
                }
                if !settings.is_empty() {
                    body["settings"] = Value::Object(settings.into_iter().collect());
                }
                (
                    api.call(Method::Post, "/instances", Some(body))?,
                    Box::new(|o, v| o.instance(v)),
                )
            }
            InstanceCmd::Update { id, settings } => {
                let body = json!({ "settings": Value::Object(settings.into_iter().collect::<Map<_, _>>()) });
                (
                    api.call(
                        Method::Patch,
                        &format!("/instances/{}", enc(&id)),
                        Some(body),
                    )?,
                    Box::new(|o, v| {
                        o.instance(v);
                        o.note("note: a running instance keeps its current limits until Ferry restarts");
                    }),
                )
            }
            InstanceCmd::Delete { id } => (
                api.call(Method::Delete, &format!("/instances/{}", enc(&id)), None)?,
                Box::new(move |o, _| o.line(format!("deleted instance {id}"))),
            ),
        },
        Resource::Topics(cmd) => match cmd {
            TopicCmd::List => (
                api.call(Method::Get, &format!("{inst}/topics"), None)?,
                Box::new(|o, v| o.table(v, &[("NAME", "name"), ("CREATED", "created_at")])),
            ),
            TopicCmd::Create { name } => (
                api.call(
                    Method::Post,
                    &format!("{inst}/topics"),
                    Some(json!({ "name": name })),
                )?,
                Box::new(move |o, _| o.line(format!("created parent topic {name}"))),
            ),
            TopicCmd::Delete { name } => (
                api.call(
                    Method::Delete,
                    &format!("{inst}/topics/{}", enc(&name)),
                    None,
                )?,
                Box::new(move |o, _| o.line(format!("deleted parent topic {name}"))),
            ),
        },
        Resource::Groups(cmd) => match cmd {
            GroupCmd::List => (
                api.call(Method::Get, &format!("{inst}/groups"), None)?,
                Box::new(|o, v| o.table(v, &[("GROUP_ID", "group_id"), ("CREATED", "created_at")])),
            ),
            GroupCmd::Create { group_id } => (
                api.call(
                    Method::Post,
                    &format!("{inst}/groups"),
                    Some(json!({ "group_id": group_id })),
                )?,
                Box::new(move |o, _| o.line(format!("created group {group_id}"))),
            ),
            GroupCmd::Delete { group_id } => (
                api.call(
                    Method::Delete,
                    &format!("{inst}/groups/{}", enc(&group_id)),
                    None,
                )?,
                Box::new(move |o, _| o.line(format!("deleted group {group_id}"))),
            ),
            GroupCmd::Online { group_id } => (
                api.call(
                    Method::Get,
                    &format!("{inst}/groups/{}/online", enc(&group_id)),
                    None,
                )?,
                Box::new(|o, v| {
                    o.fields(
                        v,
                        &[("group_id", "group_id"), ("online_count", "online_count")],
                    )
                }),
            ),
        },
        Resource::Keys(cmd) => match cmd {
            KeyCmd::List => (
                api.call(Method::Get, &format!("{inst}/keys"), None)?,
                Box::new(|o, v| {
                    o.table(
                        v,
                        &[
                            ("ACCESS_KEY_ID", "access_key_id"),
                            ("PERMISSION", "permission"),
                            ("TOPIC_FILTERS", "topic_filters"),
                            ("CREATED", "created_at"),
                        ],
                    )
                }),
            ),
            KeyCmd::Create {
                permission,
                filters,
            } => (
                api.call(
                    Method::Post,
                    &format!("{inst}/keys"),
                    Some(json!({ "permission": permission.as_str(), "topic_filters": filters })),
                )?,
                Box::new(|o, v| {
                    o.fields(
                        v,
                        &[
                            ("access_key_id", "access_key_id"),
                            ("access_key_secret", "access_key_secret"),
                            ("permission", "permission"),
                            ("topic_filters", "topic_filters"),
                            ("created_at", "created_at"),
                        ],
                    );
                    o.note("note: the secret is shown only this once; keep it safe");
                }),
            ),
            KeyCmd::Delete { access_key_id } => (
                api.call(
                    Method::Delete,
                    &format!("{inst}/keys/{}", enc(&access_key_id)),
                    None,
                )?,
                Box::new(move |o, _| o.line(format!("deleted AccessKey {access_key_id}"))),
            ),
        },
        Resource::Credentials(cmd) => {
            let show: fn(&mut Out, &Value) = |o, v| {
                o.fields(
                    v,
                    &[
                        ("client_id", "client_id"),
                        ("device_access_key_id", "device_access_key_id"),
                        ("device_access_key_secret", "device_access_key_secret"),
                        ("created_at", "created_at"),
                        ("updated_at", "updated_at"),
                    ],
                )
            };
            match cmd {
                CredentialCmd::List => (
                    api.call(Method::Get, &format!("{inst}/credentials"), None)?,
                    Box::new(|o, v| {
                        o.line("CLIENT_ID".to_string());
                        for id in v
                            .get("client_ids")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                        {
                            o.line(render(id, ""));
                        }
                    }),
                ),
                CredentialCmd::Register { client_id } => (
                    api.call(
                        Method::Post,
                        &format!("{inst}/credentials"),
                        Some(json!({ "client_id": client_id })),
                    )?,
                    Box::new(show),
                ),
                CredentialCmd::Show { client_id } => (
                    api.call(
                        Method::Get,
                        &format!("{inst}/credentials/{}", enc(&client_id)),
                        None,
                    )?,
                    Box::new(show),
                ),
                CredentialCmd::Refresh { client_id } => (
                    api.call(
                        Method::Post,
                        &format!("{inst}/credentials/{}/refresh", enc(&client_id)),
                        None,
                    )?,
                    Box::new(show),
                ),
                CredentialCmd::Delete { client_id } => (
                    api.call(
                        Method::Delete,
                        &format!("{inst}/credentials/{}", enc(&client_id)),
                        None,
                    )?,
                    Box::new(move |o, _| o.line(format!("deleted the credential of {client_id}"))),
                ),
            }
        }
        Resource::Tokens(cmd) => {
            let show: fn(&mut Out, &Value) = |o, v| {
                o.fields(
                    v,
                    &[
                        ("token", "token"),
                        ("resources", "resources"),
                        ("actions", "actions"),
                        ("expire_at", "expire_at"),
                        ("created_at", "created_at"),
                        ("revoked", "revoked"),
                    ],
                )
            };
            match cmd {
                TokenCmd::Apply {
                    resources,
                    actions,
                    expiry,
                } => {
                    let mut body = json!({ "resources": resources, "actions": actions });
                    if let Some(ttl) = expiry.ttl {
                        body["ttl_secs"] = json!(ttl);
                    }
                    if let Some(at) = expiry.expire_at {
                        body["expire_at"] = json!(at);
                    }
                    (
                        api.call(Method::Post, &format!("{inst}/tokens"), Some(body))?,
                        Box::new(show),
                    )
                }
                TokenCmd::Show { token } => (
                    api.call(Method::Get, &format!("{inst}/tokens/{}", enc(&token)), None)?,
                    Box::new(show),
                ),
                TokenCmd::Revoke { token } => (
                    api.call(
                        Method::Delete,
                        &format!("{inst}/tokens/{}", enc(&token)),
                        None,
                    )?,
                    Box::new(|o, _| o.line("revoked the token".to_string())),
                ),
            }
        }
        Resource::Clients(cmd) => match cmd {
            ClientCmd::List => (
                api.call(Method::Get, &format!("{inst}/clients"), None)?,
                Box::new(|o, v| {
                    o.table(
                        v,
                        &[
                            ("CLIENT_ID", "client_id"),
                            ("ONLINE", "online"),
                            ("ADDRESS", "address"),
                            ("PROTOCOL", "protocol_level"),
                            ("LAST_ACTIVITY", "last_activity"),
                            ("SUBSCRIPTIONS", "subscriptions"),
                            ("INFLIGHT", "inflight"),
                            ("QUEUED", "queued"),
                        ],
                    )
                }),
            ),
            ClientCmd::Show { client_id } => (
                api.call(
                    Method::Get,
                    &format!("{inst}/clients/{}", enc(&client_id)),
                    None,
                )?,
                Box::new(|o, v| o.client(v)),
            ),
            ClientCmd::Kick { client_id } => (
                api.call(
                    Method::Delete,
                    &format!("{inst}/clients/{}", enc(&client_id)),
                    None,
                )?,
                Box::new(move |o, v| {
                    if v.get("kicked").and_then(Value::as_bool) == Some(true) {
                        o.line(format!("kicked {client_id}"))
                    } else {
                        o.line(format!("{client_id} was not connected"))
                    }
                }),
            ),
        },
        Resource::Subscribers { topic } => (
            api.call(
                Method::Get,
                &format!("{inst}/subscribers?topic={}", enc(&topic)),
                None,
            )?,
            Box::new(|o, v| {
                o.fields(
                    v,
                    &[("topic", "topic"), ("subscriber_count", "subscriber_count")],
                )
            }),
        ),
        Resource::Publish(p) => {
            let mut body = json!({ "topic": p.topic, "qos": p.qos, "retain": p.retain });
            if p.base64 {
                body["payload_base64"] = Value::String(p.payload);
            } else {
                body["payload"] = Value::String(p.payload);
            }
            if !p.user_properties.is_empty() {
                body["user_properties"] = Value::Object(
                    p.user_properties
                        .into_iter()
                        .map(|(k, v)| (k, Value::String(v)))
                        .collect(),
                );
            }
            (
                api.call(Method::Post, &format!("{inst}/messages"), Some(body))?,
                Box::new(|o, v| o.fields(v, &[("msg_id", "msg_id")])),
            )
        }
        Resource::Rules(cmd) => {
            let cols: &'static [(&'static str, &'static str)] = &[
                ("NAME", "name"),
                ("TYPE", "type"),
                ("SOURCE", "source"),
                ("TARGET", "target"),
                ("TAGS", "tag_filter"),
                ("ENABLED", "enabled"),
            ];
            match cmd {
                RuleCmd::List => (
                    api.call(Method::Get, &format!("{inst}/rules"), None)?,
                    Box::new(move |o, v| o.table(v, cols)),
                ),
                RuleCmd::Show { name } => (
                    api.call(Method::Get, &format!("{inst}/rules/{}", enc(&name)), None)?,
                    Box::new(move |o, v| {
                        o.fields(
                            v,
                            &[
                                ("name", "name"),
                                ("type", "type"),
                                ("source", "source"),
                                ("target", "target"),
                                ("tag_filter", "tag_filter"),
                                ("enabled", "enabled"),
                                ("remote", "remote"),
                                ("created_at", "created_at"),
                            ],
                        )
                    }),
                ),
                RuleCmd::Create {
                    name,
                    rule_type,
                    source,
                    target,
                    tag_filter,
                    disabled,
                    remote_endpoint,
                    remote_key_id,
                    remote_key_secret,
                    remote_namespace,
                } => {
                    let kind = match rule_type {
                        RuleTypeArg::Inflow => "inflow",
                        RuleTypeArg::Outflow => "outflow",
                        RuleTypeArg::Status => "status",
                    };
                    let mut body = json!({
                        "name": name,
                        "type": kind,
                        "source": source,
                        "target": target,
                        "enabled": !disabled,
                    });
                    if let Some(t) = tag_filter {
                        body["tag_filter"] = json!(t);
                    }
                    if let Some(endpoint) = remote_endpoint {
                        let mut remote = json!({ "endpoint": endpoint });
                        if let Some(id) = remote_key_id {
                            remote["access_key_id"] = json!(id);
                            remote["access_key_secret"] =
                                json!(remote_key_secret.unwrap_or_default());
                        }
                        if let Some(ns) = remote_namespace {
                            remote["namespace"] = json!(ns);
                        }
                        body["remote"] = remote;
                    }
                    (
                        api.call(Method::Post, &format!("{inst}/rules"), Some(body))?,
                        Box::new(move |o, _| o.line(format!("created {kind} rule {name}"))),
                    )
                }
                RuleCmd::Enable { name } => (
                    api.call(
                        Method::Patch,
                        &format!("{inst}/rules/{}", enc(&name)),
                        Some(json!({ "enabled": true })),
                    )?,
                    Box::new(move |o, _| o.line(format!("enabled rule {name}"))),
                ),
                RuleCmd::Disable { name } => (
                    api.call(
                        Method::Patch,
                        &format!("{inst}/rules/{}", enc(&name)),
                        Some(json!({ "enabled": false })),
                    )?,
                    Box::new(move |o, _| o.line(format!("disabled rule {name}"))),
                ),
                RuleCmd::Delete { name } => (
                    api.call(
                        Method::Delete,
                        &format!("{inst}/rules/{}", enc(&name)),
                        None,
                    )?,
                    Box::new(move |o, _| o.line(format!("deleted rule {name}"))),
                ),
            }
        }
        Resource::Alarms => (
            api.call(Method::Get, &format!("{inst}/alarms"), None)?,
            Box::new(|o, v| {
                o.table(
                    v,
                    &[
                        ("KIND", "kind"),
                        ("COUNT", "count"),
                        ("FIRST", "first_at"),
                        ("LAST", "last_at"),
                        ("MESSAGE", "message"),
                    ],
                )
            }),
        ),
        Resource::Metrics => {
            let (text, _) = api.send(Method::Get, "/metrics", None)?;
            let samples = metric_samples(&text);
            (
                Reply {
                    raw: Value::Object(samples.clone()).to_string(),
                    json: Value::Object(samples),
                },
                Box::new(move |o, _| o.text.push_str(&text)),
            )
        }
        Resource::AdminKeys(cmd) => match cmd {
            AdminKeyCmd::List => (
                api.call(Method::Get, "/admin-keys", None)?,
                Box::new(|o, v| {
                    o.table(
                        v,
                        &[
                            ("ACCESS_KEY_ID", "access_key_id"),
                            ("CREATED", "created_at"),
                        ],
                    )
                }),
            ),
            AdminKeyCmd::Create => (
                api.call(Method::Post, "/admin-keys", None)?,
                Box::new(|o, v| {
                    o.fields(
                        v,
                        &[
                            ("access_key_id", "access_key_id"),
                            ("access_key_secret", "access_key_secret"),
                            ("created_at", "created_at"),
                        ],
                    );
                    o.note("note: the secret is shown only this once; keep it safe");
                }),
            ),
            AdminKeyCmd::Delete { access_key_id } => (
                api.call(
                    Method::Delete,
                    &format!("/admin-keys/{}", enc(&access_key_id)),
                    None,
                )?,
                Box::new(move |o, _| o.line(format!("deleted admin key {access_key_id}"))),
            ),
        },
    };
    if json {
        let raw = reply.raw.trim();
        if !raw.is_empty() {
            out.line(raw.to_string());
        }
    } else {
        show_reply(&mut out, &reply.json);
    }
    for note in &out.notes {
        eprintln!("{note}");
    }
    Ok(out.text)
}

/// Renders a successful reply for humans.
type Render = Box<dyn FnOnce(&mut Out, &Value)>;

/// Human output being built: stdout text, plus notes for stderr.
#[derive(Default)]
struct Out {
    text: String,
    notes: Vec<String>,
}

impl Out {
    fn line(&mut self, s: String) {
        self.text.push_str(&s);
        self.text.push('\n');
    }

    fn note(&mut self, s: &str) {
        self.notes.push(s.to_string());
    }

    /// An aligned table of `rows` (a JSON array), one column per `(header, field)`.
    fn table(&mut self, rows: &Value, cols: &[(&str, &str)]) {
        let empty = Vec::new();
        let rows = rows.as_array().unwrap_or(&empty);
        let mut cells: Vec<Vec<String>> = vec![cols.iter().map(|c| c.0.to_string()).collect()];
        for row in rows {
            cells.push(
                cols.iter()
                    .map(|(_, field)| render(row.get(*field).unwrap_or(&Value::Null), field))
                    .collect(),
            );
        }
        let widths: Vec<usize> = (0..cols.len())
            .map(|i| {
                cells
                    .iter()
                    .map(|r| r[i].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in cells {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == cols.len() {
                    line.push_str(cell);
                } else {
                    let pad = widths[i] - cell.chars().count();
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad + 2));
                }
            }
            self.line(line.trim_end().to_string());
        }
    }

    /// `label: value` lines, labels aligned.
    fn fields(&mut self, v: &Value, keys: &[(&str, &str)]) {
        let width = keys.iter().map(|k| k.0.len()).max().unwrap_or(0);
        for (label, key) in keys {
            if let Some(value) = v.get(*key) {
                self.line(format!(
                    "{:width$}  {}",
                    format!("{label}:"),
                    render(value, key),
                    width = width + 1
                ));
            }
        }
    }

    fn instance(&mut self, v: &Value) {
        self.fields(
            v,
            &[
                ("id", "id"),
                ("name", "name"),
                ("profile", "profile"),
                ("created_at", "created_at"),
            ],
        );
        if let Some(settings) = v.get("settings").and_then(Value::as_object) {
            self.line("settings:".to_string());
            let width = settings.keys().map(|k| k.len()).max().unwrap_or(0);
            for (k, value) in settings {
                self.line(format!(
                    "  {:width$}  {}",
                    format!("{k}:"),
                    render(value, k),
                    width = width + 1
                ));
            }
        }
    }

    fn client(&mut self, v: &Value) {
        self.fields(
            v,
            &[
                ("client_id", "client_id"),
                ("online", "online"),
                ("address", "address"),
                ("protocol_level", "protocol_level"),
                ("last_activity", "last_activity"),
                ("inflight", "inflight"),
                ("queued", "queued"),
            ],
        );
        let subs = v
            .get("subscriptions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if subs.is_empty() {
            self.line("subscriptions:   none".to_string());
        } else {
            self.line("subscriptions:".to_string());
            for s in subs {
                self.line(format!(
                    "  {}  qos {}",
                    render(s.get("filter").unwrap_or(&Value::Null), ""),
                    render(s.get("qos").unwrap_or(&Value::Null), "")
                ));
            }
        }
    }
}

/// One JSON value as table text. `field` picks special renderings (times, subscription lists).
fn render(v: &Value, field: &str) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match (is_time_field(field), n.as_u64()) {
            (true, Some(ms)) => format_time(ms),
            _ => n.to_string(),
        },
        Value::Array(items) if field == "subscriptions" => {
            if items.is_empty() {
                return "-".to_string();
            }
            items
                .iter()
                .map(|s| match (s.get("filter"), s.get("qos")) {
                    (Some(f), Some(q)) => format!("{}:{}", render(f, ""), render(q, "")),
                    _ => render(s, ""),
                })
                .collect::<Vec<_>>()
                .join(",")
        }
        Value::Array(items) => {
            if items.is_empty() {
                "-".to_string()
            } else {
                items
                    .iter()
                    .map(|i| render(i, ""))
                    .collect::<Vec<_>>()
                    .join(",")
            }
        }
        Value::Object(_) => v.to_string(),
    }
}

fn is_time_field(field: &str) -> bool {
    matches!(
        field,
        "created_at" | "updated_at" | "expire_at" | "last_activity"
    )
}

/// Epoch milliseconds as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
fn format_time(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_dates() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_time(1_609_434_061_000), "2020-12-31T17:01:01Z");
    }

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(enc("GID_x@@@dev-1"), "GID_x@@@dev-1");
        assert_eq!(enc("a/b+c #"), "a%2Fb%2Bc%20%23");
    }

    #[test]
    fn bases_are_normalized() {
        assert_eq!(
            normalize_base("127.0.0.1:1/").unwrap(),
            "http://127.0.0.1:1"
        );
        assert_eq!(normalize_base("http://h:1/api/v1").unwrap(), "http://h:1");
        assert!(normalize_base("https://h").is_err());
    }

    #[test]
    fn api_errors_are_one_line() {
        let e = api_error(
            ureq::http::StatusCode::CONFLICT,
            r#"{"code":"GroupIdAlreadyExsited","message":"group \"GID_x\" exists already"}"#,
            "POST",
            "http://x/api/v1/instances/default/groups",
        );
        assert_eq!(
            e.to_string(),
            "GroupIdAlreadyExsited: group \"GID_x\" exists already (HTTP 409)"
        );
        let e = api_error(ureq::http::StatusCode::NOT_FOUND, "", "GET", "http://x/y");
        assert_eq!(e.to_string(), "HTTP 404 Not Found for GET http://x/y");
    }

    #[test]
    fn metric_samples_keep_labels_and_number_kinds() {
        let text = "# HELP a_total A.\n# TYPE a_total counter\na_total 3\n\
                    b{reason=\"x y\"} 0\nc_seconds 1.5\nbroken\nd NaNish\n";
        let v = Value::Object(metric_samples(text));
        assert_eq!(
            v,
            json!({"a_total": 3, "b{reason=\"x y\"}": 0, "c_seconds": 1.5})
        );
    }
}
