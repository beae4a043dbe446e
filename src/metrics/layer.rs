//! RED metrics for every RPC, as one tower layer, with go-grpc-prometheus
//! names: `grpc_server_started_total`, `grpc_server_handled_total` and
//! `grpc_server_handling_seconds`.
//!
//! A call is counted as handled when it ends: a unary call or a refusal
//! when its status arrives (in the response headers of a trailers-only
//! answer, or in the trailers), a stream when its body ends with its
//! trailers. A call whose client went away first (the future or the body
//! dropped before a status) counts as `Canceled`. Only the methods of the
//! services this server registers get their own labels; any other path is
//! `grpc_method="unknown"`, so a scanner cannot grow the page.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Instant,
};

use http_body::{Body, Frame};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};
use prost::Message;
use tonic::{Code, codegen::http};
use tower::{Layer, Service};

/// Labels of a method's started calls and durations.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    /// The full service name, e.g. `deltasync.v1.SyncService`.
    grpc_service: String,
    /// The method name, e.g. `Push`.
    grpc_method: String,
    /// `unary`, `client_stream`, `server_stream` or `bidi_stream`.
    grpc_type: &'static str,
}

/// Labels of a method's handled calls.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    /// The method's labels.
    #[prometheus(flatten)]
    method: MethodLabels,
    /// The status code's name, as Go's `codes.Code.String()`.
    grpc_code: &'static str,
}

/// The three RPC families, registered once per server.
#[derive(Clone)]
pub(super) struct RpcFamilies {
    /// `grpc_server_started_total`.
    started: Family<MethodLabels, Counter>,
    /// `grpc_server_handled_total`.
    handled: Family<HandledLabels, Counter>,
    /// `grpc_server_handling_seconds`.
    handling: Family<MethodLabels, Histogram, fn() -> Histogram>,
}

impl RpcFamilies {
    /// Registers the families in `registry`.
    pub(super) fn register(registry: &mut Registry) -> Self {
        let families = Self {
            started: Family::default(),
            handled: Family::default(),
            handling: Family::new_with_constructor(|| {
                Histogram::new(super::RPC_SECONDS.iter().copied())
            }),
        };
        registry.register(
            "grpc_server_started",
            "RPCs started on the server",
            families.started.clone(),
        );
        registry.register(
            "grpc_server_handled",
            "RPCs completed on the server, whatever their status",
            families.handled.clone(),
        );
        registry.register(
            "grpc_server_handling_seconds",
            "Time from an RPC's start to its status (a stream's end)",
            families.handling.clone(),
        );
        families
    }
}

/// One method's series, resolved once.
struct Method {
    /// Its labels, for the handled series made on first use.
    labels: MethodLabels,
    /// Its started calls.
    started: Counter,
    /// Its durations.
    handling: Histogram,
    /// Its handled calls by code (indexed by the code's number), each
    /// resolved the first time that code is seen.
    handled: [OnceLock<Counter>; 17],
    /// Where the handled series live.
    family: Family<HandledLabels, Counter>,
}

impl Method {
    fn new(families: &RpcFamilies, labels: MethodLabels) -> Self {
        Self {
            started: families.started.get_or_create_owned(&labels),
            handling: families.handling.get_or_create_owned(&labels),
            handled: Default::default(),
            family: families.handled.clone(),
            labels,
        }
    }

    /// Counts one call as ended with `code` after `took` seconds.
    fn handled(&self, code: Code, took: f64) {
        let i = usize::try_from(i32::from(code))
            .unwrap_or(2)
            .min(self.handled.len() - 1);
        self.handled[i]
            .get_or_init(|| {
                self.family.get_or_create_owned(&HandledLabels {
                    method: self.labels.clone(),
                    grpc_code: code_name(code),
                })
            })
            .inc();
        self.handling.observe(took);
    }
}

/// Every known method by path, and the series of all other paths.
struct Table {
    /// `/package.Service/Method` → its series.
    methods: HashMap<String, Arc<Method>, foldhash::fast::RandomState>,
    /// For paths not served here.
    unknown: Arc<Method>,
}

impl Table {
    /// The methods of this server's services, from their descriptors.
    fn new(families: &RpcFamilies) -> Self {
        let mut methods = HashMap::default();
        let sets = [
            crate::pb::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        for set in sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in &set.file {
                for service in &file.service {
                    let full = match file.package() {
                        "" => service.name().to_owned(),
                        package => format!("{package}.{}", service.name()),
                    };
                    for m in &service.method {
                        let grpc_type = match (m.client_streaming(), m.server_streaming()) {
                            (false, false) => "unary",
                            (true, false) => "client_stream",
                            (false, true) => "server_stream",
                            (true, true) => "bidi_stream",
                        };
                        let labels = MethodLabels {
                            grpc_service: full.clone(),
                            grpc_method: m.name().to_owned(),
                            grpc_type,
                        };
                        methods.insert(
                            format!("/{full}/{}", m.name()),
                            Arc::new(Method::new(families, labels)),
                        );
                    }
                }
            }
        }
        let unknown = MethodLabels {
            grpc_service: "unknown".into(),
            grpc_method: "unknown".into(),
            grpc_type: "unknown",
        };
        Self {
            methods,
            unknown: Arc::new(Method::new(families, unknown)),
        }
    }

    fn lookup(&self, path: &str) -> Arc<Method> {
        self.methods.get(path).unwrap_or(&self.unknown).clone()
    }
}

/// Counts every call of the services it wraps.
#[derive(Clone)]
pub struct RpcLayer {
    /// The resolved series, shared by every connection.
    table: Arc<Table>,
}

impl RpcLayer {
    pub(super) fn new(families: RpcFamilies) -> Self {
        Self {
            table: Arc::new(Table::new(&families)),
        }
    }
}

impl<S> Layer<S> for RpcLayer {
    type Service = Rpc<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Rpc {
            inner,
            table: self.table.clone(),
        }
    }
}

/// The service [`RpcLayer`] makes.
#[derive(Clone)]
pub struct Rpc<S> {
    inner: S,
    table: Arc<Table>,
}

impl<S, B> Service<http::Request<B>> for Rpc<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Counted<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = self.table.lookup(request.uri().path());
        method.started.inc();
        let call = Call {
            method: Some(method),
            started: Instant::now(),
        };
        Counted {
            future: self.inner.call(request),
            call,
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of a counted call: its response, whose body counts the
    /// call when its status comes (written out rather than boxed, so a
    /// call costs no allocation here).
    pub struct Counted<F> {
        #[pin]
        future: F,
        call: Call,
    }
}

impl<F, E> Future for Counted<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match std::task::ready!(this.future.poll(cx)) {
            Ok(response) => response,
            Err(e) => {
                this.call.end(Code::Unknown);
                return Poll::Ready(Err(e));
            }
        };
        // Trailers-only: the status is in the headers and nothing follows.
        if let Some(code) = status_of(response.headers()) {
            this.call.end(code);
            return Poll::Ready(Ok(response));
        }
        let call = this.call.take();
        Poll::Ready(Ok(
            response.map(|body| tonic::body::Body::new(Observed { body, call }))
        ))
    }
}

/// A call not yet counted as handled: counted `Canceled` if dropped so.
struct Call {
    /// `None` once counted.
    method: Option<Arc<Method>>,
    /// When the call started.
    started: Instant,
}

impl Call {
    /// Moves the call out, leaving one that counts nothing.
    fn take(&mut self) -> Self {
        Self {
            method: self.method.take(),
            started: self.started,
        }
    }

    fn end(&mut self, code: Code) {
        if let Some(method) = self.method.take() {
            method.handled(code, self.started.elapsed().as_secs_f64());
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.end(Code::Cancelled);
    }
}

/// A response body that counts its call when its trailers (or its end, or
/// its error) come.
struct Observed {
    body: tonic::body::Body,
    call: Call,
}

impl Body for Observed {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = status_of(trailers).unwrap_or(Code::Unknown);
                    self.call.end(code);
                }
            }
            Poll::Ready(Some(Err(status))) => self.call.end(status.code()),
            // Ended without a status: not a well-formed gRPC answer.
            Poll::Ready(None) => self.call.end(Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The header that carries a call's status.
static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// The `grpc-status` in `headers`, if any.
fn status_of(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get(&GRPC_STATUS)?.as_bytes();
    // Almost always one digit, as tonic writes it.
    if let [digit @ b'0'..=b'9'] = value {
        return Some(Code::from_i32(i32::from(digit - b'0')));
    }
    let n: i32 = std::str::from_utf8(value).ok()?.trim().parse().ok()?;
    Some(Code::from_i32(n))
}

/// The name Go's `codes.Code.String()` gives, as go-grpc-prometheus labels.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rule: every status code gets Go's name, and the methods of every
    /// registered service are known with their streaming type.
    #[test]
    fn codes_and_methods_are_named_as_go_grpc_prometheus_does() {
        assert_eq!(code_name(Code::Cancelled), "Canceled");
        assert_eq!(code_name(Code::InvalidArgument), "InvalidArgument");
        let mut registry = Registry::default();
        let table = Table::new(&RpcFamilies::register(&mut registry));
        let push = table.lookup("/deltasync.v1.SyncService/Push");
        assert_eq!(push.labels.grpc_method, "Push");
        assert_eq!(push.labels.grpc_type, "unary");
        let sub = table.lookup("/deltasync.v1.SyncService/Subscribe");
        assert_eq!(sub.labels.grpc_type, "server_stream");
        assert!(table.methods.contains_key("/grpc.health.v1.Health/Check"));
        assert_eq!(
            table
                .lookup("/deltasync.v1.SyncService/Nope")
                .labels
                .grpc_method,
            "unknown"
        );
    }
}
