//! The OpenAPI 3.0 document of the REST API, served at `GET /api/v1/openapi.json`.
//!
//! The document is generated from the same table the router is built from
//! ([`crate::rest::operations`]): every [`Operation`] is one route and one path item method, so
//! the two cannot diverge. The schemas of the bodies are written here by hand.

use serde_json::{json, Map, Value};
use std::sync::OnceLock;

/// The HTTP methods the REST API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    Get,
    Post,
    Patch,
    Delete,
}

impl Method {
    pub const ALL: [Method; 4] = [Method::Get, Method::Post, Method::Patch, Method::Delete];

    /// `GET`, `POST`, …
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }

    /// The key of the method in an OpenAPI path item.
    pub fn openapi_key(self) -> &'static str {
        match self {
            Method::Get => "get",
            Method::Post => "post",
            Method::Patch => "patch",
            Method::Delete => "delete",
        }
    }
}

/// A query parameter of an operation.
#[derive(Debug, Clone, Copy)]
pub struct QueryParam {
    pub name: &'static str,
    pub description: &'static str,
    pub required: bool,
}

/// What an operation answers with on success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// No body (204).
    Empty,
    /// One object of the named component schema.
    One(&'static str),
    /// A JSON array of the named component schema.
    List(&'static str),
}

/// One operation of the REST API: the route and its documentation.
#[derive(Debug, Clone, Copy)]
pub struct Operation {
    pub method: Method,
    /// Axum / OpenAPI path template (`{name}` parameters).
    pub path: &'static str,
    pub operation_id: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    /// Longer text; empty for none.
    pub description: &'static str,
    /// Served without authentication.
    pub public: bool,
    pub query: &'static [QueryParam],
    /// The component schema of the (required) JSON request body.
    pub body: Option<&'static str>,
    /// The success status.
    pub status: u16,
    pub reply: Reply,
    /// The error statuses it can answer with (each with an `Error` body).
    pub errors: &'static [u16],
}

impl Operation {
    /// The names of the `{…}` parameters of the path, in order.
    pub fn path_params(&self) -> Vec<&'static str> {
        self.path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .collect()
    }
}

fn path_param_description(name: &str) -> &'static str {
    match name {
        "instance" => "Instance id.",
        "name" => "Parent topic name.",
        "group_id" => "Group ID (`GID_…`).",
        "access_key_id" => "AccessKey id.",
        "client_id" => "MQTT client id (percent-encode reserved characters).",
        "token" => "The token string.",
        "id" => "Admin key id.",
        _ => "Path parameter.",
    }
}

fn status_text(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad request: a parameter, the path or the JSON body is invalid (`ParameterCheckFailed`) or a limit was reached",
        401 => "Missing or wrong admin credentials (`Unauthorized`)",
        404 => "The instance or the resource does not exist",
        409 => "The resource exists already or the operation conflicts with the current state",
        503 => "The broker is shutting down (`ServiceUnavailable`)",
        _ => "Response",
    }
}

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn operation_object(op: &Operation) -> Value {
    let mut o = Map::new();
    o.insert("operationId".into(), json!(op.operation_id));
    o.insert("tags".into(), json!([op.tag]));
    o.insert("summary".into(), json!(op.summary));
    if !op.description.is_empty() {
        o.insert("description".into(), json!(op.description));
    }
    if op.public {
        o.insert("security".into(), json!([]));
    }
    let mut params: Vec<Value> = op
        .path_params()
        .into_iter()
        .map(|name| {
            json!({
                "name": name,
                "in": "path",
                "required": true,
                "description": path_param_description(name),
                "schema": { "type": "string" },
            })
        })
        .collect();
    params.extend(op.query.iter().map(|q| {
        json!({
            "name": q.name,
            "in": "query",
            "required": q.required,
            "description": q.description,
            "schema": { "type": "string" },
        })
    }));
    if !params.is_empty() {
        o.insert("parameters".into(), Value::Array(params));
    }
    if let Some(body) = op.body {
        o.insert(
            "requestBody".into(),
            json!({
                "required": true,
                "content": { "application/json": { "schema": schema_ref(body) } },
            }),
        );
    }
    let mut responses = Map::new();
    let success = match op.reply {
        Reply::Empty => json!({ "description": status_text(op.status) }),
        Reply::One(name) => json!({
            "description": status_text(op.status),
            "content": { "application/json": { "schema": schema_ref(name) } },
        }),
        Reply::List(name) => json!({
            "description": status_text(op.status),
            "content": { "application/json": { "schema": { "type": "array", "items": schema_ref(name) } } },
        }),
    };
    responses.insert(op.status.to_string(), success);
    for status in op.errors {
        responses.insert(
            status.to_string(),
            json!({
                "description": status_text(*status),
                "content": { "application/json": { "schema": schema_ref("Error") } },
            }),
        );
    }
    o.insert("responses".into(), Value::Object(responses));
    Value::Object(o)
}

/// The OpenAPI document describing `operations`.
pub fn document(operations: &[Operation]) -> Value {
    let mut paths = Map::new();
    for op in operations {
        let item = paths
            .entry(op.path.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        item.as_object_mut()
            .expect("path item is an object")
            .insert(op.method.openapi_key().into(), operation_object(op));
    }
    let mut tags: Vec<&str> = Vec::new();
    for op in operations {
        if !tags.contains(&op.tag) {
            tags.push(op.tag);
        }
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Ferry management API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": DESCRIPTION,
        },
        "servers": [{ "url": "/" }],
        "tags": tags.iter().map(|t| json!({ "name": t })).collect::<Vec<_>>(),
        "security": [{ "basicAuth": [] }],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "basicAuth": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "An admin key: user name = access_key_id, password = access_key_secret.",
                },
            },
            "schemas": schemas(),
        },
    })
}

/// The document of the REST API, built once.
pub fn spec() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| document(&crate::rest::operations()))
}

const DESCRIPTION: &str = "The REST API of Ferry, an MQTT broker with the tenancy model of \
the cloud MQTT service (instances, parent topics, Group IDs, AccessKeys, device credentials, \
tokens). Every route except this document requires HTTP Basic authentication with an admin key. \
Errors are JSON objects `{\"code\", \"message\"}`; `code` is the cloud's error code \
(`InstanceNotFound`, `ParameterCheckFailed`, `GroupIdAlreadyExsited`, …). Times are \
milliseconds since the Unix epoch.";

fn int(description: &str) -> Value {
    json!({ "type": "integer", "format": "int64", "minimum": 0, "description": description })
}

fn boolean(description: &str) -> Value {
    json!({ "type": "boolean", "description": description })
}

fn string(description: &str) -> Value {
    json!({ "type": "string", "description": description })
}

fn strings(description: &str) -> Value {
    json!({ "type": "array", "items": { "type": "string" }, "description": description })
}

fn nullable(mut schema: Value) -> Value {
    schema["nullable"] = json!(true);
    schema
}

/// An object schema: `props` in order, the names in `required` required, no other properties.
fn object(description: &str, props: Vec<(&str, Value)>, required: &[&str]) -> Value {
    let mut properties = Map::new();
    for (name, schema) in props {
        properties.insert(name.to_string(), schema);
    }
    let mut o = json!({
        "type": "object",
        "description": description,
        "properties": properties,
        "additionalProperties": false,
    });
    if !required.is_empty() {
        o["required"] = json!(required);
    }
    o
}

fn settings_properties() -> Vec<(&'static str, Value)> {
    vec![
        (
            "require_parent_topic",
            boolean(
                "Topics must start with a created parent topic and follow the cloud naming rules.",
            ),
        ),
        (
            "require_group_client_id",
            boolean("Client ids must be `<GroupID>@@@<DeviceID>` with an existing group."),
        ),
        (
            "max_parent_topics",
            int("Most parent topics the instance may have."),
        ),
        (
            "topic_min_len",
            int("Shortest whole topic (with `require_parent_topic`)."),
        ),
        (
            "topic_max_len",
            int("Longest whole topic (with `require_parent_topic`)."),
        ),
        (
            "max_subscriptions_per_client",
            int("Subscriptions per client; 0 = unlimited."),
        ),
        (
            "max_payload_size",
            int("Largest PUBLISH payload in bytes; 0 = only the packet limit applies."),
        ),
        ("max_packet_size", int("Largest MQTT packet in bytes.")),
        (
            "max_keep_alive",
            int("Keep-alive ceiling in seconds; 0 = none."),
        ),
        ("max_client_id_len", int("Longest client id.")),
        (
            "p2p",
            boolean("`<parent>/p2p/<clientId>` reaches that client only, without a subscription."),
        ),
        (
            "offline_retention_secs",
            int("Seconds a queued message waits for an offline persistent session; 0 = until the session ends."),
        ),
        (
            "max_offline_messages",
            int("Queued messages kept for offline persistent sessions, the whole instance together; beyond it the oldest are evicted, counted and raise an alarm."),
        ),
    ]
}

fn schemas() -> Value {
    let settings_names: Vec<&str> = settings_properties().iter().map(|(n, _)| *n).collect();
    let token_actions = json!({
        "type": "string",
        "enum": ["R", "W", "R,W"],
        "description": "R = subscribe, W = publish, R,W = both.",
    });
    let permission = json!({
        "type": "string",
        "enum": ["full", "pub-only", "sub-only"],
        "description": "What clients signing with the key may do.",
    });
    let profile = json!({
        "type": "string",
        "enum": ["cloud", "standard"],
        "description": "`cloud` enforces the cloud service's naming rules and limits; `standard` behaves like a plain MQTT broker.",
    });
    json!({
        "OpenApiDocument": {
            "type": "object",
            "description": "An OpenAPI 3.0 document (this one).",
        },
        "Error": object(
            "An error.",
            vec![
                ("code", string("The cloud's error code, e.g. `InstanceNotFound`, `ParameterCheckFailed`, `Unauthorized`.")),
                ("message", string("What went wrong, naming the parameter.")),
            ],
            &["code", "message"],
        ),
        "InstanceSettings": object(
            "Per-instance limits and switches; a profile only chooses the defaults.",
            settings_properties(),
            &settings_names,
        ),
        "InstanceSettingsPatch": object(
            "Some InstanceSettings fields; the others keep their current (or profile default) values.",
            settings_properties(),
            &[],
        ),
        "Instance": object(
            "An instance: a tenant with its own topics, groups, keys and clients.",
            vec![
                ("id", string("`[a-z0-9-]{3,64}`.")),
                ("name", string("Display name.")),
                ("profile", profile.clone()),
                ("settings", schema_ref("InstanceSettings")),
                ("created_at", int("Epoch ms.")),
            ],
            &["id", "name", "profile", "settings", "created_at"],
        ),
        "InstanceCreate": object(
            "A new instance.",
            vec![
                ("id", string("`[a-z0-9-]{3,64}`.")),
                ("name", string("Display name (default: the id).")),
                ("profile", profile),
                ("settings", schema_ref("InstanceSettingsPatch")),
            ],
            &["id", "profile"],
        ),
        "InstanceUpdate": object(
            "Settings to change, merged over the current ones.",
            vec![("settings", schema_ref("InstanceSettingsPatch"))],
            &["settings"],
        ),
        "ParentTopic": object(
            "A parent topic (the first level of the instance's topics).",
            vec![("name", string("1-64 characters of A-Z, a-z, 0-9, `_`, `-`.")), ("created_at", int("Epoch ms."))],
            &["name", "created_at"],
        ),
        "ParentTopicCreate": object(
            "A new parent topic.",
            vec![("name", string("1-64 characters of A-Z, a-z, 0-9, `_`, `-`; unique ignoring case."))],
            &["name"],
        ),
        "Group": object(
            "A Group ID: the `<GroupID>` part of client ids `<GroupID>@@@<DeviceID>`.",
            vec![("group_id", string("`GID_` or `GID-` prefix, 7-64 characters.")), ("created_at", int("Epoch ms."))],
            &["group_id", "created_at"],
        ),
        "GroupCreate": object(
            "A new Group ID.",
            vec![("group_id", string("`GID_` or `GID-` prefix, 7-64 characters of A-Z, a-z, 0-9, `_`, `-`."))],
            &["group_id"],
        ),
        "GroupOnline": object(
            "Connected clients of a group.",
            vec![("group_id", string("The group.")), ("online_count", int("Clients `<group_id>@@@…` connected now."))],
            &["group_id", "online_count"],
        ),
        "AccessKey": object(
            "An instance AccessKey (its secret is never listed).",
            vec![
                ("access_key_id", string("The key id (user name part of the Signature and Token modes).")),
                ("permission", permission.clone()),
                ("topic_filters", strings("Topic filters the key is narrowed to; empty = the whole instance.")),
                ("created_at", int("Epoch ms.")),
            ],
            &["access_key_id", "permission", "topic_filters", "created_at"],
        ),
        "AccessKeyCreate": object(
            "A new AccessKey.",
            vec![
                ("permission", permission.clone()),
                ("topic_filters", strings("Topic filters to narrow the key to (default: none = the whole instance).")),
            ],
            &["permission"],
        ),
        "AccessKeyCreated": object(
            "A created AccessKey with its secret: the only time the secret is shown.",
            vec![
                ("access_key_id", string("The key id.")),
                ("access_key_secret", string("The secret (HMAC-SHA1 key of the Signature mode).")),
                ("permission", permission),
                ("topic_filters", strings("Topic filters the key is narrowed to.")),
                ("created_at", int("Epoch ms.")),
            ],
            &["access_key_id", "access_key_secret", "permission", "topic_filters", "created_at"],
        ),
        "DeviceCredential": object(
            "The credential of one client id (DeviceCredential mode), with its secret.",
            vec![
                ("client_id", string("The client id it belongs to.")),
                ("device_access_key_id", string("User name part: `DeviceCredential|<device_access_key_id>|<instance>`.")),
                ("device_access_key_secret", string("HMAC-SHA1 key of the password.")),
                ("created_at", int("Epoch ms.")),
                ("updated_at", int("Epoch ms of the last refresh.")),
            ],
            &["client_id", "device_access_key_id", "device_access_key_secret", "created_at", "updated_at"],
        ),
        "DeviceCredentialCreate": object(
            "Registers (or replaces) the credential of a client id.",
            vec![("client_id", string("The client id (`<GroupID>@@@<DeviceID>` with an existing group on cloud instances)."))],
            &["client_id"],
        ),
        "CredentialClientIds": object(
            "Client ids with a device credential.",
            vec![("client_ids", strings("Sorted client ids."))],
            &["client_ids"],
        ),
        "Token": object(
            "A token (Token mode).",
            vec![
                ("token", string("The token string.")),
                ("resources", strings("Topic filters it grants (`+`, `#` allowed), at most 100.")),
                ("actions", token_actions.clone()),
                ("expire_at", int("Epoch ms.")),
                ("created_at", int("Epoch ms.")),
                ("revoked", boolean("Revoked tokens are refused.")),
            ],
            &["token", "resources", "actions", "expire_at", "created_at", "revoked"],
        ),
        "TokenApply": object(
            "A token to issue. Give exactly one of `expire_at` and `ttl_secs`; the lifetime must be at least 60 s and is capped to 30 days.",
            vec![
                ("resources", strings("Topic filters to grant (`+`, `#` allowed), 1-100.")),
                ("actions", token_actions),
                ("expire_at", int("Absolute expiry, epoch ms.")),
                ("ttl_secs", int("Lifetime in seconds from now.")),
            ],
            &["resources", "actions"],
        ),
        "Subscription": object(
            "A subscription of a client.",
            vec![
                ("filter", string("Topic filter (shared ones as `$share/<group>/<filter>`).")),
                ("qos", json!({ "type": "integer", "enum": [0, 1, 2], "description": "Granted QoS." })),
            ],
            &["filter", "qos"],
        ),
        "ClientView": object(
            "A client session as the broker sees it.",
            vec![
                ("client_id", string("The client id.")),
                ("online", boolean("Whether a connection is attached now.")),
                ("address", nullable(string("`ip:port` of the live connection."))),
                ("protocol_level", nullable(json!({ "type": "integer", "enum": [3, 4, 5], "description": "MQTT protocol level of the live connection (3 = 3.1, 4 = 3.1.1, 5 = 5.0)." }))),
                ("last_activity", nullable(int("Epoch ms of the last packet (online) or of the disconnect (offline)."))),
                ("subscriptions", json!({ "type": "array", "items": schema_ref("Subscription") })),
                ("inflight", int("QoS 1/2 messages sent and not yet acknowledged.")),
                ("queued", int("Messages waiting to be sent.")),
            ],
            &["client_id", "online", "address", "protocol_level", "last_activity", "subscriptions", "inflight", "queued"],
        ),
        "Alarm": object(
            "An instance alarm event.",
            vec![
                ("kind", json!({ "type": "string", "enum": ["offline_messages_evicted"], "description": "What happened." })),
                ("message", string("What happened, for people.")),
                ("count", int("Occurrences (evicted messages) folded into this event.")),
                ("first_at", int("Epoch ms of the first occurrence.")),
                ("last_at", int("Epoch ms of the latest occurrence.")),
            ],
            &["kind", "message", "count", "first_at", "last_at"],
        ),
        "Rule": object(
            "A rule (§6.2). inflow: queue topic `source` → MQTT parent topic `target`; outflow: parent topic `source` → queue topic `target`; status: Group ID `source` → queue topic `target`.",
            vec![
                ("name", string("1-64 characters of A-Z, a-z, 0-9, `_`, `-`.")),
                ("type", json!({ "type": "string", "enum": ["inflow", "outflow", "status"], "description": "What the rule connects." })),
                ("source", string("inflow: queue topic; outflow: parent topic; status: Group ID.")),
                ("target", string("inflow: parent topic; outflow and status: queue topic.")),
                ("tag_filter", string("inflow: the queue tag filter (`*` or `a||b`); empty for the others.")),
                ("enabled", boolean("Whether the rule runs.")),
                ("remote", nullable(schema_ref("RemoteEndpoint"))),
                ("created_at", int("Epoch ms.")),
            ],
            &["name", "type", "source", "target", "tag_filter", "enabled", "remote", "created_at"],
        ),
        "RemoteEndpoint": object(
            "An external RocketMQ 5 endpoint (gRPC, plaintext) the rule's queue side is on. The secret is write-only.",
            vec![
                ("endpoint", string("`host:port`.")),
                ("access_key_id", nullable(string("AccessKey id; absent = anonymous."))),
                ("access_key_secret", string("AccessKey secret (only in requests; never shown).")),
                ("namespace", string("`x-mq-namespace`; empty = the server's default.")),
            ],
            &["endpoint"],
        ),
        "RuleCreate": object(
            "A new rule.",
            vec![
                ("name", string("1-64 characters of A-Z, a-z, 0-9, `_`, `-`.")),
                ("type", json!({ "type": "string", "enum": ["inflow", "outflow", "status"], "description": "What the rule connects." })),
                ("source", string("inflow: queue topic; outflow: parent topic; status: Group ID.")),
                ("target", string("inflow: parent topic; outflow and status: queue topic.")),
                ("tag_filter", string("inflow only: `*` (default) or `a||b`.")),
                ("enabled", boolean("Default true.")),
                ("remote", schema_ref("RemoteEndpoint")),
            ],
            &["name", "type", "source", "target"],
        ),
        "RuleUpdate": object(
            "Turn a rule on or off.",
            vec![("enabled", boolean("Whether the rule runs."))],
            &["enabled"],
        ),
        "Kicked": object(
            "The result of disconnecting a client.",
            vec![("kicked", boolean("Whether the client was online (and is now disconnected)."))],
            &["kicked"],
        ),
        "SubscriberCount": object(
            "Sessions subscribed to a filter matching a topic.",
            vec![("topic", string("The topic asked about.")), ("subscriber_count", int("Matching sessions (online or not)."))],
            &["topic", "subscriber_count"],
        ),
        "Message": object(
            "A message to publish as the server. Give at most one of `payload` and `payload_base64` (neither = empty payload).",
            vec![
                ("topic", string("Topic name (no wildcards); on cloud instances under a created parent topic.")),
                ("payload", string("UTF-8 payload.")),
                ("payload_base64", string("Binary payload, standard base64.")),
                ("qos", json!({ "type": "integer", "enum": [0, 1, 2], "default": 0 })),
                ("retain", json!({ "type": "boolean", "default": false })),
                ("user_properties", json!({ "type": "object", "additionalProperties": { "type": "string" }, "description": "MQTT 5 user properties." })),
                ("content_type", string("MQTT 5 content type.")),
                ("message_expiry_interval", json!({ "type": "integer", "minimum": 0, "description": "Seconds." })),
            ],
            &["topic"],
        ),
        "MessageSent": object(
            "A published message.",
            vec![("msg_id", string("The message id."))],
            &["msg_id"],
        ),
        "AdminKey": object(
            "An admin key (its secret is never listed).",
            vec![("access_key_id", string("The key id.")), ("created_at", int("Epoch ms."))],
            &["access_key_id", "created_at"],
        ),
        "AdminKeyCreated": object(
            "A created admin key with its secret: the only time the secret is shown.",
            vec![
                ("access_key_id", string("The key id.")),
                ("access_key_secret", string("The secret.")),
                ("created_at", int("Epoch ms.")),
            ],
            &["access_key_id", "access_key_secret", "created_at"],
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r.clone());
                }
                m.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn every_ref_resolves() {
        let doc = spec();
        let mut all = Vec::new();
        refs(doc, &mut all);
        assert!(!all.is_empty());
        for r in all {
            let name = r
                .strip_prefix("#/components/schemas/")
                .expect("local schema ref");
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "{r} is not defined"
            );
        }
    }

    #[test]
    fn required_components_present() {
        let schemas = &spec()["components"]["schemas"];
        for name in [
            "Instance",
            "InstanceSettings",
            "ParentTopic",
            "Group",
            "AccessKey",
            "DeviceCredential",
            "Token",
            "ClientView",
            "Error",
        ] {
            assert!(schemas.get(name).is_some(), "{name} missing");
        }
        assert_eq!(
            spec()["components"]["securitySchemes"]["basicAuth"]["scheme"],
            "basic"
        );
    }

    /// The hand-written schemas have exactly the fields the model types serialize.
    #[test]
    fn schemas_match_the_model() {
        let schemas = &spec()["components"]["schemas"];
        let keys = |v: Value| -> Vec<String> {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        let props = |name: &str| -> Vec<String> {
            let mut k: Vec<String> = schemas[name]["properties"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            k.sort();
            k
        };
        let settings = ferry_meta::InstanceSettings::default();
        assert_eq!(
            keys(serde_json::to_value(&settings).unwrap()),
            props("InstanceSettings")
        );
        let instance = ferry_meta::Instance {
            id: "x".into(),
            name: "x".into(),
            profile: ferry_meta::Profile::Cloud,
            settings,
            created_at: 1,
        };
        assert_eq!(
            keys(serde_json::to_value(&instance).unwrap()),
            props("Instance")
        );
        let token = ferry_meta::Token {
            token: "t".into(),
            resources: vec![],
            actions: ferry_meta::TokenActions::Read,
            expire_at: 1,
            created_at: 1,
            revoked: false,
        };
        assert_eq!(keys(serde_json::to_value(&token).unwrap()), props("Token"));
        let key = ferry_meta::AccessKey {
            access_key_id: "k".into(),
            secret: "s".into(),
            permission: ferry_meta::KeyPermission::Full,
            topic_filters: vec![],
            created_at: 1,
        };
        assert_eq!(
            keys(serde_json::to_value(&key).unwrap()),
            props("AccessKey")
        );
    }
}
