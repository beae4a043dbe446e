//! The auth file (`--auth-file`, TOML): principals, their credentials and
//! grants. See the README for an example.
//!
//! ```toml
//! [[principal]]
//! name = "orders"
//! tokens = ["sha256:<64 lowercase hex digits>"]
//! certificates = ["spiffe://example.org/orders"]
//!   [[principal.grant]]
//!   collections = ["orders", "orders.*"]
//!   permissions = ["read", "write"]
//! ```
//!
//! Everything is checked when the file is read: an unknown key, a bad
//! hash, a pattern or permission that does not exist, or a token shared by
//! two principals makes the whole file invalid (at startup the server
//! does not start; on reload the previous file stays in force).

use std::{collections::HashMap, path::Path, sync::Arc};

use serde::Deserialize;

use super::{Directory, Grant, Limits, Pattern, Permission, Principal, token};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    principal: Vec<PrincipalDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalDoc {
    name: String,
    #[serde(default)]
    tokens: Vec<String>,
    #[serde(default)]
    certificates: Vec<String>,
    #[serde(default)]
    grant: Vec<GrantDoc>,
    #[serde(default)]
    limits: Option<LimitsDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantDoc {
    collections: Vec<String>,
    permissions: Vec<String>,
}

/// Per-principal limits.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsDoc {
    #[serde(default)]
    requests_per_second: Option<u64>,
    #[serde(default)]
    mutations_per_second: Option<u64>,
    #[serde(default)]
    max_subscriptions: Option<u64>,
}

/// Reads and checks the file at `path`; also returns the bytes read.
pub fn load(path: &Path) -> Result<(Directory, Vec<u8>), String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read auth file {}: {e}", path.display()))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| format!("auth file {} is not UTF-8", path.display()))?;
    let directory = parse(text).map_err(|e| format!("auth file {}: {e}", path.display()))?;
    Ok((directory, bytes))
}

/// Parses and checks an auth file's text.
pub fn parse(text: &str) -> Result<Directory, String> {
    let doc: FileDoc = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut directory = Directory::default();
    let mut names = HashMap::new();
    for (i, p) in doc.principal.into_iter().enumerate() {
        let at = |what: &str| format!("principal[{i}] ({}): {what}", p.name);
        if p.name.is_empty() || p.name.len() > 128 || p.name.chars().any(char::is_control) {
            return Err(at(
                "name must be 1-128 characters without control characters",
            ));
        }
        if names.insert(p.name.clone(), ()).is_some() {
            return Err(at("the name is used twice"));
        }
        if p.tokens.is_empty() && p.certificates.is_empty() {
            return Err(at("needs at least one token or certificate"));
        }
        let limits = p.limits.as_ref().map_or_else(Limits::default, |l| Limits {
            requests_per_second: l.requests_per_second,
            mutations_per_second: l.mutations_per_second,
            max_subscriptions: l.max_subscriptions,
        });
        if [limits.requests_per_second, limits.mutations_per_second].contains(&Some(0)) {
            return Err(at(
                "a rate of 0 would refuse every call; leave it out for no limit",
            ));
        }
        let grants = p
            .grant
            .iter()
            .enumerate()
            .map(|(g, grant)| parse_grant(grant).map_err(|e| at(&format!("grant[{g}]: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let principal = Arc::new(Principal {
            name: p.name.clone(),
            grants,
            limits,
        });
        for t in &p.tokens {
            let hash = token::parse_hash(t).map_err(|e| at(&e))?;
            if directory.by_token.insert(hash, principal.clone()).is_some() {
                return Err(at("a token hash is given to two principals"));
            }
        }
        for c in &p.certificates {
            if c.is_empty()
                || directory
                    .by_certificate
                    .insert(c.clone(), principal.clone())
                    .is_some()
            {
                return Err(at(&format!(
                    "certificate identity `{c}` is empty or given twice"
                )));
            }
        }
        directory.principals += 1;
    }
    Ok(directory)
}

fn parse_grant(grant: &GrantDoc) -> Result<Grant, String> {
    if grant.collections.is_empty() || grant.permissions.is_empty() {
        return Err("needs collections and permissions".into());
    }
    let patterns = grant
        .collections
        .iter()
        .map(|c| pattern(c))
        .collect::<Result<Vec<_>, _>>()?;
    let permissions = grant
        .permissions
        .iter()
        .map(|p| match p.as_str() {
            "read" => Ok(Permission::Read),
            "write" => Ok(Permission::Write),
            "replicate" => Ok(Permission::Replicate),
            "admin" => Ok(Permission::Admin),
            other => Err(format!(
                "unknown permission `{other}` (read, write, replicate, admin)"
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Grant {
        patterns,
        permissions,
    })
}

/// `name`, `prefix*` or `*`; a name is checked as collections are.
fn pattern(spec: &str) -> Result<Pattern, String> {
    let (name, prefix) = match spec.strip_suffix('*') {
        Some(prefix) => (prefix, true),
        None => (spec, false),
    };
    let valid = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && name.len() <= crate::service::validate::MAX_COLLECTION_LEN
        && (prefix || !name.is_empty());
    if !valid {
        return Err(format!(
            "collection pattern `{spec}` is not a name, a prefix ending in `*`, or `*`"
        ));
    }
    Ok(if prefix {
        Pattern::Prefix(name.to_owned())
    } else {
        Pattern::Exact(name.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash_of(token: &str) -> String {
        token::hash_string(token)
    }

    /// Rule: the documented example parses; every mistake makes the whole
    /// file invalid, naming where it is.
    #[test]
    fn the_file_is_checked_whole() {
        let good = format!(
            r#"
[[principal]]
name = "orders"
tokens = ["{}"]
certificates = ["spiffe://example.org/orders", "orders.internal"]
  [[principal.grant]]
  collections = ["orders", "orders.*"]
  permissions = ["read", "write"]
  [principal.limits]
  requests_per_second = 500
"#,
            hash_of("t1")
        );
        let d = parse(&good).unwrap();
        let p = d.by_token_hash(&token::hash("t1")).unwrap();
        assert!(p.allows(Permission::Write, "orders.eu"));
        assert!(d.by_token_hash(&token::hash("t2")).is_none());
        for (bad, says) in [
            (
                good.replace(
                    "permissions = [\"read\", \"write\"]",
                    "permissions = [\"rule\"]",
                ),
                "unknown permission",
            ),
            (good.replace("orders.*", "or ders"), "collection pattern"),
            (good.replace(&hash_of("t1"), "sha256:abc"), "sha256"),
            (good.replace("name = ", "nmae = "), "unknown field"),
            (
                format!("{good}\n{}", good.replace("orders.internal", "x")),
                "twice",
            ),
        ] {
            let err = parse(&bad).expect_err(says);
            assert!(err.contains(says), "{err}");
        }
    }
}
