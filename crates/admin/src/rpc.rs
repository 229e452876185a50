//! The cloud-compatible RPC API: `GET|POST /?Action=<Action>&Version=2020-04-20&…`, signed as
//! the cloud's RPC APIs are (see [`sign`]), answering with the cloud's JSON field names, so code
//! written with the cloud's official SDKs works against Ferry after its endpoint is changed.
//!
//! A request's parameters are read from the query string and, when the body is
//! `application/x-www-form-urlencoded`, from the body too. Two signature schemes are verified:
//!
//! - **Version 1.0** (`SignatureMethod=HMAC-SHA1`, the classic SDKs such as
//!   `aliyun-python-sdk-core`): the common parameters `AccessKeyId`, `Action`, `Version`,
//!   `Signature`, `SignatureMethod`, `SignatureVersion` (`1.0`), `SignatureNonce` and `Timestamp`
//!   are parameters, and the signature covers every parameter, body ones included.
//! - **Version 3** (`Authorization: ACS3-HMAC-SHA256 …`, the default of the newer
//!   `alibabacloud-*` SDKs): the common parameters are `x-acs-action`, `x-acs-version`,
//!   `x-acs-date`, `x-acs-signature-nonce` and `x-acs-content-sha256` headers, which the
//!   signature must cover together with `host`, the query and the body's SHA-256.
//!
//! Either way a request is accepted when its timestamp is within 15 minutes of the server's
//! clock, its AccessKeyId is an admin key whose signature it carries (compared in constant
//! time), its `(AccessKeyId, nonce)` pair was not used within the last 30 minutes (a bounded
//! cache remembers it), `Format`, if given, is `JSON`, and its version is `2020-04-20`.
//!
//! Every answer is JSON with a `RequestId`; an error also has `HostId`, `Code` and `Message`
//! and an HTTP error status. Authentication errors use the cloud's standard codes
//! (`InvalidAccessKeyId.NotFound` 404, `SignatureDoesNotMatch` 400 with the server's string to
//! sign in the message as the cloud gives it, `SignatureNonceUsed` 400,
//! `InvalidTimeStamp.Expired` 400, `IncompleteSignature` 400, `MissingParameter` 400,
//! `InvalidVersion` 400, `InvalidAction.NotFound` 404); the actions' errors carry the codes of
//! [`ferry_meta::MetaError`] (`InstanceNotFound` 404, `ParameterCheckFailed` 400,
//! `GroupIdAlreadyExsited` 400 — spelled so, …). The actions are in [`actions`].

pub mod actions;
pub mod sign;

use crate::AdminState;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use ferry_broker::ControlError;
use ferry_meta::{ErrorKind, MetaError};
use serde_json::{Map, Value};
use sign::{NonceCache, NonceError, TIMESTAMP_WINDOW_MS};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The API version Ferry implements (the cloud's `OnsMqtt` 2020-04-20).
pub const API_VERSION: &str = "2020-04-20";

/// Nonces remembered at once (about 550 signed requests a second, sustained over the window).
const NONCE_CAPACITY: usize = 1_000_000;

/// The RPC endpoint at `/`, for GET and POST.
pub fn routes() -> Router<AdminState> {
    let nonces = Arc::new(NonceCache::new(NONCE_CAPACITY));
    let handler = move |State(state): State<AdminState>,
                        method: Method,
                        uri: Uri,
                        headers: HeaderMap,
                        body: Bytes| {
        let nonces = nonces.clone();
        async move { handle(&state, &nonces, &method, &uri, &headers, &body).await }
    };
    Router::new().route("/", get(handler.clone()).post(handler))
}

/// A failed call: HTTP status, the cloud's error code and a message saying what and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub status: StatusCode,
    pub code: Cow<'static, str>,
    pub message: String,
}

impl RpcError {
    pub fn new(
        status: StatusCode,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        RpcError {
            status,
            code: code.into(),
            message: message.into(),
        }
    }

    /// A business parameter is missing or breaks a rule (400 `ParameterCheckFailed`).
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "ParameterCheckFailed", message)
    }
}

impl From<MetaError> for RpcError {
    fn from(e: MetaError) -> Self {
        let status = match e.kind {
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Unauthorized => StatusCode::FORBIDDEN,
            // The cloud answers "exists already" and limits with 400.
            ErrorKind::Invalid | ErrorKind::Limit | ErrorKind::Conflict => StatusCode::BAD_REQUEST,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        RpcError::new(status, e.code, e.message)
    }
}

impl From<ControlError> for RpcError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Meta(e) => e.into(),
            ControlError::Invalid(m) => RpcError::invalid(m),
            ControlError::Store(m) => RpcError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                format!("the store could not write: {m}"),
            ),
            ControlError::Unavailable => RpcError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "the broker is shutting down",
            ),
        }
    }
}

/// A request's parameters, decoded, by name.
#[derive(Debug, Clone, Default)]
pub struct Params {
    map: BTreeMap<String, String>,
}

impl Params {
    /// Builds from decoded pairs; a name given twice is refused (its meaning, and what was
    /// signed, would be ambiguous).
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Result<Self, RpcError> {
        let mut map = BTreeMap::new();
        for (k, v) in pairs {
            if k.is_empty() {
                continue;
            }
            if map.contains_key(&k) {
                return Err(RpcError::invalid(format!(
                    "parameter {k} is given more than once"
                )));
            }
            map.insert(k, v);
        }
        Ok(Params { map })
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.map.get(name).map(String::as_str)
    }

    /// A business parameter that must be present and not empty.
    pub fn required(&self, name: &str) -> Result<&str, RpcError> {
        match self.get(name) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(RpcError::invalid(format!("{name} is required"))),
        }
    }

    /// A list parameter flattened as `Name.1`, `Name.2`, …, in index order.
    pub fn list(&self, name: &str) -> Result<Vec<&str>, RpcError> {
        let prefix = format!("{name}.");
        let mut items = Vec::new();
        for (k, v) in self.map.range(prefix.clone()..) {
            let Some(index) = k.strip_prefix(&prefix) else {
                break;
            };
            let n: usize = index
                .parse()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| RpcError::invalid(format!("{k}: list indexes are 1, 2, …")))?;
            items.push((n, v.as_str()));
        }
        items.sort();
        Ok(items.into_iter().map(|(_, v)| v).collect())
    }

    fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.map.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// A fresh request id: 16 random bytes as an upper-case UUID-shaped string.
pub fn request_id() -> String {
    let b: [u8; 16] = ferry_meta::random_bytes();
    let hex: String = b.iter().map(|x| format!("{x:02X}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The decoded parameters of the query string, and of the form body if there is one.
type Pairs = Vec<(String, String)>;

fn read_params(uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Result<(Pairs, Pairs), RpcError> {
    let bad = |m: String| RpcError::invalid(format!("malformed parameters: {m}"));
    let query = sign::parse_pairs(uri.query().unwrap_or("")).map_err(bad)?;
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        });
    let mut body_pairs = Vec::new();
    if form && !body.is_empty() {
        let body = std::str::from_utf8(body)
            .map_err(|_| RpcError::invalid("the form body is not UTF-8"))?;
        body_pairs = sign::parse_pairs(body).map_err(bad)?;
    }
    Ok((query, body_pairs))
}

fn common<'a>(p: &'a Params, name: &str) -> Result<&'a str, RpcError> {
    match p.get(name) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(missing(name)),
    }
}

fn missing(name: &str) -> RpcError {
    RpcError::new(
        StatusCode::BAD_REQUEST,
        "MissingParameter",
        format!("the common parameter {name} is required"),
    )
}

fn header_value<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, RpcError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| missing(name))
}

fn incomplete(message: impl Into<String>) -> RpcError {
    RpcError::new(StatusCode::BAD_REQUEST, "IncompleteSignature", message)
}

fn signature_mismatch(string_to_sign: &str) -> RpcError {
    // The cloud's wording: its SDKs read the string to sign after the colon.
    RpcError::new(
        StatusCode::BAD_REQUEST,
        "SignatureDoesNotMatch",
        format!(
            "Specified signature is not matched with our calculation. server string to sign \
             is:{string_to_sign}"
        ),
    )
}

/// What a verified request asks for.
struct Call {
    action: String,
    version: String,
}

/// The timestamp window, the key, then (after the caller's signature check) the nonce.
struct Guard<'a> {
    state: &'a AdminState,
    nonces: &'a NonceCache,
    now: u64,
}

impl Guard<'_> {
    fn timestamp(&self, name: &str, timestamp: &str) -> Result<(), RpcError> {
        let at = sign::parse_timestamp(timestamp).ok_or_else(|| {
            RpcError::new(
                StatusCode::BAD_REQUEST,
                "InvalidTimeStamp.Format",
                format!("{name} {timestamp:?}: must be ISO 8601 UTC, as 2020-04-20T12:00:00Z"),
            )
        })?;
        if at.abs_diff(self.now) > TIMESTAMP_WINDOW_MS {
            return Err(RpcError::new(
                StatusCode::BAD_REQUEST,
                "InvalidTimeStamp.Expired",
                format!(
                    "{name} {timestamp} is more than 15 minutes away from the server's time; \
                     check the client's clock"
                ),
            ));
        }
        Ok(())
    }

    fn secret(&self, key_id: &str) -> Result<String, RpcError> {
        self.state.meta.admin_secret(key_id).ok_or_else(|| {
            RpcError::new(
                StatusCode::NOT_FOUND,
                "InvalidAccessKeyId.NotFound",
                "Specified access key is not found.",
            )
        })
    }

    fn nonce(&self, key_id: &str, nonce: &str) -> Result<(), RpcError> {
        match self.nonces.check(key_id, nonce, self.now) {
            Ok(()) => Ok(()),
            Err(NonceError::Used) => Err(RpcError::new(
                StatusCode::BAD_REQUEST,
                "SignatureNonceUsed",
                "Specified signature nonce was used already.",
            )),
            Err(NonceError::Full) => Err(RpcError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "Throttling",
                "too many signed requests within the replay window; retry later",
            )),
        }
    }
}

/// Signature version 1.0: the common parameters and `Signature` among the parameters.
fn authenticate_v1(guard: &Guard, method: &Method, p: &Params) -> Result<Call, RpcError> {
    let action = common(p, "Action")?;
    let version = common(p, "Version")?;
    let key_id = common(p, "AccessKeyId")?;
    let given = common(p, "Signature")?;
    let method_name = common(p, "SignatureMethod")?;
    let signature_version = common(p, "SignatureVersion")?;
    let nonce = common(p, "SignatureNonce")?;
    let timestamp = common(p, "Timestamp")?;
    if method_name != "HMAC-SHA1" || signature_version != "1.0" {
        return Err(incomplete(format!(
            "SignatureMethod {method_name:?} / SignatureVersion {signature_version:?}: Ferry \
             verifies HMAC-SHA1 signatures of version 1.0, and ACS3-HMAC-SHA256"
        )));
    }
    guard.timestamp("Timestamp", timestamp)?;
    let secret = guard.secret(key_id)?;
    let string_to_sign = sign::string_to_sign(method.as_str(), p.iter());
    let expected = sign::signature(&secret, &string_to_sign);
    if !ferry_meta::auth::secrets_equal(&expected, given) {
        return Err(signature_mismatch(&string_to_sign));
    }
    guard.nonce(key_id, nonce)?;
    Ok(Call {
        action: action.to_string(),
        version: version.to_string(),
    })
}

/// Headers a version 3 signature must cover.
const ACS3_REQUIRED_HEADERS: &[&str] = &[
    "host",
    "x-acs-action",
    "x-acs-content-sha256",
    "x-acs-date",
    "x-acs-signature-nonce",
    "x-acs-version",
];

/// Signature version 3 (`ACS3-HMAC-SHA256`): the common parameters in `x-acs-*` headers, the
/// signature in `Authorization`.
fn authenticate_v3(
    guard: &Guard,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    query: &Pairs,
    body: &[u8],
    authorization: &str,
) -> Result<Call, RpcError> {
    let auth = sign::parse_acs3_authorization(authorization).ok_or_else(|| {
        incomplete(
            "Authorization: must be ACS3-HMAC-SHA256 Credential=<AccessKeyId>,\
             SignedHeaders=<names>,Signature=<hex>",
        )
    })?;
    if auth.algorithm != sign::ACS3_HMAC_SHA256 {
        return Err(incomplete(format!(
            "signature algorithm {}: Ferry verifies ACS3-HMAC-SHA256 (and HMAC-SHA1 of version 1.0)",
            auth.algorithm
        )));
    }
    let signed: Vec<&str> = auth.signed_headers.split(';').collect();
    if let Some(absent) = ACS3_REQUIRED_HEADERS.iter().find(|h| !signed.contains(h)) {
        return Err(incomplete(format!(
            "SignedHeaders must include {absent} (and {})",
            ACS3_REQUIRED_HEADERS.join(", ")
        )));
    }
    let action = header_value(headers, "x-acs-action")?;
    let version = header_value(headers, "x-acs-version")?;
    let nonce = header_value(headers, "x-acs-signature-nonce")?;
    let date = header_value(headers, "x-acs-date")?;
    let content_sha256 = header_value(headers, "x-acs-content-sha256")?;
    guard.timestamp("x-acs-date", date)?;
    let secret = guard.secret(auth.key_id)?;
    let payload = sign::sha256_hex(body);
    if !content_sha256.eq_ignore_ascii_case(&payload) {
        return Err(RpcError::new(
            StatusCode::BAD_REQUEST,
            "SignatureDoesNotMatch",
            "x-acs-content-sha256 is not the SHA-256 of the request body",
        ));
    }
    let all_headers = headers
        .iter()
        .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)));
    let canonical = sign::acs3_canonical_request(
        method.as_str(),
        uri.path(),
        query.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        all_headers,
        &signed,
        &payload,
    );
    let string_to_sign = sign::acs3_string_to_sign(&canonical);
    let expected = sign::acs3_signature(&secret, &string_to_sign);
    if !ferry_meta::auth::secrets_equal(&expected, &auth.signature.to_ascii_lowercase()) {
        return Err(signature_mismatch(&string_to_sign));
    }
    guard.nonce(auth.key_id, nonce)?;
    Ok(Call {
        action: action.to_string(),
        version: version.to_string(),
    })
}

async fn handle(
    state: &AdminState,
    nonces: &NonceCache,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let request_id = request_id();
    let result = async {
        let (query, form) = read_params(uri, headers, body)?;
        let p = Params::from_pairs(query.iter().chain(form.iter()).cloned())?;
        if let Some(format) = p.get("Format") {
            if !format.eq_ignore_ascii_case("JSON") {
                return Err(RpcError::invalid(format!(
                    "Format {format:?}: Ferry answers in JSON only"
                )));
            }
        }
        let guard = Guard {
            state,
            nonces,
            now: ferry_meta::now_ms(),
        };
        let call = match headers.get(header::AUTHORIZATION) {
            Some(auth) => {
                let auth = auth
                    .to_str()
                    .map_err(|_| incomplete("Authorization: not ASCII"))?;
                authenticate_v3(&guard, method, uri, headers, &query, body, auth)?
            }
            None => authenticate_v1(&guard, method, &p)?,
        };
        if call.version != API_VERSION {
            return Err(RpcError::new(
                StatusCode::BAD_REQUEST,
                "InvalidVersion",
                format!(
                    "Specified parameter Version {:?} is not valid; Ferry serves {API_VERSION}",
                    call.version
                ),
            ));
        }
        actions::dispatch(state, &call.action, &p, guard.now).await
    }
    .await;
    let (status, mut body) = match result {
        Ok(fields) => (StatusCode::OK, fields),
        Err(e) => {
            let host = headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("ferry")
                .to_string();
            let mut m = Map::new();
            m.insert("HostId".into(), Value::String(host));
            m.insert("Code".into(), Value::String(e.code.into_owned()));
            m.insert("Message".into(), Value::String(e.message));
            (e.status, m)
        }
    };
    body.insert("RequestId".into(), Value::String(request_id.clone()));
    let mut response = (status, axum::Json(Value::Object(body))).into_response();
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-acs-request-id", v);
    }
    response
}
