//! The REST API under `/api/v1`.
//!
//! Every route is one entry of [`table`]: its [`Operation`] (method, path, documentation) and
//! its handler. The router ([`routes`]) and the OpenAPI document ([`crate::openapi::spec`]) are
//! both built from that table.
//!
//! Every route but the document requires HTTP Basic authentication with an admin key (the
//! [`Admin`] extractor, first argument of every handler, so it runs before the path and body
//! are looked at). Errors, including axum's own rejections (bad JSON, bad path values, unknown
//! routes, wrong methods), are JSON `{"code", "message"}`.

use crate::openapi::{Method, Operation, QueryParam, Reply};
use crate::AdminState;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, MethodFilter, MethodRouter};
use axum::{Json, Router};
use base64::Engine;
use bytes::Bytes;
use ferry_broker::{ClientView, ControlError, PublishRequest};
use ferry_meta::{
    now_ms, AccessKey, DeviceCredential, InstanceSettings, KeyPermission, MetaError, Profile,
    TokenActions,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;

// ----------------------------------------------------------------------------------------
// Errors

/// An error answer: `{"code", "message"}` with an HTTP status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: Cow<'static, str>,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code: Cow::Borrowed(code),
            message: message.into(),
        }
    }

    /// 400 `ParameterCheckFailed`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "ParameterCheckFailed", message)
    }

    fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Unauthorized", message)
    }
}

impl From<MetaError> for ApiError {
    fn from(e: MetaError) -> Self {
        ApiError {
            status: StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST),
            code: Cow::Borrowed(e.code),
            message: e.message,
        }
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Meta(e) => e.into(),
            ControlError::Invalid(m) => ApiError::invalid(m),
            ControlError::Store(m) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                format!("the store could not write: {m}"),
            ),
            ControlError::Unavailable => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "the broker is shutting down",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let unauthorized = self.status == StatusCode::UNAUTHORIZED;
        let mut res = (
            self.status,
            Json(json!({ "code": self.code, "message": self.message })),
        )
            .into_response();
        if unauthorized {
            res.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"ferry\", charset=\"UTF-8\""),
            );
        }
        res
    }
}

type ApiResult<T> = Result<T, ApiError>;

// ----------------------------------------------------------------------------------------
// Extractors

/// Proof that the request carries a valid admin key (HTTP Basic `access_key_id:secret`).
pub struct Admin {
    pub access_key_id: String,
}

impl FromRequestParts<AdminState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AdminState) -> ApiResult<Admin> {
        let header = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
            ApiError::unauthorized(
                "authentication required: HTTP Basic with an admin key (access_key_id:access_key_secret)",
            )
        })?;
        let header = header
            .to_str()
            .map_err(|_| ApiError::unauthorized("Authorization header is not ASCII"))?;
        let (scheme, encoded) = header.trim().split_once(' ').unwrap_or((header, ""));
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err(ApiError::unauthorized(
                "Authorization: only the Basic scheme is supported",
            ));
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| ApiError::unauthorized("Authorization: malformed Basic credentials"))?;
        let (id, secret) = decoded.split_once(':').ok_or_else(|| {
            ApiError::unauthorized("Authorization: Basic credentials must be id:secret")
        })?;
        if !state.meta.verify_admin(id, secret) {
            return Err(ApiError::unauthorized(
                "unknown admin key id or wrong secret",
            ));
        }
        Ok(Admin {
            access_key_id: id.to_string(),
        })
    }
}

/// `Path<T>` with JSON errors.
pub struct P<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for P<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<P<T>> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(P(v)),
            Err(e) => Err(rejection(e.status(), format!("path: {}", e.body_text()))),
        }
    }
}

/// `Query<T>` with JSON errors.
pub struct Q<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<Q<T>> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(Q(v)),
            Err(e) => Err(rejection(e.status(), format!("query: {}", e.body_text()))),
        }
    }
}

fn rejection(status: StatusCode, message: String) -> ApiError {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(status, "PayloadTooLarge", message),
        s if s.is_client_error() => ApiError::invalid(message),
        s => ApiError::new(s, "InternalError", message),
    }
}

/// A JSON request body. The content type may be absent; if present it must be JSON. Errors
/// name the offending field by its path (`settings.max_keep_alive: invalid type …`).
pub struct J<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for J<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> ApiResult<J<T>> {
        if let Some(ct) = req.headers().get(CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or_default().to_ascii_lowercase();
            let essence = ct.split(';').next().unwrap_or_default().trim();
            if essence != "application/json" && !essence.ends_with("+json") {
                return Err(ApiError::invalid(format!(
                    "Content-Type: expected application/json, got {essence:?}"
                )));
            }
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| rejection(e.status(), format!("request body: {}", e.body_text())))?;
        parse_json(&bytes).map(J)
    }
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid(
            "request body: expected a JSON object, got an empty body",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || inner.is_syntax() || inner.is_eof() {
            ApiError::invalid(format!("request body: {inner}"))
        } else {
            ApiError::invalid(format!("request body: {path}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::invalid(format!("request body: {e}")))?;
    Ok(value)
}

// ----------------------------------------------------------------------------------------
// The route table

/// One route: its documentation and its handler.
pub struct Route {
    pub op: Operation,
    handler: MethodRouter<AdminState>,
}

fn filter(m: Method) -> MethodFilter {
    match m {
        Method::Get => MethodFilter::GET,
        Method::Post => MethodFilter::POST,
        Method::Patch => MethodFilter::PATCH,
        Method::Delete => MethodFilter::DELETE,
    }
}

fn route<H, T>(op: Operation, handler: H) -> Route
where
    H: axum::handler::Handler<T, AdminState>,
    T: 'static,
{
    Route {
        handler: MethodRouter::new().on(filter(op.method), handler),
        op,
    }
}

const fn op(method: Method, path: &'static str, operation_id: &'static str) -> Operation {
    Operation {
        method,
        path,
        operation_id,
        tag: "",
        summary: "",
        description: "",
        public: false,
        query: &[],
        body: None,
        status: 200,
        reply: Reply::Empty,
        errors: &[401],
    }
}

const E_LIST: &[u16] = &[400, 401, 404];
const E_CREATE: &[u16] = &[400, 401, 404, 409];
const E_BROKER: &[u16] = &[400, 401, 404, 503];

const PATCH_NOTE: &str = "The `settings` object holds some InstanceSettings fields; they are \
merged over the current settings. Note: an instance whose clients are connected keeps the \
limits its router started with (packet size, keep-alive, client id length, subscriptions, \
payload size, p2p, topic rules) until the server restarts; the new settings are stored at once \
and apply to the rules the registry checks itself (parent topic count, credential client ids).";

/// Every route of the REST API.
pub fn table() -> Vec<Route> {
    use Method::*;
    vec![
        route(
            Operation {
                tag: "meta",
                summary: "This OpenAPI document",
                public: true,
                reply: Reply::One("OpenApiDocument"),
                errors: &[],
                ..op(Get, "/api/v1/openapi.json", "getOpenApi")
            },
            openapi_json,
        ),
        // Instances
        route(
            Operation {
                tag: "instances",
                summary: "List instances",
                reply: Reply::List("Instance"),
                ..op(Get, "/api/v1/instances", "listInstances")
            },
            list_instances,
        ),
        route(
            Operation {
                tag: "instances",
                summary: "Create an instance",
                description: "`settings` (optional) holds some InstanceSettings fields, merged over the defaults of `profile`.",
                body: Some("InstanceCreate"),
                status: 201,
                reply: Reply::One("Instance"),
                errors: &[400, 401, 409],
                ..op(Post, "/api/v1/instances", "createInstance")
            },
            create_instance,
        ),
        route(
            Operation {
                tag: "instances",
                summary: "Get an instance",
                reply: Reply::One("Instance"),
                errors: E_LIST,
                ..op(Get, "/api/v1/instances/{instance}", "getInstance")
            },
            get_instance,
        ),
        route(
            Operation {
                tag: "instances",
                summary: "Change an instance's settings",
                description: PATCH_NOTE,
                body: Some("InstanceUpdate"),
                reply: Reply::One("Instance"),
                errors: E_LIST,
                ..op(Patch, "/api/v1/instances/{instance}", "updateInstance")
            },
            update_instance,
        ),
        route(
            Operation {
                tag: "instances",
                summary: "Delete an instance and everything it owns",
                description: "The default instance cannot be deleted (400).",
                status: 204,
                errors: E_LIST,
                ..op(Delete, "/api/v1/instances/{instance}", "deleteInstance")
            },
            delete_instance,
        ),
        // Parent topics
        route(
            Operation {
                tag: "topics",
                summary: "List parent topics",
                reply: Reply::List("ParentTopic"),
                errors: E_LIST,
                ..op(Get, "/api/v1/instances/{instance}/topics", "listTopics")
            },
            list_topics,
        ),
        route(
            Operation {
                tag: "topics",
                summary: "Create a parent topic",
                description: "Fails with 400 `TopicCountLimit` when the instance has `max_parent_topics` already.",
                body: Some("ParentTopicCreate"),
                status: 201,
                reply: Reply::One("ParentTopic"),
                errors: E_CREATE,
                ..op(Post, "/api/v1/instances/{instance}/topics", "createTopic")
            },
            create_topic,
        ),
        route(
            Operation {
                tag: "topics",
                summary: "Delete a parent topic",
                status: 204,
                errors: E_LIST,
                ..op(Delete, "/api/v1/instances/{instance}/topics/{name}", "deleteTopic")
            },
            delete_topic,
        ),
        // Rules
        route(
            Operation {
                tag: "rules",
                summary: "List an instance's rules",
                reply: Reply::List("Rule"),
                errors: E_LIST,
                ..op(Get, "/api/v1/instances/{instance}/rules", "listRules")
            },
            list_rules,
        ),
        route(
            Operation {
                tag: "rules",
                summary: "Create a rule (inflow, outflow or status)",
                description: "`inflow`: queue topic `source` (messages passing `tag_filter`, default `*`) → MQTT parent topic `target`. \
`outflow`: MQTT parent topic `source` → queue topic `target`. `status`: status events of Group ID `source`'s clients → queue topic `target`. \
At most one status rule per group, one inflow and one outflow rule per parent topic (409 `RuleConflict`). \
`remote` puts the queue side on an external RocketMQ 5 endpoint instead of the embedded queue. Takes effect at once.",
                body: Some("RuleCreate"),
                status: 201,
                reply: Reply::One("Rule"),
                errors: E_CREATE,
                ..op(Post, "/api/v1/instances/{instance}/rules", "createRule")
            },
            create_rule,
        ),
        route(
            Operation {
                tag: "rules",
                summary: "Get a rule",
                reply: Reply::One("Rule"),
                errors: E_LIST,
                ..op(Get, "/api/v1/instances/{instance}/rules/{name}", "getRule")
            },
            get_rule,
        ),
        route(
            Operation {
                tag: "rules",
                summary: "Enable or disable a rule",
                description: "Takes effect at once and survives restarts.",
                body: Some("RuleUpdate"),
                reply: Reply::One("Rule"),
                errors: E_LIST,
                ..op(Patch, "/api/v1/instances/{instance}/rules/{name}", "updateRule")
            },
            update_rule,
        ),
        route(
            Operation {
                tag: "rules",
                summary: "Delete a rule",
                status: 204,
                reply: Reply::Empty,
                errors: E_LIST,
                ..op(Delete, "/api/v1/instances/{instance}/rules/{name}", "deleteRule")
            },
            delete_rule,
        ),
        // Groups
        route(
            Operation {
                tag: "groups",
                summary: "List Group IDs",
                reply: Reply::List("Group"),
                errors: E_LIST,
                ..op(Get, "/api/v1/instances/{instance}/groups", "listGroups")
            },
            list_groups,
        ),
        route(
            Operation {
                tag: "groups",
                summary: "Create a Group ID",
                description: "An existing group answers 409 `GroupIdAlreadyExsited` (the cloud's spelling).",
                body: Some("GroupCreate"),
                status: 201,
                reply: Reply::One("Group"),
                errors: E_CREATE,
                ..op(Post, "/api/v1/instances/{instance}/groups", "createGroup")
            },
            create_group,
        ),
        route(
            Operation {
                tag: "groups",
                summary: "Delete a Group ID",
                description: "Connected clients of the group stay connected; they fail on their next connect (cloud instances).",
                status: 204,
                errors: E_LIST,
                ..op(Delete, "/api/v1/instances/{instance}/groups/{group_id}", "deleteGroup")
            },
            delete_group,
        ),
        route(
            Operation {
                tag: "groups",
                summary: "Count the connected clients of a group",
                reply: Reply::One("GroupOnline"),
                errors: E_BROKER,
                ..op(Get, "/api/v1/instances/{instance}/groups/{group_id}/online", "groupOnline")
            },
            group_online,
        ),
        // AccessKeys
        route(
            Operation {
                tag: "keys",
                summary: "List AccessKeys (without secrets)",
                reply: Reply::List("AccessKey"),
                errors: E_LIST,
                ..op(Get, "/api/v1/instances/{instance}/keys", "listKeys")
            },
            list_keys,
        ),
        route(
            Operation {
                tag: "keys",
                summary: "Create an AccessKey",
                description: "The answer is the only time the secret is shown.",
                body: Some("AccessKeyCreate"),
                status: 201,
                reply: Reply::One("AccessKeyCreated"),
                errors: E_LIST,
                ..op(Post, "/api/v1/instances/{instance}/keys", "createKey")
            },
            create_key,
        ),
        route(
            Operation {
                tag: "keys",
                summary: "Delete an AccessKey",
                status: 204,
                errors: E_LIST,
                ..op(Delete, "/api/v1/instances/{instance}/keys/{access_key_id}", "deleteKey")
            },
            delete_key,
        ),
        // Device credentials
        route(
            Operation {
                tag: "credentials",
                summary: "List the client ids with a device credential",
                reply: Reply::One("CredentialClientIds"),
                errors: E_LIST,
                ..op(Get, "/api/v1/instances/{instance}/credentials", "listCredentials")
            },
            list_credentials,
        ),
        route(
            Operation {
                tag: "credentials",
                summary: "Register (or replace) the device credential of a client id",
                body: Some("DeviceCredentialCreate"),
                status: 201,
                reply: Reply::One("DeviceCredential"),
                errors: E_LIST,
                ..op(Post, "/api/v1/instances/{instance}/credentials", "registerCredential")
            },
            register_credential,
        ),
        route(
            Operation {
                tag: "credentials",
                summary: "Get the device credential of a client id (with its secret)",
                reply: Reply::One("DeviceCredential"),
                errors: E_LIST,
                ..op(Get, "/api/v1/instances/{instance}/credentials/{client_id}", "getCredential")
            },
            get_credential,
        ),
        route(
            Operation {
                tag: "credentials",
                summary: "Give a device credential a new secret",
                status: 200,
                reply: Reply::One("DeviceCredential"),
                errors: E_LIST,
                ..op(Post, "/api/v1/instances/{instance}/credentials/{client_id}/refresh", "refreshCredential")
            },
            refresh_credential,
        ),
        route(
            Operation {
                tag: "credentials",
                summary: "Delete the device credential of a client id",
                status: 204,
                errors: E_LIST,
                ..op(Delete, "/api/v1/instances/{instance}/credentials/{client_id}", "deleteCredential")
            },
            delete_credential,
        ),
        // Tokens
        route(
            Operation {
                tag: "tokens",
                summary: "Issue a token",
                body: Some("TokenApply"),
                status: 201,
                reply: Reply::One("Token"),
                errors: E_LIST,
                ..op(Post, "/api/v1/instances/{instance}/tokens", "applyToken")
            },
            apply_token,
        ),
        route(
            Operation {
                tag: "tokens",
                summary: "Get a token",
                reply: Reply::One("Token"),
                errors: E_LIST,
                ..op(Get, "/api/v1/instances/{instance}/tokens/{token}", "getToken")
            },
            get_token,
        ),
        route(
            Operation {
                tag: "tokens",
                summary: "Revoke a token",
                description: "The token stays queryable (with `revoked: true`) until it expires.",
                status: 204,
                errors: E_LIST,
                ..op(Delete, "/api/v1/instances/{instance}/tokens/{token}", "revokeToken")
            },
            revoke_token,
        ),
        // Clients
        route(
            Operation {
                tag: "instances",
                summary: "List the instance's alarm events",
                description: "Events an operator must hear about, oldest first: `offline_messages_evicted` \
when the instance held `max_offline_messages` queued messages and the oldest were deleted. Repeats within a \
minute fold into one event (`count`, `last_at`). The newest 1,000 events (all instances) are kept, in memory.",
                reply: Reply::List("Alarm"),
                errors: E_LIST,
                ..op(Get, "/api/v1/instances/{instance}/alarms", "listAlarms")
            },
            list_alarms,
        ),
        route(
            Operation {
                tag: "clients",
                summary: "List the client sessions of an instance",
                reply: Reply::List("ClientView"),
                errors: E_BROKER,
                ..op(Get, "/api/v1/instances/{instance}/clients", "listClients")
            },
            list_clients,
        ),
        route(
            Operation {
                tag: "clients",
                summary: "Get a client session",
                description: "404 `ClientNotFound` when the broker has no session for the client id.",
                reply: Reply::One("ClientView"),
                errors: E_BROKER,
                ..op(Get, "/api/v1/instances/{instance}/clients/{client_id}", "getClient")
            },
            get_client,
        ),
        route(
            Operation {
                tag: "clients",
                summary: "Disconnect a client",
                description: "MQTT 5 clients receive DISCONNECT 0x98 (administrative action). `kicked` is false when the client was not connected.",
                reply: Reply::One("Kicked"),
                errors: E_BROKER,
                ..op(Delete, "/api/v1/instances/{instance}/clients/{client_id}", "kickClient")
            },
            kick_client,
        ),
        route(
            Operation {
                tag: "clients",
                summary: "Count the sessions subscribed to a topic",
                query: &[QueryParam {
                    name: "topic",
                    description: "A topic name (no wildcards).",
                    required: true,
                }],
                reply: Reply::One("SubscriberCount"),
                errors: E_BROKER,
                ..op(Get, "/api/v1/instances/{instance}/subscribers", "countSubscribers")
            },
            subscribers,
        ),
        route(
            Operation {
                tag: "messages",
                summary: "Publish a message as the server",
                body: Some("Message"),
                status: 201,
                reply: Reply::One("MessageSent"),
                errors: E_BROKER,
                ..op(Post, "/api/v1/instances/{instance}/messages", "publishMessage")
            },
            publish,
        ),
        // Admin keys
        route(
            Operation {
                tag: "admin-keys",
                summary: "List admin keys (without secrets)",
                reply: Reply::List("AdminKey"),
                ..op(Get, "/api/v1/admin-keys", "listAdminKeys")
            },
            list_admin_keys,
        ),
        route(
            Operation {
                tag: "admin-keys",
                summary: "Create an admin key",
                description: "No request body. The answer is the only time the secret is shown.",
                status: 201,
                reply: Reply::One("AdminKeyCreated"),
                ..op(Post, "/api/v1/admin-keys", "createAdminKey")
            },
            create_admin_key,
        ),
        route(
            Operation {
                tag: "admin-keys",
                summary: "Delete an admin key",
                description: "The last admin key cannot be deleted (409 `LastAdminKey`).",
                status: 204,
                errors: &[400, 401, 404, 409],
                ..op(Delete, "/api/v1/admin-keys/{id}", "deleteAdminKey")
            },
            delete_admin_key,
        ),
    ]
}

/// The operations of [`table`] (what the OpenAPI document describes).
pub fn operations() -> Vec<Operation> {
    table().into_iter().map(|r| r.op).collect()
}

/// The REST routes: the [`table`], a JSON 405 (with `Allow`) for other methods on its paths,
/// and a JSON 404 for other paths under `/api/v1`.
pub fn routes() -> Router<AdminState> {
    // Group the routes by path, keeping the table's order.
    let mut paths: Vec<(&'static str, MethodRouter<AdminState>, Vec<Method>)> = Vec::new();
    for r in table() {
        match paths.iter_mut().find(|(p, _, _)| *p == r.op.path) {
            Some((_, mr, methods)) => {
                *mr = std::mem::take(mr).merge(r.handler);
                methods.push(r.op.method);
            }
            None => paths.push((r.op.path, r.handler, vec![r.op.method])),
        }
    }
    let mut router = Router::new();
    for (path, mr, methods) in paths {
        let allow = methods
            .iter()
            .map(|m| m.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        router = router.route(path, mr.fallback(method_not_allowed(allow)));
    }
    router.route("/api/v1/{*rest}", any(no_route))
}

/// The handler for a path's other methods: a JSON 405 naming the allowed ones (`allow`, as in
/// the `Allow` header it also sets).
pub(crate) fn method_not_allowed(
    allow: String,
) -> impl Fn(Request) -> std::future::Ready<Response> + Clone + Send + Sync + 'static {
    move |req: Request| {
        let mut res = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!(
                "{} {}: allowed methods are {allow}",
                req.method(),
                req.uri().path()
            ),
        )
        .into_response();
        if let Ok(v) = HeaderValue::from_str(&allow) {
            res.headers_mut().insert(ALLOW, v);
        }
        std::future::ready(res)
    }
}

async fn no_route(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "RouteNotFound",
        format!(
            "no route {} {} (see /api/v1/openapi.json)",
            req.method(),
            req.uri().path()
        ),
    )
}

// ----------------------------------------------------------------------------------------
// Handlers

type St = State<AdminState>;

fn created<T: Serialize>(v: T) -> Response {
    (StatusCode::CREATED, Json(v)).into_response()
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

async fn openapi_json() -> Json<&'static Value> {
    Json(crate::openapi::spec())
}

// Instances

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceCreate {
    id: String,
    #[serde(default)]
    name: String,
    profile: Profile,
    #[serde(default)]
    settings: Option<Map<String, Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceUpdate {
    settings: Map<String, Value>,
}

/// `patch`'s fields over `base`.
fn merge_settings(
    base: &InstanceSettings,
    patch: Map<String, Value>,
) -> ApiResult<InstanceSettings> {
    let mut v = serde_json::to_value(base).map_err(|e| ApiError::invalid(e.to_string()))?;
    let obj = v.as_object_mut().expect("settings serialize to an object");
    for (k, val) in patch {
        obj.insert(k, val);
    }
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::invalid(format!("settings: {inner}"))
        } else {
            ApiError::invalid(format!("settings.{path}: {inner}"))
        }
    })
}

async fn list_instances(_: Admin, State(s): St) -> Json<Vec<ferry_meta::Instance>> {
    Json(s.meta.instances())
}

async fn create_instance(_: Admin, State(s): St, J(b): J<InstanceCreate>) -> ApiResult<Response> {
    let settings = match b.settings {
        Some(patch) => Some(merge_settings(
            &InstanceSettings::for_profile(b.profile),
            patch,
        )?),
        None => None,
    };
    let inst = s
        .meta
        .create_instance(&b.id, &b.name, b.profile, settings, now_ms())?;
    Ok(created(inst))
}

async fn get_instance(
    _: Admin,
    State(s): St,
    P(instance): P<String>,
) -> ApiResult<Json<ferry_meta::Instance>> {
    Ok(Json(s.meta.instance(&instance)?))
}

async fn update_instance(
    _: Admin,
    State(s): St,
    P(instance): P<String>,
    J(b): J<InstanceUpdate>,
) -> ApiResult<Json<ferry_meta::Instance>> {
    let current = s.meta.instance(&instance)?;
    let settings = merge_settings(&current.settings, b.settings)?;
    Ok(Json(s.meta.update_settings(&instance, settings)?))
}

async fn delete_instance(_: Admin, State(s): St, P(instance): P<String>) -> ApiResult<Response> {
    s.control.delete_instance(&instance).await?;
    Ok(no_content())
}

// Parent topics

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicCreate {
    name: String,
}

async fn list_topics(
    _: Admin,
    State(s): St,
    P(instance): P<String>,
) -> ApiResult<Json<Vec<ferry_meta::ParentTopic>>> {
    Ok(Json(s.meta.topics(&instance)?))
}

async fn create_topic(
    _: Admin,
    State(s): St,
    P(instance): P<String>,
    J(b): J<TopicCreate>,
) -> ApiResult<Response> {
    Ok(created(s.meta.create_topic(
        &instance,
        &b.name,
        now_ms(),
    )?))
}

async fn delete_topic(
    _: Admin,
    State(s): St,
    P((instance, name)): P<(String, String)>,
) -> ApiResult<Response> {
    s.meta.delete_topic(&instance, &name)?;
    Ok(no_content())
}

// Rules

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleCreate {
    name: String,
    #[serde(rename = "type")]
    rule_type: ferry_meta::RuleType,
    source: String,
    target: String,
    #[serde(default)]
    tag_filter: Option<String>,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    remote: Option<ferry_meta::RemoteEndpoint>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleUpdate {
    enabled: bool,
}

async fn rules_changed(s: &AdminState, instance: &str) {
    if let Some(f) = &s.rules_changed {
        f(instance.to_string()).await;
    }
}

async fn list_rules(
    _: Admin,
    State(s): St,
    P(instance): P<String>,
) -> ApiResult<Json<Vec<ferry_meta::Rule>>> {
    Ok(Json(s.meta.rules(&instance)?))
}

async fn create_rule(
    _: Admin,
    State(s): St,
    P(instance): P<String>,
    J(b): J<RuleCreate>,
) -> ApiResult<Response> {
    let rule = s.meta.create_rule(
        &instance,
        ferry_meta::Rule {
            name: b.name,
            rule_type: b.rule_type,
            source: b.source,
            target: b.target,
            tag_filter: b.tag_filter.unwrap_or_default(),
            enabled: b.enabled,
            remote: b.remote,
            created_at: now_ms(),
        },
    )?;
    rules_changed(&s, &instance).await;
    Ok(created(rule))
}

async fn get_rule(
    _: Admin,
    State(s): St,
    P((instance, name)): P<(String, String)>,
) -> ApiResult<Json<ferry_meta::Rule>> {
    Ok(Json(s.meta.rule(&instance, &name)?))
}

async fn update_rule(
    _: Admin,
    State(s): St,
    P((instance, name)): P<(String, String)>,
    J(b): J<RuleUpdate>,
) -> ApiResult<Json<ferry_meta::Rule>> {
    let rule = s.meta.set_rule_enabled(&instance, &name, b.enabled)?;
    rules_changed(&s, &instance).await;
    Ok(Json(rule))
}

async fn delete_rule(
    _: Admin,
    State(s): St,
    P((instance, name)): P<(String, String)>,
) -> ApiResult<Response> {
    s.meta.delete_rule(&instance, &name)?;
    rules_changed(&s, &instance).await;
    Ok(no_content())
}

// Groups

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupCreate {
    group_id: String,
}

async fn list_groups(
    _: Admin,
    State(s): St,
    P(instance): P<String>,
) -> ApiResult<Json<Vec<ferry_meta::Group>>> {
    Ok(Json(s.meta.groups(&instance)?))
}

async fn create_group(
    _: Admin,
    State(s): St,
    P(instance): P<String>,
    J(b): J<GroupCreate>,
) -> ApiResult<Response> {
    Ok(created(s.meta.create_group(
        &instance,
        &b.group_id,
        now_ms(),
    )?))
}

async fn delete_group(
    _: Admin,
    State(s): St,
    P((instance, group_id)): P<(String, String)>,
) -> ApiResult<Response> {
    s.meta.delete_group(&instance, &group_id)?;
    Ok(no_content())
}

async fn group_online(
    _: Admin,
    State(s): St,
    P((instance, group_id)): P<(String, String)>,
) -> ApiResult<Json<Value>> {
    if !s
        .meta
        .groups(&instance)?
        .iter()
        .any(|g| g.group_id == group_id)
    {
        return Err(MetaError::not_found(
            "GroupIdNotFound",
            format!("group {group_id:?} does not exist"),
        )
        .into());
    }
    let n = s.control.online_in_group(&instance, &group_id).await?;
    Ok(Json(json!({ "group_id": group_id, "online_count": n })))
}

// AccessKeys

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyCreate {
    permission: KeyPermission,
    #[serde(default)]
    topic_filters: Vec<String>,
}

#[derive(Serialize)]
struct KeyCreated {
    access_key_id: String,
    access_key_secret: String,
    permission: KeyPermission,
    topic_filters: Vec<String>,
    created_at: u64,
}

impl From<AccessKey> for KeyCreated {
    fn from(k: AccessKey) -> Self {
        KeyCreated {
            access_key_id: k.access_key_id,
            access_key_secret: k.secret,
            permission: k.permission,
            topic_filters: k.topic_filters,
            created_at: k.created_at,
        }
    }
}

async fn list_keys(
    _: Admin,
    State(s): St,
    P(instance): P<String>,
) -> ApiResult<Json<Vec<AccessKey>>> {
    Ok(Json(s.meta.keys(&instance)?))
}

async fn create_key(
    _: Admin,
    State(s): St,
    P(instance): P<String>,
    J(b): J<KeyCreate>,
) -> ApiResult<Response> {
    let key = s
        .meta
        .create_key(&instance, b.permission, b.topic_filters, now_ms())?;
    Ok(created(KeyCreated::from(key)))
}

async fn delete_key(
    _: Admin,
    State(s): St,
    P((instance, key_id)): P<(String, String)>,
) -> ApiResult<Response> {
    s.meta.delete_key(&instance, &key_id)?;
    Ok(no_content())
}

// Device credentials

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialCreate {
    client_id: String,
}

/// A credential with its secret.
#[derive(Serialize)]
struct CredentialOut {
    client_id: String,
    device_access_key_id: String,
    device_access_key_secret: String,
    created_at: u64,
    updated_at: u64,
}

impl From<DeviceCredential> for CredentialOut {
    fn from(c: DeviceCredential) -> Self {
        CredentialOut {
            client_id: c.client_id,
            device_access_key_id: c.device_access_key_id,
            device_access_key_secret: c.device_access_key_secret,
            created_at: c.created_at,
            updated_at: c.updated_at,
        }
    }
}

async fn list_credentials(
    _: Admin,
    State(s): St,
    P(instance): P<String>,
) -> ApiResult<Json<Value>> {
    let ids = s.meta.credential_client_ids(&instance)?;
    Ok(Json(json!({ "client_ids": ids })))
}

async fn register_credential(
    _: Admin,
    State(s): St,
    P(instance): P<String>,
    J(b): J<CredentialCreate>,
) -> ApiResult<Response> {
    let cred = s
        .meta
        .register_credential(&instance, &b.client_id, now_ms())?;
    Ok(created(CredentialOut::from(cred)))
}

async fn get_credential(
    _: Admin,
    State(s): St,
    P((instance, client_id)): P<(String, String)>,
) -> ApiResult<Json<CredentialOut>> {
    Ok(Json(s.meta.credential(&instance, &client_id)?.into()))
}

async fn refresh_credential(
    _: Admin,
    State(s): St,
    P((instance, client_id)): P<(String, String)>,
) -> ApiResult<Json<CredentialOut>> {
    Ok(Json(
        s.meta
            .refresh_credential(&instance, &client_id, now_ms())?
            .into(),
    ))
}

async fn delete_credential(
    _: Admin,
    State(s): St,
    P((instance, client_id)): P<(String, String)>,
) -> ApiResult<Response> {
    s.meta.unregister_credential(&instance, &client_id)?;
    Ok(no_content())
}

// Tokens

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenApply {
    resources: Vec<String>,
    actions: String,
    expire_at: Option<u64>,
    ttl_secs: Option<u64>,
}

async fn apply_token(
    _: Admin,
    State(s): St,
    P(instance): P<String>,
    J(b): J<TokenApply>,
) -> ApiResult<Response> {
    let actions = TokenActions::parse(&b.actions).ok_or_else(|| {
        ApiError::invalid(format!(
            "actions: must be \"R\", \"W\" or \"R,W\", got {:?}",
            b.actions
        ))
    })?;
    let now = now_ms();
    let expire_at = match (b.expire_at, b.ttl_secs) {
        (Some(at), None) => at,
        (None, Some(ttl)) => now.saturating_add(ttl.saturating_mul(1000)),
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "expire_at, ttl_secs: give one of them, not both",
            ))
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "expire_at / ttl_secs: one of them is required",
            ))
        }
    };
    let token = s
        .meta
        .apply_token(&instance, b.resources, actions, expire_at, now)?;
    Ok(created(token))
}

async fn get_token(
    _: Admin,
    State(s): St,
    P((instance, token)): P<(String, String)>,
) -> ApiResult<Json<ferry_meta::Token>> {
    Ok(Json(s.meta.token(&instance, &token)?))
}

async fn revoke_token(
    _: Admin,
    State(s): St,
    P((instance, token)): P<(String, String)>,
) -> ApiResult<Response> {
    s.meta.revoke_token(&instance, &token)?;
    Ok(no_content())
}

// Clients

#[derive(Serialize)]
struct SubscriptionOut {
    filter: String,
    qos: u8,
}

#[derive(Serialize)]
struct ClientOut {
    client_id: String,
    online: bool,
    address: Option<String>,
    protocol_level: Option<u8>,
    last_activity: Option<u64>,
    subscriptions: Vec<SubscriptionOut>,
    inflight: usize,
    queued: usize,
}

impl From<ClientView> for ClientOut {
    fn from(c: ClientView) -> Self {
        ClientOut {
            client_id: c.client_id,
            online: c.online,
            address: c.address,
            protocol_level: c.protocol_level,
            last_activity: c.last_activity_ms,
            subscriptions: c
                .subscriptions
                .into_iter()
                .map(|(filter, qos)| SubscriptionOut { filter, qos })
                .collect(),
            inflight: c.inflight,
            queued: c.queued,
        }
    }
}

#[derive(Serialize)]
struct AlarmOut {
    kind: &'static str,
    message: String,
    count: u64,
    first_at: u64,
    last_at: u64,
}

async fn list_alarms(
    _: Admin,
    State(s): St,
    P(instance): P<String>,
) -> ApiResult<Json<Vec<AlarmOut>>> {
    s.meta.instance(&instance)?;
    let alarms = s.control.alarms(&instance);
    Ok(Json(
        alarms
            .into_iter()
            .map(|a| AlarmOut {
                kind: a.kind.as_str(),
                message: a.message,
                count: a.count,
                first_at: a.first_ms,
                last_at: a.last_ms,
            })
            .collect(),
    ))
}

async fn list_clients(
    _: Admin,
    State(s): St,
    P(instance): P<String>,
) -> ApiResult<Json<Vec<ClientOut>>> {
    s.meta.instance(&instance)?;
    let clients = s.control.clients(&instance).await?;
    Ok(Json(clients.into_iter().map(ClientOut::from).collect()))
}

async fn get_client(
    _: Admin,
    State(s): St,
    P((instance, client_id)): P<(String, String)>,
) -> ApiResult<Json<ClientOut>> {
    s.meta.instance(&instance)?;
    match s.control.client(&instance, &client_id).await? {
        Some(c) => Ok(Json(c.into())),
        None => Err(MetaError::not_found(
            "ClientNotFound",
            format!("no session for client {client_id:?}"),
        )
        .into()),
    }
}

async fn kick_client(
    _: Admin,
    State(s): St,
    P((instance, client_id)): P<(String, String)>,
) -> ApiResult<Json<Value>> {
    s.meta.instance(&instance)?;
    let kicked = s.control.kick(&instance, &client_id).await?;
    Ok(Json(json!({ "kicked": kicked })))
}

#[derive(Deserialize)]
struct TopicQuery {
    topic: String,
}

async fn subscribers(
    _: Admin,
    State(s): St,
    P(instance): P<String>,
    Q(q): Q<TopicQuery>,
) -> ApiResult<Json<Value>> {
    s.meta.instance(&instance)?;
    let n = s.control.subscribers_of(&instance, &q.topic).await?;
    Ok(Json(json!({ "topic": q.topic, "subscriber_count": n })))
}

// Messages

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageIn {
    topic: String,
    payload: Option<String>,
    payload_base64: Option<String>,
    #[serde(default)]
    qos: u8,
    #[serde(default)]
    retain: bool,
    #[serde(default)]
    user_properties: BTreeMap<String, String>,
    content_type: Option<String>,
    message_expiry_interval: Option<u32>,
}

async fn publish(
    _: Admin,
    State(s): St,
    P(instance): P<String>,
    J(b): J<MessageIn>,
) -> ApiResult<Response> {
    let inst = s.meta.instance(&instance)?;
    let payload = match (b.payload, b.payload_base64) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "payload, payload_base64: give at most one of them",
            ))
        }
        (Some(p), None) => Bytes::from(p),
        (None, Some(p)) => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(p.trim())
                .map_err(|e| ApiError::invalid(format!("payload_base64: not base64: {e}")))?,
        ),
        (None, None) => Bytes::new(),
    };
    let settings = &inst.settings;
    if settings.max_payload_size != 0 && payload.len() > settings.max_payload_size as usize {
        return Err(ApiError::invalid(format!(
            "payload: {} bytes is more than the instance's max_payload_size of {}",
            payload.len(),
            settings.max_payload_size
        )));
    }
    if settings.require_parent_topic {
        let parent = b.topic.split('/').next().unwrap_or_default();
        if !s.meta.has_topic(&instance, parent) {
            return Err(ApiError::invalid(format!(
                "topic {:?}: parent topic {parent:?} does not exist in instance {instance:?}",
                b.topic
            )));
        }
        ferry_meta::validate::cloud_topic(
            &b.topic,
            settings.topic_min_len as usize,
            settings.topic_max_len as usize,
            false,
        )?;
    }
    let msg_id = s
        .control
        .publish(
            &instance,
            PublishRequest {
                topic: b.topic,
                payload,
                qos: b.qos,
                retain: b.retain,
                user_properties: b.user_properties.into_iter().collect(),
                content_type: b.content_type,
                message_expiry_interval: b.message_expiry_interval,
                ..Default::default()
            },
        )
        .await?;
    Ok(created(json!({ "msg_id": msg_id })))
}

// Admin keys

async fn list_admin_keys(_: Admin, State(s): St) -> Json<Vec<ferry_meta::AdminKey>> {
    Json(s.meta.admin_keys())
}

async fn create_admin_key(_: Admin, State(s): St) -> ApiResult<Response> {
    let k = s.meta.create_admin_key(now_ms())?;
    Ok(created(json!({
        "access_key_id": k.access_key_id,
        "access_key_secret": k.secret,
        "created_at": k.created_at,
    })))
}

async fn delete_admin_key(_: Admin, State(s): St, P(id): P<String>) -> ApiResult<Response> {
    let keys = s.meta.admin_keys();
    if !keys.iter().any(|k| k.access_key_id == id) {
        return Err(MetaError::not_found(
            "AccessKeyNotFound",
            format!("admin key {id:?} does not exist"),
        )
        .into());
    }
    if keys.len() == 1 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "LastAdminKey",
            format!("admin key {id:?} is the last one and cannot be deleted"),
        ));
    }
    s.meta.delete_admin_key(&id)?;
    Ok(no_content())
}
