//! `--metrics-listen`: `GET /metrics` over plain HTTP/1.1, with the hyper
//! that tonic already brings (no web framework, no TLS).

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::{Metrics, Sample};
use crate::shutdown::CancellationToken;

/// Samples the store and node for a scrape.
pub type Sampler = Arc<dyn Fn() -> Sample + Send + Sync>;

/// Serves `/metrics` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    sample: Sampler,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(cause = %e, "metrics listener: accept failed");
                    continue;
                }
            },
        };
        let (metrics, sample, stop) = (metrics.clone(), sample.clone(), shutdown.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let (metrics, sample) = (metrics.clone(), sample.clone());
                async move {
                    // The sample walks the data directory (size on disk):
                    // off the runtime's workers.
                    let page =
                        tokio::task::spawn_blocking(move || answer(&request, &metrics, &sample))
                            .await
                            .unwrap_or_else(|_| {
                                let mut r = Response::new(Full::new(Bytes::from_static(
                                    b"scrape failed\n",
                                )));
                                *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                                r
                            });
                    Ok::<_, Infallible>(page)
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                () = stop.cancelled() => {}
                result = connection => if let Err(e) = result {
                    tracing::debug!(cause = %e, "metrics connection ended with an error");
                },
            }
        });
    }
}

/// The answer to one request: the page for `GET /metrics`, else 404/405.
fn answer(
    request: &Request<Incoming>,
    metrics: &Metrics,
    sample: &Sampler,
) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *response.status_mut() = status;
        response
    };
    if request.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "not found; try /metrics\n");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n");
    }
    let page = metrics.encode(&sample());
    let mut response = Response::new(Full::new(Bytes::from(page)));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        ),
    );
    response
}
