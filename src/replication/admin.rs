//! `AdminService`: what a node is (Status) and making a replica the
//! primary (Promote).

use tonic::{Request, Response, Status};

use super::{Node, Role};
use crate::{
    auth::{Identity, Permission},
    error::Error,
    pb::{self, admin_service_server::AdminService},
};

/// The `AdminService`.
#[derive(Clone)]
pub struct AdminApi {
    /// The node.
    node: Node,
}

impl AdminApi {
    /// The service of `node`.
    pub fn new(node: Node) -> Self {
        Self { node }
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Identity::of(&request).require_store(Permission::Admin)?;
        let store = self.node.store();
        let role = self.node.role();
        Ok(Response::new(pb::StatusResponse {
            role: match role {
                Role::Primary | Role::Deposed => pb::Role::Primary,
                Role::Replica => pb::Role::Replica,
            }
            .into(),
            epoch: store.seen_epoch().map_err(Error::from)?,
            store_id: store.store_id().to_string(),
            head: store.head().0,
            primary: match role {
                Role::Replica => self.node.settings().primary.clone().unwrap_or_default(),
                Role::Primary | Role::Deposed => String::new(),
            },
            replicas: self.node.replica_statuses(),
            deposed: role == Role::Deposed,
        }))
    }

    async fn promote(
        &self,
        request: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::PromoteResponse>, Status> {
        Identity::of(&request).require_store(Permission::Admin)?;
        let (epoch, head) = self.node.promote().await?;
        Ok(Response::new(pb::PromoteResponse {
            epoch,
            head: head.0,
        }))
    }
}
