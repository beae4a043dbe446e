//! The two systems under test behind one small API: write a batch, read
//! everything in pages, follow changes live.

use deltasync::{
    pb::{self, subscribe_response::Event, sync_service_client::SyncServiceClient},
    store::model::EncodedBody,
};
use etcd_client::{GetOptions, SortOrder, SortTarget, Txn, TxnOp, WatchOptions};
use tonic::{Streaming, service::interceptor::InterceptedService, transport::Channel};
use tonic_health::pb::health_client::HealthClient;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Which system to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// This project's server.
    Deltasync,
    /// etcd v3 (the peer).
    Etcd,
}

/// Where every benchmark key lives: collection `bench` / etcd prefix `bench/`.
const COLLECTION: &str = "bench";
const PREFIX: &str = "bench/";

/// A value to write, ready in each system's form, so that no run pays for
/// building it per request.
pub struct Value {
    /// etcd's: the bytes themselves.
    raw: String,
    /// deltasync's: a document `{"v": raw}`.
    body: EncodedBody,
}

impl Value {
    pub fn new(raw: String) -> Self {
        let doc = serde_json::json!({ "v": raw });
        let body = EncodedBody::encode(doc.as_object().expect("an object literal"));
        Self { raw, body }
    }
}

/// Adds `authorization` to every call when `DELTASYNC_BENCH_TOKEN` is set
/// (a server with --auth-file), so the cost of auth can be measured.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// One connection to the system under test.
pub enum Conn {
    Deltasync(SyncServiceClient<InterceptedService<Channel, Bearer>>),
    Etcd(Box<etcd_client::Client>),
}

/// A health client on its own connection; both systems serve
/// `grpc.health.v1`, so the same client code measures either.
pub async fn health(endpoint: &str) -> Result<HealthClient<Channel>, Error> {
    Ok(HealthClient::new(channel(endpoint).await?))
}

/// A new HTTP/2 connection, with Nagle off as befits a latency-bound client.
/// With `DELTASYNC_BENCH_CA` set (a PEM file), an `https://` endpoint is
/// reached over TLS trusting that CA, for the server's name `localhost`.
async fn channel(endpoint: &str) -> Result<Channel, Error> {
    let mut endpoint =
        tonic::transport::Endpoint::from_shared(endpoint.to_owned())?.tcp_nodelay(true);
    if let Ok(ca) = std::env::var("DELTASYNC_BENCH_CA") {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(ca)?))
            .domain_name("localhost");
        endpoint = endpoint.tls_config(tls)?;
    }
    Ok(endpoint.connect().await?)
}

impl Conn {
    /// A new connection (its own HTTP/2 connection for either system).
    pub async fn connect(kind: Kind, endpoint: &str) -> Result<Self, Error> {
        Ok(match kind {
            Kind::Deltasync => {
                let channel = channel(endpoint).await?;
                let bearer = Bearer(
                    std::env::var("DELTASYNC_BENCH_TOKEN")
                        .ok()
                        .map(|t| format!("Bearer {t}").parse())
                        .transpose()?,
                );
                Self::Deltasync(
                    SyncServiceClient::with_interceptor(channel, bearer)
                        .max_decoding_message_size(64 << 20),
                )
            }
            Kind::Etcd => Self::Etcd(Box::new(
                etcd_client::Client::connect([endpoint], None).await?,
            )),
        })
    }

    /// Writes `keys`, each with a value of `value`, in one request (etcd:
    /// one Put, or one Txn of Puts for a batch). Returns the last seq/revision.
    pub async fn put(&mut self, keys: &[String], value: &Value) -> Result<u64, Error> {
        self.put_tracked(keys, value, None).await
    }

    /// As [`Conn::put`]; with `tracked` = (client id, first mutation id),
    /// deltasync records the mutation ids for deduplication, as real
    /// clients do (etcd has no such thing and ignores it).
    pub async fn put_tracked(
        &mut self,
        keys: &[String],
        value: &Value,
        tracked: Option<(&str, u64)>,
    ) -> Result<u64, Error> {
        match self {
            Self::Deltasync(c) => {
                let body = &value.body;
                let (client_id, first) = tracked.unwrap_or(("", 0));
                let mutations = keys
                    .iter()
                    .zip(first..)
                    .map(|(k, id)| pb::Mutation {
                        mutation_id: if first == 0 { 0 } else { id },
                        collection: COLLECTION.into(),
                        id: k.clone(),
                        op: Some(pb::mutation::Op::Put(body.clone())),
                        ..Default::default()
                    })
                    .collect();
                let resp = c
                    .push(pb::PushRequest {
                        client_id: client_id.into(),
                        mutations,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                Ok(resp.checkpoint)
            }
            Self::Etcd(c) => {
                if let [key] = keys {
                    let resp = c.put(format!("{PREFIX}{key}"), &*value.raw, None).await?;
                    return Ok(resp
                        .header()
                        .map_or(0, |h| u64::try_from(h.revision()).unwrap_or(0)));
                }
                let ops: Vec<TxnOp> = keys
                    .iter()
                    .map(|k| TxnOp::put(format!("{PREFIX}{k}"), &*value.raw, None))
                    .collect();
                let resp = c.txn(Txn::new().and_then(ops)).await?;
                Ok(resp
                    .header()
                    .map_or(0, |h| u64::try_from(h.revision()).unwrap_or(0)))
            }
        }
    }

    /// Reads every benchmark document from the start, `page` at a time;
    /// returns how many were read.
    pub async fn read_all(&mut self, page: usize) -> Result<usize, Error> {
        let mut count = 0;
        match self {
            Self::Deltasync(c) => {
                let mut since = 0;
                loop {
                    let req = pb::PullRequest {
                        since,
                        limit: u32::try_from(page)?,
                        collections: vec![COLLECTION.into()],
                        ..Default::default()
                    };
                    let resp = c.pull(req).await?.into_inner();
                    count += resp.documents.len();
                    since = resp.checkpoint;
                    if !resp.has_more {
                        return Ok(count);
                    }
                }
            }
            Self::Etcd(c) => {
                let end = format!("{}0", &PREFIX[..PREFIX.len() - 1]); // "bench0": just past "bench/"
                let mut from = PREFIX.as_bytes().to_vec();
                loop {
                    let options = GetOptions::new()
                        .with_range(end.as_bytes())
                        .with_limit(i64::try_from(page)?)
                        .with_sort(SortTarget::Key, SortOrder::Ascend);
                    let resp = c.get(from.clone(), Some(options)).await?;
                    let kvs = resp.kvs();
                    count += kvs.len();
                    match kvs.last() {
                        Some(last) if resp.more() => {
                            from = last.key().to_vec();
                            from.push(0);
                        }
                        _ => return Ok(count),
                    }
                }
            }
        }
    }

    /// Follows every change to benchmark keys from the very first one.
    pub async fn watch_from_start(&mut self) -> Result<Watch, Error> {
        match self {
            Self::Deltasync(c) => {
                let req = pb::SubscribeRequest {
                    since: 0,
                    collections: vec![COLLECTION.into()],
                    ..Default::default()
                };
                Ok(Watch::Deltasync(c.subscribe(req).await?.into_inner()))
            }
            Self::Etcd(c) => {
                let options = WatchOptions::new().with_prefix().with_start_revision(1);
                // etcd replays history in messages of tens of MB.
                let mut watch = c.watch_client().max_decoding_message_size(1 << 30);
                Ok(Watch::Etcd(watch.watch(PREFIX, Some(options)).await?))
            }
        }
    }

    /// Follows live changes to benchmark keys from now on.
    pub async fn watch(&mut self) -> Result<Watch, Error> {
        match self {
            Self::Deltasync(c) => {
                // An empty push answers with the current head.
                let head = c
                    .push(pb::PushRequest::default())
                    .await?
                    .into_inner()
                    .checkpoint;
                let req = pb::SubscribeRequest {
                    since: head,
                    collections: vec![COLLECTION.into()],
                    ..Default::default()
                };
                let mut stream = c.subscribe(req).await?.into_inner();
                // The first message is the caught-up marker.
                stream.message().await?;
                Ok(Watch::Deltasync(stream))
            }
            Self::Etcd(c) => {
                let mut stream = c
                    .watch(PREFIX, Some(WatchOptions::new().with_prefix()))
                    .await?;
                // The first message confirms the watch exists.
                stream.message().await?;
                Ok(Watch::Etcd(stream))
            }
        }
    }
}

/// A live feed from either system.
pub enum Watch {
    Deltasync(Streaming<pb::SubscribeResponse>),
    Etcd(etcd_client::WatchStream),
}

impl Watch {
    /// The keys of the next batch of changes (empty for progress messages);
    /// `None` when the stream ends.
    pub async fn next(&mut self) -> Result<Option<Vec<String>>, Error> {
        match self {
            Self::Deltasync(stream) => Ok(stream.message().await?.map(|m| match m.event {
                Some(Event::Changes(batch)) => batch.documents.into_iter().map(|d| d.id).collect(),
                _ => Vec::new(),
            })),
            Self::Etcd(stream) => Ok(stream.message().await?.map(|resp| {
                resp.events()
                    .iter()
                    .filter_map(|e| e.kv())
                    .filter_map(|kv| {
                        kv.key_str()
                            .ok()
                            .and_then(|k| k.strip_prefix(PREFIX))
                            .map(str::to_owned)
                    })
                    .collect()
            })),
        }
    }
}
