//! MMDS, the microVM metadata service: a JSON data store the host fills through the API and the
//! guest reads over HTTP at a link-local address (169.254.169.254 by default), answered inside
//! vireo on the guest's virtio-net interface. Version 2 requires a session token
//! (`PUT /latest/api/token`) on every read; `imds_compat` always answers in EC2 IMDS's plain-text
//! format.

pub mod stack;

pub use stack::MmdsStack;

use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The default MMDS address.
pub const DEFAULT_IPV4: [u8; 4] = [169, 254, 169, 254];
/// The MAC address MMDS answers ARP with (locally administered).
pub const MMDS_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
/// Longest session token lifetime (6 hours), as EC2 IMDS and Firecracker allow.
pub const MAX_TOKEN_TTL: u64 = 21_600;
const MAX_TOKENS: usize = 1024;

/// MMDS version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// Tokens optional.
    V1,
    /// Every read needs a session token.
    V2,
}

/// The data store and how it answers.
#[derive(Debug)]
pub struct Mmds {
    data: Value,
    limit: usize,
    version: Version,
    imds_compat: bool,
    tokens: HashMap<String, Instant>,
}

/// The store as the API and the network devices share it.
pub type SharedMmds = Arc<Mutex<Mmds>>;

/// Locks the shared store, surviving a poisoned lock (the store stays consistent per call).
pub fn lock(m: &SharedMmds) -> std::sync::MutexGuard<'_, Mmds> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An answer to an HTTP request from the guest.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Content type of the body.
    pub content_type: &'static str,
    /// Body.
    pub body: Vec<u8>,
}

fn answer(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Answer {
    Answer {
        status,
        content_type,
        body: body.into(),
    }
}

fn merge_patch(target: &mut Value, patch: &Value) {
    // RFC 7396: objects merge key by key, null removes, anything else replaces.
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

impl Mmds {
    /// An empty store holding at most `limit` bytes of JSON.
    pub fn new(limit: usize) -> Self {
        Self {
            data: Value::Object(Default::default()),
            limit,
            version: Version::V1,
            imds_compat: false,
            tokens: HashMap::new(),
        }
    }

    /// Sets the version and output format (`PUT /mmds/config`).
    pub fn configure(&mut self, version: Version, imds_compat: bool) {
        self.version = version;
        self.imds_compat = imds_compat;
        self.tokens.clear();
    }

    fn check_size(&self, v: &Value) -> Result<(), String> {
        let size = v.to_string().len();
        if size > self.limit {
            return Err(format!(
                "the MMDS data store would be {size} bytes, more than its limit of {} bytes (--mmds-size-limit)",
                self.limit
            ));
        }
        Ok(())
    }

    /// Replaces the data (`PUT /mmds`): a JSON object.
    pub fn put(&mut self, v: Value) -> Result<(), String> {
        if !v.is_object() {
            return Err("the MMDS data store must be a JSON object".into());
        }
        self.check_size(&v)?;
        self.data = v;
        Ok(())
    }

    /// Merges `patch` into the data (`PATCH /mmds`, RFC 7396).
    pub fn patch(&mut self, patch: &Value) -> Result<(), String> {
        if !patch.is_object() {
            return Err("an MMDS patch must be a JSON object".into());
        }
        let mut data = self.data.clone();
        merge_patch(&mut data, patch);
        self.check_size(&data)?;
        self.data = data;
        Ok(())
    }

    /// The data (`GET /mmds`).
    pub fn data(&self) -> &Value {
        &self.data
    }

    fn new_token(&mut self, ttl: u64) -> String {
        let now = Instant::now();
        self.tokens.retain(|_, exp| *exp > now);
        if self.tokens.len() >= MAX_TOKENS {
            // The oldest-expiring token makes room: a guest cannot grow this without bound.
            if let Some(k) = self
                .tokens
                .iter()
                .min_by_key(|(_, e)| **e)
                .map(|(k, _)| k.clone())
            {
                self.tokens.remove(&k);
            }
        }
        let mut raw = [0u8; 32];
        let _ = getrandom::fill(&mut raw);
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        self.tokens
            .insert(token.clone(), now + Duration::from_secs(ttl));
        token
    }

    fn token_valid(&self, token: Option<&str>) -> bool {
        token
            .and_then(|t| self.tokens.get(t))
            .is_some_and(|exp| *exp > Instant::now())
    }

    /// Answers one HTTP request the guest sent to the MMDS address.
    pub fn serve(&mut self, req: &httparse::Request<'_, '_>, body: &[u8]) -> Answer {
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .map(str::trim)
        };
        let method = req.method.unwrap_or("");
        let path = req.path.unwrap_or("/");
        let _ = body;
        if method == "PUT" && path == "/latest/api/token" {
            if header("X-Forwarded-For").is_some() {
                return answer(
                    403,
                    "text/plain",
                    "Forbidden: token requests may not be forwarded",
                );
            }
            return match header("X-metadata-token-ttl-seconds").map(str::parse::<u64>) {
                Some(Ok(ttl)) if (1..=MAX_TOKEN_TTL).contains(&ttl) => {
                    answer(200, "text/plain", self.new_token(ttl))
                }
                _ => answer(
                    400,
                    "text/plain",
                    format!("X-metadata-token-ttl-seconds must be 1 to {MAX_TOKEN_TTL}"),
                ),
            };
        }
        if method != "GET" {
            return answer(405, "text/plain", "Method not allowed");
        }
        if self.version == Version::V2 && !self.token_valid(header("X-metadata-token")) {
            return answer(
                401,
                "text/plain",
                "Unauthorized: a valid X-metadata-token is required",
            );
        }
        let path = path.split(['?', '#']).next().unwrap_or("/");
        let mut node = &self.data;
        for key in path.split('/').filter(|k| !k.is_empty()) {
            match node.get(key) {
                Some(v) => node = v,
                None => return answer(404, "text/plain", "Not found"),
            }
        }
        let json =
            !self.imds_compat && header("Accept").is_some_and(|a| a.contains("application/json"));
        if json {
            return answer(200, "application/json", node.to_string());
        }
        // IMDS format: a string as it is, an object as its keys (sub-objects with a '/').
        match node {
            Value::String(s) => answer(200, "text/plain", s.as_bytes()),
            Value::Object(map) => {
                let keys: Vec<String> = map
                    .iter()
                    .map(|(k, v)| {
                        if v.is_object() {
                            format!("{k}/")
                        } else {
                            k.clone()
                        }
                    })
                    .collect();
                answer(200, "text/plain", keys.join("\n"))
            }
            _ => answer(
                501,
                "text/plain",
                "Cannot retrieve value: only strings and objects have a plain-text form",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(m: &mut Mmds, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut raw = format!("GET {path} HTTP/1.1\r\n");
        for (k, v) in headers {
            raw.push_str(&format!("{k}: {v}\r\n"));
        }
        raw.push_str("\r\n");
        let mut h = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut h);
        req.parse(raw.as_bytes()).unwrap();
        m.serve(&req, b"")
    }

    #[test]
    fn put_patch_get_and_the_size_limit() {
        let mut m = Mmds::new(100);
        m.put(serde_json::json!({"a": {"b": "c"}, "x": "y"}))
            .unwrap();
        m.patch(&serde_json::json!({"a": {"d": "e"}, "x": null}))
            .unwrap();
        assert_eq!(m.data(), &serde_json::json!({"a": {"b": "c", "d": "e"}}));
        let e = m
            .put(serde_json::json!({"big": "z".repeat(200)}))
            .unwrap_err();
        assert!(e.contains("limit of 100 bytes"), "{e}");
        assert!(m.put(serde_json::json!([1])).is_err());
    }

    #[test]
    fn v1_reads_and_formats() {
        let mut m = Mmds::new(10_000);
        m.put(serde_json::json!({"latest": {"meta-data": {"id": "i-1", "tags": {"a": "b"}}}}))
            .unwrap();
        let a = get(&mut m, "/latest/meta-data", &[]);
        assert_eq!((a.status, a.body), (200, b"id\ntags/".to_vec()));
        assert_eq!(get(&mut m, "/latest/meta-data/id", &[]).body, b"i-1");
        let a = get(
            &mut m,
            "/latest/meta-data/tags",
            &[("Accept", "application/json")],
        );
        assert_eq!(
            (a.content_type, a.body),
            ("application/json", br#"{"a":"b"}"#.to_vec())
        );
        assert_eq!(get(&mut m, "/nope", &[]).status, 404);
        m.configure(Version::V1, true);
        let a = get(
            &mut m,
            "/latest/meta-data/tags",
            &[("Accept", "application/json")],
        );
        assert_eq!((a.content_type, a.body), ("text/plain", b"a".to_vec()));
    }

    #[test]
    fn v2_needs_a_live_token() {
        let mut m = Mmds::new(10_000);
        m.put(serde_json::json!({"k": "v"})).unwrap();
        m.configure(Version::V2, false);
        assert_eq!(get(&mut m, "/k", &[]).status, 401);
        assert_eq!(
            get(&mut m, "/k", &[("X-metadata-token", "made-up")]).status,
            401
        );
        let mut h = [httparse::EMPTY_HEADER; 4];
        let mut req = httparse::Request::new(&mut h);
        req.parse(b"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n")
            .unwrap();
        let t = m.serve(&req, b"");
        assert_eq!(t.status, 200);
        let token = String::from_utf8(t.body).unwrap();
        let a = get(&mut m, "/k", &[("X-metadata-token", &token)]);
        assert_eq!((a.status, a.body), (200, b"v".to_vec()));
        let mut h = [httparse::EMPTY_HEADER; 4];
        let mut req = httparse::Request::new(&mut h);
        req.parse(b"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 0\r\n\r\n")
            .unwrap();
        assert_eq!(m.serve(&req, b"").status, 400);
    }
}
