//! Endpoints, channels, credentials and the failover loop every call goes
//! through.

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, ClientTlsConfig, Endpoint},
};

use super::error::{ClientError, Next, next, outcome_unknown};

/// A channel with the client's credentials added to every call.
pub(crate) type Svc = InterceptedService<Channel, Auth>;

/// Adds `authorization: Bearer <token>` to every call, when a token is set.
#[derive(Clone, Default)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl Auth {
    /// The header for `token` (surrounding whitespace ignored).
    pub(crate) fn bearer(token: Option<&str>) -> Result<Self, ClientError> {
        token
            .map(|t| {
                format!("Bearer {}", t.trim()).parse().map_err(|_| {
                    ClientError::Config("the token is not a valid header value".into())
                })
            })
            .transpose()
            .map(Self)
    }
}

impl Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// How failed attempts are retried: for a time, not a number of attempts,
/// so that a cluster whose primary restarts is ridden out however many
/// endpoints are listed (with three dead endpoints a round of attempts
/// takes no time at all).
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// How long a call keeps retrying, from its first attempt: no attempt
    /// starts after it (waits are cut short to end with one last attempt
    /// at it). Default 30 s.
    pub max_elapsed: Duration,
    /// Most attempts of one call, the first included (failovers and
    /// redirects to a primary count): a safety cap under `max_elapsed`.
    pub max_attempts: u32,
    /// Wait after the first round of endpoints that all failed.
    pub initial_backoff: Duration,
    /// Longest wait between rounds (the wait doubles each round, with
    /// jitter).
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// Retries for 30 s (at most 1000 attempts), waits from 100 ms doubling
    /// up to 2 s between rounds of endpoints: rides out a server restart or
    /// a failover whatever the number of endpoints.
    fn default() -> Self {
        Self {
            max_elapsed: Duration::from_secs(30),
            max_attempts: 1000,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// The wait before round `round` (1 = after the first full round of
    /// failures): doubling, capped, with up to 25% jitter so that clients
    /// failing together do not come back together.
    pub(crate) fn backoff(&self, round: u32) -> Duration {
        backoff(self.initial_backoff, self.max_backoff, round)
    }
}

/// The wait before round `round` (1 = after the first failure): `initial`
/// doubling, capped at `max`, with up to 25% jitter.
pub(crate) fn backoff(initial: Duration, max: Duration, round: u32) -> Duration {
    let base = initial
        .saturating_mul(1 << round.saturating_sub(1).min(16))
        .min(max);
    let jitter = getrandom::u32().unwrap_or(0) % 256;
    base + base / 4 * jitter / 256
}

/// Where a call goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// Any node: reads.
    Any,
    /// The primary if known (from `NOT_PRIMARY`), else any node: pushes
    /// (a replica forwards them or names the primary).
    Primary,
    /// This node and no other: calls about one node (Status of a given
    /// endpoint, Promote). Not retried, except after a rate limit's delay.
    Node(String),
}

/// The endpoints and one lazily connected channel per endpoint.
pub(crate) struct Transport {
    /// The endpoint URLs as given.
    endpoints: Vec<String>,
    /// One channel per endpoint, connected on first use and reconnected
    /// by tonic after a failure.
    channels: Vec<Channel>,
    /// Channels to primaries named by `NOT_PRIMARY` that are not among the
    /// endpoints.
    named: Mutex<HashMap<String, Channel>>,
    /// The endpoint that answered last: calls stick to it.
    current: AtomicUsize,
    /// The primary's URL, once a replica named it.
    primary: Mutex<Option<String>>,
    /// TLS for every channel (also for named primaries).
    tls: Option<ClientTlsConfig>,
    /// Connect timeout of every channel.
    connect_timeout: Duration,
    /// Credentials.
    pub(crate) auth: Auth,
    /// Retries.
    pub(crate) retry: RetryPolicy,
    /// Deadline of each unary attempt.
    pub(crate) timeout: Option<Duration>,
}

impl Transport {
    pub(crate) fn new(
        endpoints: Vec<String>,
        tls: Option<ClientTlsConfig>,
        connect_timeout: Duration,
        auth: Auth,
        retry: RetryPolicy,
        timeout: Option<Duration>,
    ) -> Result<Self, ClientError> {
        if endpoints.is_empty() {
            return Err(ClientError::Config("no endpoint given".into()));
        }
        let channels = endpoints
            .iter()
            .map(|url| channel(url, tls.as_ref(), connect_timeout))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            endpoints,
            channels,
            named: Mutex::default(),
            current: AtomicUsize::new(0),
            primary: Mutex::default(),
            tls,
            connect_timeout,
            auth,
            retry,
            timeout,
        })
    }

    /// The endpoint URLs.
    pub(crate) fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The channel of `url`: an endpoint's, or one made for a named
    /// primary.
    pub(crate) fn channel_for(&self, url: &str) -> Result<Channel, ClientError> {
        if let Some(i) = self.endpoints.iter().position(|e| e == url) {
            return Ok(self.channels[i].clone());
        }
        let mut named = self.named.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = named.get(url) {
            return Ok(c.clone());
        }
        let c = channel(url, self.tls.as_ref(), self.connect_timeout)?;
        named.insert(url.to_owned(), c.clone());
        Ok(c)
    }

    /// A channel with credentials.
    pub(crate) fn svc(&self, channel: Channel) -> Svc {
        InterceptedService::new(channel, self.auth.clone())
    }

    fn known_primary(&self) -> Option<String> {
        self.primary
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_primary(&self, url: Option<String>) {
        *self.primary.lock().unwrap_or_else(|e| e.into_inner()) = url;
    }

    /// Runs `attempt` against the nodes `target` allows, retrying as
    /// [`next`] says: failover to the next endpoint, to the primary a
    /// replica names, after the server's retry delay, with backoff once a
    /// whole round of endpoints failed, until the policy's `max_elapsed`
    /// (or `max_attempts`) is spent. `idempotent`: resending cannot apply
    /// anything twice. Every attempt gets the full per-call deadline,
    /// enforced here too (a server that hangs is a failure).
    pub(crate) async fn call<T, F, Fut>(
        &self,
        target: Target,
        idempotent: bool,
        attempt: F,
    ) -> Result<T, ClientError>
    where
        F: FnMut(Svc) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.call_tracked(target, idempotent, &AtomicBool::new(false), attempt)
            .await
    }

    /// As [`Transport::call`]; sets `unknown` when a failed attempt may
    /// have reached a writer ([`outcome_unknown`]): a later `DUPLICATE`
    /// then means that attempt applied the mutation.
    pub(crate) async fn call_tracked<T, F, Fut>(
        &self,
        target: Target,
        idempotent: bool,
        unknown: &AtomicBool,
        mut attempt: F,
    ) -> Result<T, ClientError>
    where
        F: FnMut(Svc) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let n = self.endpoints.len();
        let deadline = Instant::now() + self.retry.max_elapsed;
        let (mut failed_in_round, mut round) = (0, 0);
        let mut redirect: Option<String> = None;
        for tried in 1..=self.retry.max_attempts {
            let index = self.current.load(Ordering::Relaxed) % n;
            let url = match (&target, redirect.take()) {
                (Target::Node(url), _) => url.clone(),
                (_, Some(url)) => url,
                (Target::Primary, None) => self
                    .known_primary()
                    .unwrap_or_else(|| self.endpoints[index].clone()),
                (Target::Any, None) => self.endpoints[index].clone(),
            };
            let svc = self.svc(self.channel_for(&url)?);
            let result = match self.timeout {
                // A margin past the deadline the server enforces, so its
                // own DEADLINE_EXCEEDED normally comes first.
                Some(t) => tokio::time::timeout(t + Duration::from_millis(200), attempt(svc))
                    .await
                    .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer in time"))),
                None => attempt(svc).await,
            };
            let status = match result {
                Ok(value) => return Ok(value),
                Err(status) => status,
            };
            if outcome_unknown(&status) {
                unknown.store(true, Ordering::Relaxed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if tried == self.retry.max_attempts || left.is_zero() {
                return Err(status.into());
            }
            // Waits end at the deadline, for one last attempt there.
            let wait = |d: Duration| tokio::time::sleep(d.min(left));
            match next(&status, idempotent) {
                Next::Fail => return Err(status.into()),
                // A question about one node is answered by that node, now:
                // only a rate limit's delay is waited out.
                Next::Redirect(_) | Next::Failover if matches!(target, Target::Node(_)) => {
                    return Err(status.into());
                }
                Next::Redirect(primary) => {
                    tracing::debug!(from = %url, to = %primary, "not the primary; going to the primary");
                    self.set_primary(Some(primary.clone()));
                    redirect = Some(primary);
                }
                Next::RetryAfter(delay) => {
                    tracing::debug!(?delay, "rate limited; retrying after the server's delay");
                    if target == Target::Any {
                        // Another node may have room now.
                        let _ = self.current.compare_exchange(
                            index,
                            (index + 1) % n,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    }
                    wait(delay).await;
                }
                Next::Failover => {
                    tracing::debug!(endpoint = %url, cause = %status.message(), "failing over");
                    if self.known_primary().as_deref() == Some(url.as_str()) {
                        // The primary we were sent to is gone: ask around.
                        self.set_primary(None);
                    } else {
                        let _ = self.current.compare_exchange(
                            index,
                            (index + 1) % n,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    }
                    failed_in_round += 1;
                    if failed_in_round >= n {
                        failed_in_round = 0;
                        round += 1;
                        wait(self.retry.backoff(round)).await;
                    }
                }
            }
        }
        Err(ClientError::Config(
            "max_attempts must be at least 1".into(),
        ))
    }

    /// Moves calls to the next endpoint (a stream that broke).
    pub(crate) fn rotate(&self) {
        self.current.fetch_add(1, Ordering::Relaxed);
    }
}

/// A lazily connected channel to `url`; `https://` URLs use `tls`.
fn channel(
    url: &str,
    tls: Option<&ClientTlsConfig>,
    connect_timeout: Duration,
) -> Result<Channel, ClientError> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| ClientError::Config(format!("endpoint `{url}`: {e}")))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    if url.starts_with("https://") {
        // Without a CA of the caller's, no root is trusted (the client
        // carries none), so the handshake fails and says so.
        let tls = tls.cloned().unwrap_or_default();
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| ClientError::Config(format!("endpoint `{url}`: TLS: {e}")))?;
    }
    Ok(endpoint.connect_lazy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy {
            max_elapsed: Duration::from_secs(30),
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
        };
        let within = |d: Duration, base: u64| {
            d >= Duration::from_millis(base) && d <= Duration::from_millis(base * 5 / 4)
        };
        assert!(within(p.backoff(1), 100));
        assert!(within(p.backoff(2), 200));
        assert!(within(p.backoff(3), 400));
        assert!(within(p.backoff(9), 500));
    }
}
