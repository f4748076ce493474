//! containerd's snapshots API over beam-snapshotter's unix socket, as containerd's proxy plugin
//! talks to it: the client tonic generates in the `containerd-snapshots` crate (tonic 0.9, the
//! same prost types the daemon serves), behind a thin wrapper that connects over the socket,
//! names the snapshotter in every request and unwraps the answers (the tests make some 190
//! calls).

use anyhow::{Context, Result};
use containerd_snapshots::api::snapshots::v1::{self as pb, snapshots_client};
use containerd_snapshots::api::types::Mount;
use containerd_snapshots::tonic::transport::{Channel, Endpoint, Uri};
use containerd_snapshots::tonic::Status;
use std::collections::HashMap;
use std::path::Path;

/// The name containerd's proxy plugin gives the snapshotter in its requests.
const SNAPSHOTTER: &str = "beam";

/// A connected client.
pub struct SnapshotsClient {
    grpc: snapshots_client::SnapshotsClient<Channel>,
}

impl SnapshotsClient {
    pub async fn connect(socket: &Path) -> Result<Self> {
        let socket = socket.to_path_buf();
        // The URI is required by tonic and ignored by the connector.
        let channel = Endpoint::try_from("http://[::1]:50051")?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                tokio::net::UnixStream::connect(socket.clone())
            }))
            .await
            .context("connecting to the snapshotter socket")?;
        Ok(SnapshotsClient {
            grpc: snapshots_client::SnapshotsClient::new(channel),
        })
    }

    pub async fn prepare(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        let req = pb::PrepareSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
            parent: parent.into(),
            labels,
        };
        Ok(self.grpc.prepare(req).await?.into_inner().mounts)
    }

    pub async fn view(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        let req = pb::ViewSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
            parent: parent.into(),
            labels,
        };
        Ok(self.grpc.view(req).await?.into_inner().mounts)
    }

    pub async fn mounts(&mut self, key: &str) -> Result<Vec<Mount>, Status> {
        let req = pb::MountsRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
        };
        Ok(self.grpc.mounts(req).await?.into_inner().mounts)
    }

    pub async fn commit(
        &mut self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), Status> {
        let req = pb::CommitSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            name: name.into(),
            key: key.into(),
            labels,
        };
        self.grpc.commit(req).await.map(drop)
    }

    pub async fn stat(&mut self, key: &str) -> Result<pb::Info, Status> {
        let req = pb::StatSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
        };
        let info = self.grpc.stat(req).await?.into_inner().info;
        info.ok_or_else(|| Status::internal("no info"))
    }

    /// Update `info` (its name selects the snapshot) with `fieldpaths` as the update mask, as
    /// containerd's proxy sends it (always a mask, empty for "all mutable fields").
    pub async fn update(
        &mut self,
        info: pb::Info,
        fieldpaths: &[&str],
    ) -> Result<pb::Info, Status> {
        let req = pb::UpdateSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            info: Some(info),
            update_mask: Some(prost_types::FieldMask {
                paths: fieldpaths.iter().map(|p| p.to_string()).collect(),
            }),
        };
        let info = self.grpc.update(req).await?.into_inner().info;
        info.ok_or_else(|| Status::internal("no info"))
    }

    pub async fn usage(&mut self, key: &str) -> Result<pb::UsageResponse, Status> {
        let req = pb::UsageRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
        };
        Ok(self.grpc.usage(req).await?.into_inner())
    }

    pub async fn remove(&mut self, key: &str) -> Result<(), Status> {
        let req = pb::RemoveSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: key.into(),
        };
        self.grpc.remove(req).await.map(drop)
    }

    /// containerd's Cleanup: remove what no snapshot uses.
    pub async fn cleanup(&mut self) -> Result<(), Status> {
        let req = pb::CleanupRequest {
            snapshotter: SNAPSHOTTER.into(),
        };
        self.grpc.cleanup(req).await.map(drop)
    }

    /// All snapshots (List), following the stream.
    pub async fn list(&mut self) -> Result<Vec<pb::Info>, Status> {
        self.list_filtered(&[]).await
    }

    /// The snapshots matching any of `filters` (containerd's filter syntax; List, as `Walk`
    /// with filters sends it), following the stream.
    pub async fn list_filtered(&mut self, filters: &[&str]) -> Result<Vec<pb::Info>, Status> {
        let req = pb::ListSnapshotsRequest {
            snapshotter: SNAPSHOTTER.into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        };
        let mut stream = self.grpc.list(req).await?.into_inner();
        let mut out = Vec::new();
        while let Some(r) = stream.message().await? {
            out.extend(r.info);
        }
        Ok(out)
    }
}
