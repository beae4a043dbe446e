//! Who is calling, and what they may do.
//!
//! Identity is decided once per call, by [`Auth::identify`] in an
//! interceptor in front of the sync, replication and admin services, and
//! handed to handlers as an [`Identity`] in the request's extensions.
//! Handlers ask the pure [`Principal::allows`]; nothing else reads tokens.
//! Health and reflection stay open (probes, grpcurl).
//!
//! The principals and their grants come from the auth file ([`file`](mod@file)),
//! reloaded when it changes; tokens are kept only as SHA-256 hashes
//! ([`token`]). With no auth file every call is [`Identity::Open`], as a
//! local development server is.

pub mod file;
pub mod limits;
pub mod overload;
pub mod token;

pub use limits::{Limiter, Limits, Meter, StreamGuard};

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use subtle::ConstantTimeEq;
use tonic::{Request, Status, metadata::MetadataMap};

use crate::{
    error::Error,
    metrics::{Metrics, Refusal},
    store::CollectionFilter,
};

/// What a grant allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// Get, Pull and Subscribe.
    Read,
    /// Push (and reading what one may write).
    Write,
    /// The replication stream: a copy of the whole store.
    Replicate,
    /// AdminService.
    Admin,
}

/// Collections a grant covers: one name, or every name with a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// Exactly this collection.
    Exact(String),
    /// Every collection starting with this (`"tenant-a."` for
    /// `tenant-a.*`; empty for `*`).
    Prefix(String),
}

impl Pattern {
    /// Whether it covers `collection`.
    pub fn covers(&self, collection: &str) -> bool {
        match self {
            Self::Exact(name) => name == collection,
            Self::Prefix(prefix) => collection.starts_with(prefix.as_str()),
        }
    }

    /// Whether it covers every collection (`*`).
    pub fn is_all(&self) -> bool {
        matches!(self, Self::Prefix(p) if p.is_empty())
    }
}

/// Permissions on collections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The collections.
    pub patterns: Vec<Pattern>,
    /// What is allowed on them.
    pub permissions: Vec<Permission>,
}

/// An authenticated caller and its grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Its name: recorded as `updated_by`, and the namespace of its client
    /// ids.
    pub name: String,
    /// What it may do.
    pub grants: Vec<Grant>,
    /// How much.
    pub limits: Limits,
}

impl Principal {
    /// Whether it may do `permission` on `collection`. `write` implies
    /// `read`; `replicate` and `admin` concern the whole store, so only a
    /// grant on `*` gives them (pass any collection name, e.g. `"*"`).
    pub fn allows(&self, permission: Permission, collection: &str) -> bool {
        self.grants.iter().any(|g| {
            let has = |p| g.permissions.contains(&p);
            let granted = match permission {
                Permission::Read => has(Permission::Read) || has(Permission::Write),
                Permission::Write => has(Permission::Write),
                Permission::Replicate | Permission::Admin => {
                    return has(permission) && g.patterns.iter().any(Pattern::is_all);
                }
            };
            granted && g.patterns.iter().any(|p| p.covers(collection))
        })
    }

    /// The patterns it may read: a Pull or Subscribe naming no collection
    /// gets these.
    pub fn readable(&self) -> Vec<Pattern> {
        self.grants
            .iter()
            .filter(|g| {
                g.permissions
                    .iter()
                    .any(|p| matches!(p, Permission::Read | Permission::Write))
            })
            .flat_map(|g| g.patterns.iter().cloned())
            .collect()
    }
}

/// Who a call comes from.
#[derive(Debug, Clone)]
pub enum Identity {
    /// Auth is off: everything is allowed.
    Open,
    /// An authenticated principal, and how it authenticated.
    Principal(Arc<Principal>, Session),
}

/// What a caller presented.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Credential {
    /// A bearer token, by its SHA-256.
    Token([u8; 32]),
    /// A verified client certificate, by the names it presents.
    Certificate(Vec<String>),
}

/// How a principal authenticated, to check later that it still may (an
/// open stream ends when its credential is revoked).
#[derive(Clone)]
pub struct Session {
    /// What it presented.
    credential: Credential,
    /// The server's auth, for limits and the current directory.
    auth: Auth,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Session")
    }
}

impl Identity {
    /// The identity a handler was given (open if none: a service without
    /// the interceptor, as in unit tests).
    pub fn of<T>(request: &Request<T>) -> Self {
        request
            .extensions()
            .get::<Self>()
            .cloned()
            .unwrap_or(Self::Open)
    }

    /// Fails with PERMISSION_DENIED unless `permission` on `collection` is
    /// allowed. `field` names what in the request asked for it.
    pub fn require(
        &self,
        permission: Permission,
        collection: &str,
        field: impl std::fmt::Display,
    ) -> Result<(), Error> {
        match self {
            Self::Open => Ok(()),
            Self::Principal(p, _) if p.allows(permission, collection) => Ok(()),
            Self::Principal(p, session) => {
                session.auth.metrics.refused(Refusal::PermissionDenied);
                Err(Error::PermissionDenied(format!(
                    "{field}: principal {} may not {} collection {collection}",
                    p.name,
                    match permission {
                        Permission::Read => "read",
                        Permission::Write => "write",
                        Permission::Replicate => "replicate",
                        Permission::Admin => "administer",
                    }
                )))
            }
        }
    }

    /// Fails unless it may replicate or administer the whole store.
    pub fn require_store(&self, permission: Permission) -> Result<(), Error> {
        self.require(permission, "*", "the store")
    }

    /// The client id under which the store keeps this caller's mutation
    /// ids: a principal's own namespace, so no principal can use or learn
    /// another's (`\x1f` cannot appear in a validated client id).
    pub fn client_key(&self, client_id: &str) -> String {
        match self {
            Self::Principal(p, _) if !client_id.is_empty() => format!("{}\x1f{client_id}", p.name),
            _ => client_id.to_owned(),
        }
    }

    /// What a change records as its author: the principal, else the client
    /// id.
    pub fn author(&self, client_id: &str) -> String {
        match self {
            Self::Principal(p, _) => p.name.clone(),
            Self::Open => client_id.to_owned(),
        }
    }

    /// Whether a replica may forward this caller's push: the primary must
    /// see the same credential, and a client certificate ends at this
    /// node's TLS (the primary would see the replica's certificate).
    pub fn forwardable(&self) -> bool {
        !matches!(
            self,
            Self::Principal(
                _,
                Session {
                    credential: Credential::Certificate(_),
                    ..
                }
            )
        )
    }

    /// Charges `cost` to the caller's `meter` (RESOURCE_EXHAUSTED with the
    /// time to wait when its limit is spent).
    pub fn charge(&self, meter: Meter, cost: u64) -> Result<(), Error> {
        let Self::Principal(p, session) = self else {
            return Ok(());
        };
        let limiter = &session.auth.limiter;
        let rate = match meter {
            Meter::Requests => p.limits.requests_per_second,
            Meter::Mutations => p.limits.mutations_per_second,
        };
        let Some(rate) = rate else {
            return Ok(());
        };
        limiter
            .take(&p.name, meter, cost, rate)
            .map_err(|retry_after| {
                session.auth.metrics.refused(match meter {
                    Meter::Requests => Refusal::RateLimitedRequests,
                    Meter::Mutations => Refusal::RateLimitedMutations,
                });
                Error::RateLimited {
                    what: match meter {
                        Meter::Requests => "requests",
                        Meter::Mutations => "mutations",
                    },
                    rate,
                    retry_after,
                }
            })
    }

    /// Opens a Subscribe stream, within the caller's cap.
    pub fn open_stream(&self) -> Result<Option<StreamGuard>, Error> {
        let Self::Principal(p, session) = self else {
            return Ok(None);
        };
        let Some(max) = p.limits.max_subscriptions else {
            return Ok(None);
        };
        session.auth.limiter.open_stream(&p.name, max).map(Some).ok_or_else(|| {
            session.auth.metrics.refused(Refusal::PrincipalStreams);
            Error::StreamsFull(format!(
                "principal {} has {max} Subscribe streams open, its limit; close one or retry later",
                p.name
            ))
        })
    }

    /// Changes when the auth file is reloaded: a long-lived stream then
    /// checks [`Identity::is_current`] (`None` when auth is off).
    pub fn reloads(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        match self {
            Self::Open => None,
            Self::Principal(_, session) => Some(session.auth.reloads.subscribe()),
        }
    }

    /// Whether the credential still gives the same principal, with the
    /// same grants, under the file now in force.
    pub fn is_current(&self) -> bool {
        match self {
            Self::Open => true,
            Self::Principal(p, session) => session
                .auth
                .directory()
                .and_then(|d| match &session.credential {
                    Credential::Token(hash) => d.by_token_hash(hash),
                    Credential::Certificate(names) => d.by_certificate(names).ok().flatten(),
                })
                .is_some_and(|now| *now == **p),
        }
    }

    /// The collections a Pull or Subscribe reads: the ones named, each of
    /// which must be readable; none named means every readable one.
    pub fn scope(&self, named: Vec<String>) -> Result<CollectionFilter, Error> {
        for (i, name) in named.iter().enumerate() {
            self.require(Permission::Read, name, format_args!("collections[{i}]"))?;
        }
        Ok(match self {
            Self::Principal(p, _) if named.is_empty() => {
                let (mut exact, mut prefixes) = (Vec::new(), Vec::new());
                for pattern in p.readable() {
                    match pattern {
                        Pattern::Exact(name) => exact.push(name),
                        Pattern::Prefix(prefix) => prefixes.push(prefix),
                    }
                }
                CollectionFilter::patterns(exact, prefixes)
            }
            _ => CollectionFilter::new(named),
        })
    }
}

/// A client certificate whose names belong to more than one principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ambiguous;

/// The loaded principals, by credential.
#[derive(Debug, Default)]
pub struct Directory {
    /// By SHA-256 of their bearer tokens.
    by_token: HashMap<[u8; 32], Arc<Principal>>,
    /// By certificate identity (a SAN URI, SAN DNS name or subject CN).
    by_certificate: HashMap<String, Arc<Principal>>,
    /// How many principals.
    principals: usize,
}

impl Directory {
    /// How many principals it holds.
    pub fn principals(&self) -> usize {
        self.principals
    }

    /// The principal a client certificate's names (see
    /// [`crate::tls::peer_identities`]) belong to; an error if they name
    /// more than one principal (the file cannot decide who it is).
    pub fn by_certificate(&self, names: &[String]) -> Result<Option<Arc<Principal>>, Ambiguous> {
        let mut found: Option<&Arc<Principal>> = None;
        for p in names.iter().filter_map(|n| self.by_certificate.get(n)) {
            match found {
                Some(other) if !Arc::ptr_eq(other, p) => return Err(Ambiguous),
                _ => found = Some(p),
            }
        }
        Ok(found.cloned())
    }

    /// The principal whose token hashes to `hash`. The map finds the entry
    /// by the hash (which tells nothing of the token); the full hash is
    /// then compared in constant time.
    fn by_token_hash(&self, hash: &[u8; 32]) -> Option<Arc<Principal>> {
        let (stored, principal) = self.by_token.get_key_value(hash)?;
        bool::from(stored.ct_eq(hash)).then(|| principal.clone())
    }
}

/// The server's authentication: off, or a reloadable directory. A cheap
/// `Clone` handle.
#[derive(Clone, Default)]
pub struct Auth {
    /// `None`: auth is off.
    directory: Option<Arc<RwLock<Arc<Directory>>>>,
    /// Everyone's limits.
    limiter: Limiter,
    /// Counts reloads of the auth file.
    reloads: Arc<tokio::sync::watch::Sender<u64>>,
    /// The file's bytes as last read, to tell a change.
    seen: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
    /// Counts refused calls by reason.
    metrics: Metrics,
}

impl Auth {
    /// Loads `path` (`None`: auth off). A file that does not load is an
    /// error here, at startup; later reloads keep the previous one.
    pub fn load(path: Option<&std::path::Path>) -> Result<Self, String> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let (directory, bytes) = file::load(path)?;
        Ok(Self {
            directory: Some(Arc::new(RwLock::new(Arc::new(directory)))),
            limiter: Limiter::default(),
            reloads: Arc::default(),
            seen: Arc::new(std::sync::Mutex::new(Some(bytes))),
            metrics: Metrics::default(),
        })
    }

    /// The same auth, counting its refusals in `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Whether calls must authenticate.
    pub fn is_on(&self) -> bool {
        self.directory.is_some()
    }

    /// Who the call with `metadata` comes from: UNAUTHENTICATED without a
    /// valid credential when auth is on. The error never says whether a
    /// token is unknown or malformed.
    pub fn identify(&self, metadata: &MetadataMap, peer: &[String]) -> Result<Identity, Status> {
        let Some(directory) = self.directory() else {
            return Ok(Identity::Open);
        };
        let header = metadata.get("authorization");
        let token = header
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                // The scheme is case-insensitive (RFC 7235).
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(token)
            })
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let found = match token {
            Some(token) => {
                let hash = token::hash(token);
                directory
                    .by_token_hash(&hash)
                    .map(|p| (p, Credential::Token(hash)))
            }
            // A client certificate the handshake verified, named in the file.
            None if header.is_none() => directory
                .by_certificate(peer)
                .map_err(|Ambiguous| {
                    Status::unauthenticated(
                        "the client certificate's names belong to more than one principal",
                    )
                })?
                .map(|p| (p, Credential::Certificate(peer.to_vec()))),
            None => None,
        };
        match found {
            Some((principal, credential)) => Ok(Identity::Principal(
                principal,
                Session {
                    credential,
                    auth: self.clone(),
                },
            )),
            None if token.is_none() && header.is_none() => Err(Status::unauthenticated(
                "this server needs a credential: `authorization: Bearer <token>`, or a client certificate it knows",
            )),
            None => Err(Status::unauthenticated("the credential is not valid")),
        }
    }

    /// The directory in force (`None`: auth is off).
    fn directory(&self) -> Option<Arc<Directory>> {
        let directory = self.directory.as_ref()?;
        Some(
            directory
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }

    /// Replaces the directory with `path`'s contents if they changed since
    /// last read (or `forced`); on failure the old one stays and the error
    /// is returned. `Ok(None)`: nothing changed.
    pub fn reload(&self, path: &std::path::Path, forced: bool) -> Result<Option<usize>, String> {
        let Some(directory) = &self.directory else {
            return Ok(None);
        };
        let now = std::fs::read(path).ok();
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if !forced && *seen == now {
                return Ok(None);
            }
            *seen = now;
        }
        let (fresh, _) = file::load(path)?;
        let principals = fresh.principals();
        *directory.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(fresh);
        self.reloads.send_modify(|n| *n += 1);
        Ok(Some(principals))
    }

    /// An interceptor that puts the caller's [`Identity`] in the request's
    /// extensions, or refuses it.
    pub fn interceptor(&self) -> impl tonic::service::Interceptor + Clone + use<> {
        let auth = self.clone();
        move |mut request: Request<()>| {
            let peer = peer_identities(&request);
            let identity = auth.identify(request.metadata(), &peer).inspect_err(|_| {
                auth.metrics.refused(Refusal::Unauthenticated);
            })?;
            identity.charge(Meter::Requests, 1)?;
            request.extensions_mut().insert(identity);
            Ok(request)
        }
    }
}

/// The names the call's verified client certificate presents (none
/// without TLS or without a client certificate).
fn peer_identities<T>(request: &Request<T>) -> Vec<String> {
    request
        .extensions()
        .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())
        .and_then(|certs| certs.first().map(crate::tls::peer_identities))
        .unwrap_or_default()
}

/// Resolves when the auth file was reloaded (see [`Identity::reloads`]);
/// never when auth is off. Long-lived streams wait on it to check that
/// their caller is still allowed.
pub async fn reloaded(reloads: &mut Option<tokio::sync::watch::Receiver<u64>>) -> Option<()> {
    match reloads {
        Some(rx) => rx.changed().await.ok(),
        None => std::future::pending().await,
    }
}

/// Watches the auth file: reloads it within `interval` of a change to its
/// contents (a rename, or Kubernetes' symlink swap of a mounted Secret,
/// included) and on SIGHUP, until `shutdown`. A file that does not load is
/// logged and the previous one stays in force.
pub async fn watch(
    auth: Auth,
    path: PathBuf,
    interval: Duration,
    shutdown: crate::shutdown::CancellationToken,
) {
    if !auth.is_on() {
        return;
    }
    crate::shutdown::every_change(interval, shutdown, |forced| {
        match auth.reload(&path, forced) {
            Ok(None) => {}
            Ok(Some(principals)) => {
                tracing::info!(path = %path.display(), principals, "auth file reloaded")
            }
            Err(e) => {
                tracing::error!(path = %path.display(), cause = %e, "auth file not reloaded; the previous one stays in force")
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(grants: Vec<(Vec<Pattern>, Vec<Permission>)>) -> Principal {
        Principal {
            limits: Limits::default(),
            name: "p".into(),
            grants: grants
                .into_iter()
                .map(|(patterns, permissions)| Grant {
                    patterns,
                    permissions,
                })
                .collect(),
        }
    }

    /// Rule: write implies read on the same collections; a prefix covers
    /// what starts with it; replicate and admin count only on `*`.
    #[test]
    fn grants_mean_what_they_say() {
        use Permission::*;
        let p = principal(vec![
            (vec![Pattern::Prefix("a.".into())], vec![Write]),
            (vec![Pattern::Exact("b".into())], vec![Read, Replicate]),
        ]);
        assert!(p.allows(Read, "a.x") && p.allows(Write, "a.x"));
        assert!(!p.allows(Read, "ab") && !p.allows(Write, "b"));
        assert!(p.allows(Read, "b"));
        assert!(
            !p.allows(Replicate, "*"),
            "replicate on one collection is no replication"
        );
        let all = principal(vec![(
            vec![Pattern::Prefix(String::new())],
            vec![Replicate, Admin],
        )]);
        assert!(all.allows(Replicate, "*") && all.allows(Admin, "*"));
        assert!(!all.allows(Read, "x"), "replicate is not read");
    }

    /// Rule: principals keep their client ids apart.
    #[test]
    fn client_ids_live_under_their_principal() {
        let a = Identity::Principal(
            Arc::new(Principal {
                name: "a".into(),
                grants: vec![],
                limits: Limits::default(),
            }),
            Session {
                credential: Credential::Token([0; 32]),
                auth: Auth::default(),
            },
        );
        assert_ne!(a.client_key("c1"), Identity::Open.client_key("c1"));
        assert_eq!(a.client_key(""), "", "anonymous stays anonymous");
        assert_eq!(a.author("c1"), "a");
    }
}
