//! The global limit on calls in progress: a tower layer in front of every
//! service. A call over the limit is answered RESOURCE_EXHAUSTED at once
//! (with a short retry delay) instead of queueing behind the others, so an
//! overloaded server tells its clients to back off rather than letting
//! their deadlines expire. A streaming call holds its place until its
//! handler has answered (the stream itself then runs without one).

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::future::BoxFuture;
use tokio::sync::Semaphore;
use tonic::codegen::http;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tower::{Layer, Service};

use crate::metrics::{Metrics, Refusal};

/// How long an overloaded server asks clients to wait.
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// Limits calls in progress to a number of permits.
#[derive(Clone)]
pub struct OverloadLayer {
    permits: Arc<Semaphore>,
    /// Counts refusals.
    metrics: Metrics,
}

impl OverloadLayer {
    /// At most `max` calls in progress at once.
    pub fn new(max: usize, metrics: Metrics) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            metrics,
        }
    }
}

impl<S> Layer<S> for OverloadLayer {
    type Service = Overload<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Overload {
            inner,
            permits: self.permits.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`OverloadLayer`] makes.
#[derive(Clone)]
pub struct Overload<S> {
    inner: S,
    permits: Arc<Semaphore>,
    metrics: Metrics,
}

impl<S, B> Service<http::Request<B>> for Overload<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // Probes are answered whatever the load.
        let probe = request.uri().path().starts_with("/grpc.health.v1.");
        let permit = self.permits.clone().try_acquire_owned();
        if permit.is_err() && !probe {
            self.metrics.refused(Refusal::Overloaded);
            let status = Status::with_error_details(
                Code::ResourceExhausted,
                "the server is at its limit of calls in progress (--max-concurrent-requests); retry shortly",
                ErrorDetails::with_retry_info(Some(RETRY_AFTER)),
            );
            return Box::pin(async move { Ok(status.into_http()) });
        }
        // The service that was polled ready handles this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let response = inner.call(request).await;
            drop(permit);
            response
        })
    }
}
