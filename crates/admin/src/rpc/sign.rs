//! The cloud's RPC request signature, version 1.0 (`SignatureMethod=HMAC-SHA1`), and what
//! guards it against replay: the timestamp window and the nonce cache.
//!
//! A signed request carries its parameters in the query string (and, for some SDKs, in an
//! `application/x-www-form-urlencoded` body as well). The client computes
//!
//! ```text
//! CanonicalizedQuery = join("&", sorted by name: percentEncode(name) "=" percentEncode(value))
//!                      over every parameter except Signature
//! StringToSign       = METHOD "&" percentEncode("/") "&" percentEncode(CanonicalizedQuery)
//! Signature          = Base64(HMAC-SHA1(key = AccessKeySecret "&", StringToSign))
//! ```
//!
//! where `percentEncode` leaves `A-Z a-z 0-9 - _ . ~` alone and writes every other byte of the
//! UTF-8 form as `%XX` with upper-case hex.
//!
//! The cloud's newer SDKs sign with version 3 (`ACS3-HMAC-SHA256`) by default instead: the
//! common parameters travel as `x-acs-action`, `x-acs-version`, `x-acs-date`,
//! `x-acs-signature-nonce` and `x-acs-content-sha256` headers, and
//!
//! ```text
//! CanonicalRequest = METHOD "\n" path "\n" CanonicalQuery "\n" CanonicalHeaders "\n"
//!                    SignedHeaders "\n" hex(SHA256(body))
//!   CanonicalQuery   = join("&", sorted: percentEncode(name) "=" percentEncode(value))
//!   CanonicalHeaders = for each signed header, sorted: lower(name) ":" trim(value) "\n"
//!   SignedHeaders    = join(";", the signed header names, lower-case, sorted)
//! StringToSign     = "ACS3-HMAC-SHA256\n" hex(SHA256(CanonicalRequest))
//! Authorization: ACS3-HMAC-SHA256 Credential=<AccessKeyId>,SignedHeaders=<SignedHeaders>,
//!                Signature=hex(HMAC-SHA256(AccessKeySecret, StringToSign))
//! ```

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::collections::hash_map::RandomState;
use std::collections::{HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::Mutex;

/// How far a request's `Timestamp` may be from the server's clock, either way.
pub const TIMESTAMP_WINDOW_MS: u64 = 15 * 60 * 1000;

/// Percent-encoding of the cloud's signers (RFC 3986 unreserved characters kept).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b >> 4)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b & 0x0f)]));
        }
    }
    out
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes one `application/x-www-form-urlencoded` component (`+` is a space).
pub fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hi = bytes.get(i + 1).copied().and_then(hex_value);
                let lo = bytes.get(i + 2).copied().and_then(hex_value);
                match (hi, lo) {
                    (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                    _ => return Err(format!("bad percent-escape in {s:?}")),
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

/// Parses `a=1&b=2` into decoded pairs, in order. A name without `=` has the empty value.
pub fn parse_pairs(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for part in s.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        out.push((percent_decode(k)?, percent_decode(v)?));
    }
    Ok(out)
}

/// The string the client signed: every parameter but `Signature`, sorted by name.
pub fn string_to_sign<'a>(
    method: &str,
    params: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> String {
    let mut pairs: Vec<(&str, &str)> = params
        .into_iter()
        .filter(|(k, _)| *k != "Signature")
        .collect();
    pairs.sort();
    let canonical = pairs
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    format!(
        "{}&{}&{}",
        method.to_ascii_uppercase(),
        percent_encode("/"),
        percent_encode(&canonical)
    )
}

/// `Base64(HMAC-SHA1(secret + "&", string_to_sign))`.
pub fn signature(secret: &str, string_to_sign: &str) -> String {
    ferry_meta::auth::hmac_sha1_base64(&format!("{secret}&"), string_to_sign)
}

/// The name of the version 3 signature algorithm Ferry verifies.
pub const ACS3_HMAC_SHA256: &str = "ACS3-HMAC-SHA256";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lower-case hex of SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// The parts of an `Authorization: ACS3-HMAC-SHA256 Credential=…,SignedHeaders=…,Signature=…`
/// header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acs3Authorization<'a> {
    pub algorithm: &'a str,
    pub key_id: &'a str,
    /// As given: lower-case names joined with `;`.
    pub signed_headers: &'a str,
    pub signature: &'a str,
}

/// Parses a version 3 `Authorization` header (any `ACS3-…` algorithm; the caller checks which).
pub fn parse_acs3_authorization(value: &str) -> Option<Acs3Authorization<'_>> {
    let value = value.trim();
    let (algorithm, rest) = value.split_once(' ')?;
    if !algorithm.starts_with("ACS3-") {
        return None;
    }
    let (mut key_id, mut signed_headers, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        match k.trim() {
            "Credential" => key_id = Some(v.trim()),
            "SignedHeaders" => signed_headers = Some(v.trim()),
            "Signature" => signature = Some(v.trim()),
            _ => {}
        }
    }
    Some(Acs3Authorization {
        algorithm,
        key_id: key_id.filter(|k| !k.is_empty())?,
        signed_headers: signed_headers?,
        signature: signature?,
    })
}

/// The version 3 canonical request. `headers` yields (lower-case name, value) for every header
/// of the request; only the names in `signed_headers` are used, several values of one name
/// trimmed, sorted and joined with `,`.
pub fn acs3_canonical_request<'a>(
    method: &str,
    path: &str,
    query: impl IntoIterator<Item = (&'a str, &'a str)>,
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    signed_headers: &[&str],
    payload_sha256: &str,
) -> String {
    let mut pairs: Vec<(String, String)> = query
        .into_iter()
        .map(|(k, v)| (percent_encode(k), percent_encode(v)))
        .collect();
    pairs.sort();
    let canonical_query = pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut names: Vec<&str> = signed_headers.to_vec();
    names.sort_unstable();
    names.dedup();
    let mut values: std::collections::BTreeMap<&str, Vec<&str>> =
        names.iter().map(|n| (*n, Vec::new())).collect();
    for (name, value) in headers {
        if let Some(list) = values.get_mut(name) {
            list.push(value.trim());
        }
    }
    let mut canonical_headers = String::new();
    for (name, mut list) in values {
        list.sort_unstable();
        canonical_headers.push_str(&format!("{name}:{}\n", list.join(",")));
    }
    format!(
        "{method}\n{path}\n{canonical_query}\n{canonical_headers}\n{}\n{payload_sha256}",
        names.join(";")
    )
}

/// `"ACS3-HMAC-SHA256\n" hex(SHA256(canonical_request))`.
pub fn acs3_string_to_sign(canonical_request: &str) -> String {
    format!(
        "{ACS3_HMAC_SHA256}\n{}",
        sha256_hex(canonical_request.as_bytes())
    )
}

/// `hex(HMAC-SHA256(secret, string_to_sign))`.
pub fn acs3_signature(secret: &str, string_to_sign: &str) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(string_to_sign.as_bytes());
    hex(&mac.finalize().into_bytes())
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses the ISO 8601 UTC `Timestamp` (`YYYY-MM-DDThh:mm:ssZ`, optionally with a fraction of a
/// second) into epoch milliseconds.
pub fn parse_timestamp(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' || *b.last()? != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = s.get(r)?;
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut millis = 0u64;
    let rest = &s[19..s.len() - 1];
    if !rest.is_empty() {
        let frac = rest.strip_prefix('.')?;
        if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let padded = format!("{frac:0<3}");
        millis = padded[..3].parse().ok()?;
    }
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    let days = days_from_civil(i64::from(year), month, day);
    let secs = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
    u64::try_from(secs).ok().map(|s| s * 1000 + millis)
}

/// Why a nonce was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceError {
    /// Seen within the replay window.
    Used,
    /// The cache is full of nonces still inside the window.
    Full,
}

struct Nonces {
    seen: HashSet<u64>,
    /// (forget at, hash), in insertion order (and so in order of forgetting).
    order: VecDeque<(u64, u64)>,
}

/// Remembers `(AccessKeyId, SignatureNonce)` pairs for as long as a request carrying them could
/// still pass the timestamp check, and refuses a pair seen again. Bounded: entries are keyed
/// hashes (a false "used" needs a 64-bit collision), at most `capacity` of them.
pub struct NonceCache {
    inner: Mutex<Nonces>,
    hasher: RandomState,
    capacity: usize,
}

impl NonceCache {
    pub fn new(capacity: usize) -> Self {
        NonceCache {
            inner: Mutex::new(Nonces {
                seen: HashSet::new(),
                order: VecDeque::new(),
            }),
            hasher: RandomState::new(),
            capacity,
        }
    }

    /// Records the nonce, or says why it cannot be used. `now` is epoch milliseconds.
    pub fn check(&self, key_id: &str, nonce: &str, now: u64) -> Result<(), NonceError> {
        let h = self.hasher.hash_one((key_id, nonce));
        let mut n = self.inner.lock().expect("nonce cache lock");
        while n.order.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, old)) = n.order.pop_front() {
                n.seen.remove(&old);
            }
        }
        if n.seen.contains(&h) {
            return Err(NonceError::Used);
        }
        if n.seen.len() >= self.capacity {
            return Err(NonceError::Full);
        }
        // A request stamped up to one window ahead stays acceptable for one more window.
        n.seen.insert(h);
        n.order.push_back((now + 2 * TIMESTAMP_WINDOW_MS, h));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding() {
        assert_eq!(percent_encode("a-b_c.d~e"), "a-b_c.d~e");
        assert_eq!(percent_encode("a b*c/d=+"), "a%20b%2Ac%2Fd%3D%2B");
        assert_eq!(percent_encode("é"), "%C3%A9");
        assert_eq!(percent_decode("a%20b+c%2a").unwrap(), "a b c*");
        assert!(percent_decode("%zz").is_err());
        assert!(percent_decode("%C3").is_err());
        assert_eq!(
            parse_pairs("A=1&B=&C&D=x%3Dy").unwrap(),
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "".into()),
                ("C".into(), "".into()),
                ("D".into(), "x=y".into()),
            ]
        );
    }

    #[test]
    fn string_to_sign_sorts_and_encodes_twice() {
        let sts = string_to_sign(
            "post",
            [
                ("Signature", "ignored"),
                ("Timestamp", "2020-01-01T00:00:00Z"),
                ("Action", "ListGroupId"),
                ("SignatureType", ""),
            ],
        );
        assert_eq!(
            sts,
            "POST&%2F&Action%3DListGroupId%26SignatureType%3D%26Timestamp%3D2020-01-01T00%253A00%253A00Z"
        );
    }

    #[test]
    fn signature_matches_the_documented_example() {
        // The cloud's documented example of a version 1.0 signature.
        let sts = "GET&%2F&AccessKeyId%3Dtestid%26Action%3DDescribeRegions%26Format%3DXML%26SignatureMethod%3DHMAC-SHA1%26SignatureNonce%3D3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf%26SignatureVersion%3D1.0%26Timestamp%3D2016-02-23T12%253A46%253A24Z%26Version%3D2014-05-26";
        let computed = string_to_sign(
            "GET",
            [
                ("AccessKeyId", "testid"),
                ("Action", "DescribeRegions"),
                ("Format", "XML"),
                ("SignatureMethod", "HMAC-SHA1"),
                ("SignatureNonce", "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf"),
                ("SignatureVersion", "1.0"),
                ("Timestamp", "2016-02-23T12:46:24Z"),
                ("Version", "2014-05-26"),
            ],
        );
        assert_eq!(computed, sts);
        assert_eq!(signature("testsecret", sts), "OLeaidS1JvxuMvnyHOwuJ+uX5qY=");
    }

    #[test]
    fn acs3_matches_the_cloud_sdk() {
        // Computed with the cloud's Python SDK (alibabacloud-tea-openapi) for these inputs.
        let auth = parse_acs3_authorization(
            "ACS3-HMAC-SHA256 Credential=FERRYKEY,SignedHeaders=accept;host;user-agent;x-acs-action;x-acs-content-sha256;x-acs-date;x-acs-signature-nonce;x-acs-version,Signature=3e68692852076436fda9706b828e5291a095ae9f8ee359b2a1c8136e5b61e68a",
        )
        .unwrap();
        assert_eq!(auth.algorithm, ACS3_HMAC_SHA256);
        assert_eq!(auth.key_id, "FERRYKEY");
        let empty = sha256_hex(b"");
        assert_eq!(
            empty,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let headers = [
            ("host", "127.0.0.1:18083"),
            ("x-acs-action", "BatchQuerySessionByClientIds"),
            ("x-acs-version", "2020-04-20"),
            ("x-acs-date", "2024-05-01T08:00:00Z"),
            ("x-acs-signature-nonce", "nonce-1"),
            ("x-acs-content-sha256", empty.as_str()),
            ("user-agent", "test"),
            ("accept", "application/json"),
            ("x-not-signed", "ignored"),
        ];
        let signed: Vec<&str> = auth.signed_headers.split(';').collect();
        let canonical = acs3_canonical_request(
            "POST",
            "/",
            [
                ("InstanceId", "mqtt-cloud"),
                ("ClientIdList.1", "GID_a@@@b c"),
                ("Resources", "T/#,U/+"),
            ],
            headers,
            &signed,
            &empty,
        );
        assert!(canonical.starts_with(
            "POST\n/\nClientIdList.1=GID_a%40%40%40b%20c&InstanceId=mqtt-cloud&Resources=T%2F%23%2CU%2F%2B\naccept:application/json\n"
        ));
        assert_eq!(
            acs3_signature("s3cr3t", &acs3_string_to_sign(&canonical)),
            auth.signature
        );
        assert!(parse_acs3_authorization("HMAC-SHA1 x").is_none());
        assert!(parse_acs3_authorization("ACS3-HMAC-SHA256 Credential=a,Signature=b").is_none());
    }

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_timestamp("2016-02-23T12:46:24Z"),
            Some(1_456_231_584_000)
        );
        assert_eq!(
            parse_timestamp("2016-02-23T12:46:24.5Z"),
            Some(1_456_231_584_500)
        );
        assert_eq!(parse_timestamp("2016-02-23 12:46:24Z"), None);
        assert_eq!(parse_timestamp("2016-02-23T12:46:24"), None);
        assert_eq!(parse_timestamp("2016-13-23T12:46:24Z"), None);
        assert_eq!(parse_timestamp("2016-02-23T12:46:24.Z"), None);
        assert_eq!(parse_timestamp("2016-02-23T1a:46:24Z"), None);
    }

    #[test]
    fn nonces() {
        let c = NonceCache::new(2);
        assert_eq!(c.check("k", "n1", 0), Ok(()));
        assert_eq!(c.check("k", "n1", 1), Err(NonceError::Used));
        assert_eq!(c.check("other", "n1", 1), Ok(()), "per key");
        assert_eq!(c.check("k", "n2", 1), Err(NonceError::Full));
        // Once the window has passed the entries are forgotten.
        let later = 2 * TIMESTAMP_WINDOW_MS + 2;
        assert_eq!(c.check("k", "n2", later), Ok(()));
        assert_eq!(c.check("k", "n1", later), Ok(()));
    }
}
