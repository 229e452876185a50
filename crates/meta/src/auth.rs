//! The cloud's CONNECT authentication schemes (§2) and the permissions they grant.

use base64::Engine;
use ferry_codec::ReasonCode;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use subtle::ConstantTimeEq;

/// The scheme named by the first field of the user name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    Signature,
    Token,
    DeviceCredential,
}

/// A user name of the form `<Mode>|<KeyId>|<InstanceId>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloudUser<'a> {
    pub mode: AuthMode,
    pub key_id: &'a str,
    pub instance: &'a str,
}

/// Parses a cloud user name. `None` when it has no `|` (the listener's own users then apply);
/// `Some(Err)` when it has `|` but is not one of the three forms.
pub fn parse_username(username: &str) -> Option<Result<CloudUser<'_>, AuthError>> {
    if !username.contains('|') {
        return None;
    }
    let mut parts = username.split('|');
    let (Some(mode), Some(key_id), Some(instance), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Some(Err(AuthError::bad(
            "user name must be <Mode>|<AccessKeyId>|<InstanceId>",
        )));
    };
    let mode = match mode {
        "Signature" => AuthMode::Signature,
        "Token" => AuthMode::Token,
        "DeviceCredential" => AuthMode::DeviceCredential,
        _ => {
            return Some(Err(AuthError::bad(
                "unknown mode: use Signature, Token or DeviceCredential",
            )))
        }
    };
    Some(Ok(CloudUser {
        mode,
        key_id,
        instance,
    }))
}

/// `Base64(HMAC-SHA1(key, message))`, the password of the Signature and DeviceCredential modes.
pub fn hmac_sha1_base64(key: &str, message: &str) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(key.as_bytes()).expect("HMAC takes any key length");
    mac.update(message.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Checks a Signature / DeviceCredential password in constant time.
pub fn verify_signature(secret: &str, client_id: &str, password: &[u8]) -> bool {
    let expected = hmac_sha1_base64(secret, client_id);
    bool::from(expected.as_bytes().ct_eq(password))
}

/// Compares two secrets in constant time (for their contents).
pub fn secrets_equal(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

pub use ferry_core::acl::{Grant, Permissions};

/// The permissions of an AccessKey with `permission`, narrowed to `filters` if any.
pub fn key_permissions(permission: crate::KeyPermission, filters: &[String]) -> Permissions {
    use crate::KeyPermission::*;
    let (publish, subscribe) = match permission {
        Full => (Grant::All, Grant::All),
        PubOnly => (Grant::All, Grant::Nothing),
        SubOnly => (Grant::Nothing, Grant::All),
    };
    Permissions {
        publish: publish.narrowed_to(filters),
        subscribe: subscribe.narrowed_to(filters),
    }
}

/// The token types of a Token-mode password: `R`, `W` or `RW`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    R,
    W,
    RW,
}

impl TokenType {
    pub fn parse(s: &str) -> Option<TokenType> {
        match s {
            "R" => Some(TokenType::R),
            "W" => Some(TokenType::W),
            "RW" => Some(TokenType::RW),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            TokenType::R => "R",
            TokenType::W => "W",
            TokenType::RW => "RW",
        }
    }
}

/// Splits a Token-mode password `type|token[|type|token]`.
pub fn parse_token_password(password: &str) -> Result<Vec<(TokenType, &str)>, AuthError> {
    let parts: Vec<&str> = password.split('|').collect();
    if parts.is_empty() || !parts.len().is_multiple_of(2) || parts.len() > 6 {
        return Err(AuthError::token(
            1,
            "password must be type|token[|type|token]",
        ));
    }
    parts
        .chunks(2)
        .map(|pair| {
            let kind = TokenType::parse(pair[0])
                .ok_or_else(|| AuthError::token(1, "token type must be R, W or RW"))?;
            if pair[1].is_empty() {
                return Err(AuthError::token(1, "empty token"));
            }
            Ok((kind, pair[1]))
        })
        .collect()
}

/// A token a connection holds, with its type and expiry (for the expiry notice and the
/// disconnect).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldToken {
    pub kind: TokenType,
    pub token: String,
    pub expire_at: u64,
    pub resources: Vec<String>,
}

/// The permissions a set of held tokens grants: `R` resources to subscribe, `W` to publish.
pub fn token_permissions(tokens: &[HeldToken]) -> Permissions {
    let mut publish = Vec::new();
    let mut subscribe = Vec::new();
    for t in tokens {
        if matches!(t.kind, TokenType::R | TokenType::RW) {
            subscribe.extend(t.resources.iter().cloned());
        }
        if matches!(t.kind, TokenType::W | TokenType::RW) {
            publish.extend(t.resources.iter().cloned());
        }
    }
    let grant = |filters: Vec<String>| {
        if filters.is_empty() {
            Grant::Nothing
        } else {
            Grant::Filters(filters)
        }
    };
    Permissions {
        publish: grant(publish),
        subscribe: grant(subscribe),
    }
}

/// The outcome of a successful authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub instance: String,
    pub mode: Option<AuthMode>,
    /// The AccessKeyId (or device key id) used.
    pub key_id: Option<String>,
    pub permissions: Permissions,
    pub tokens: Vec<HeldToken>,
}

/// Why authentication failed: the CONNACK reason code, a reason for logs (never a secret),
/// and for token failures the `$SYS/tokenInvalidNotice` code (§2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthError {
    pub code: ReasonCode,
    pub reason: String,
    pub token_code: Option<u8>,
}

impl AuthError {
    pub fn bad(reason: impl Into<String>) -> Self {
        AuthError {
            code: ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            reason: reason.into(),
            token_code: None,
        }
    }
    pub fn not_authorized(reason: impl Into<String>) -> Self {
        AuthError {
            code: ReasonCode::NOT_AUTHORIZED,
            reason: reason.into(),
            token_code: None,
        }
    }
    pub fn client_id(reason: impl Into<String>) -> Self {
        AuthError {
            code: ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            reason: reason.into(),
            token_code: None,
        }
    }
    pub fn token(code: u8, reason: impl Into<String>) -> Self {
        AuthError {
            code: ReasonCode::NOT_AUTHORIZED,
            reason: reason.into(),
            token_code: Some(code),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vectors of the product contract, §2.
    #[test]
    fn contract_vectors() {
        assert_eq!(
            hmac_sha1_base64("XXXXX", "GID_Test@@@0001"),
            "vI009IZJZVGRwBwZvnbwjfuXxVM="
        );
        assert_eq!(
            hmac_sha1_base64("DC.BJMkn4eMQJK2vaApTS0000", "GID_test@@@test"),
            "UvBba3SccsvCdDGqimGy3IPs4VI="
        );
        assert!(verify_signature(
            "XXXXX",
            "GID_Test@@@0001",
            b"vI009IZJZVGRwBwZvnbwjfuXxVM="
        ));
        assert!(!verify_signature(
            "XXXXX",
            "GID_Test@@@0002",
            b"vI009IZJZVGRwBwZvnbwjfuXxVM="
        ));
    }

    #[test]
    fn user_names() {
        assert_eq!(parse_username("alice"), None);
        let u = parse_username("Signature|AK1|mqtt-local").unwrap().unwrap();
        assert_eq!(
            (u.mode, u.key_id, u.instance),
            (AuthMode::Signature, "AK1", "mqtt-local")
        );
        assert!(parse_username("Magic|AK1|x").unwrap().is_err());
        assert!(parse_username("Token|AK1").unwrap().is_err());
    }

    #[test]
    fn token_passwords() {
        assert_eq!(
            parse_token_password("R|abc|W|def").unwrap(),
            vec![(TokenType::R, "abc"), (TokenType::W, "def")]
        );
        assert_eq!(
            parse_token_password("RW|xyz").unwrap(),
            vec![(TokenType::RW, "xyz")]
        );
        assert!(parse_token_password("R").is_err());
        assert!(parse_token_password("X|abc").is_err());
    }

    #[test]
    fn grants() {
        let p = key_permissions(crate::KeyPermission::PubOnly, &["a/#".to_string()]);
        assert!(p.publish.allows("a/b"));
        assert!(!p.publish.allows("b/c"));
        assert!(!p.subscribe.allows("a/b"));
        let full = key_permissions(crate::KeyPermission::Full, &[]);
        assert!(full.subscribe.allows("x/#"));
    }
}
