//! A minimal client of containerd's snapshots API over a unix socket, to talk to
//! beam-snapshotter directly (as containerd's proxy plugin does), with the message types of the
//! `containerd-snapshots` crate and tonic 0.9's generic gRPC client.

use anyhow::{Context, Result};
use containerd_snapshots::api::snapshots::v1 as pb;
use containerd_snapshots::tonic;
use std::collections::HashMap;
use std::path::Path;
use tonic::codec::ProstCodec;
use tonic::transport::{Channel, Endpoint, Uri};

/// A connected client.
pub struct SnapshotsClient {
    grpc: tonic::client::Grpc<Channel>,
}

impl SnapshotsClient {
    pub async fn connect(socket: &Path) -> Result<Self> {
        let socket = socket.to_path_buf();
        let channel = Endpoint::try_from("http://[::1]:50051")?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                tokio::net::UnixStream::connect(socket.clone())
            }))
            .await
            .context("connecting to the snapshotter socket")?;
        Ok(SnapshotsClient {
            grpc: tonic::client::Grpc::new(channel),
        })
    }

    async fn unary<Req, Resp>(
        &mut self,
        method: &'static str,
        req: Req,
    ) -> Result<Resp, tonic::Status>
    where
        Req: prost::Message + 'static,
        Resp: prost::Message + Default + 'static,
    {
        self.grpc
            .ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let path = http::uri::PathAndQuery::from_static(method);
        let codec: ProstCodec<Req, Resp> = ProstCodec::default();
        self.grpc
            .unary(tonic::Request::new(req), path, codec)
            .await
            .map(|r| r.into_inner())
    }

    pub async fn prepare(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<containerd_snapshots::api::types::Mount>, tonic::Status> {
        let r: pb::PrepareSnapshotResponse = self
            .unary(
                "/containerd.services.snapshots.v1.Snapshots/Prepare",
                pb::PrepareSnapshotRequest {
                    snapshotter: "beam".into(),
                    key: key.into(),
                    parent: parent.into(),
                    labels,
                },
            )
            .await?;
        Ok(r.mounts)
    }

    pub async fn stat(&mut self, key: &str) -> Result<pb::Info, tonic::Status> {
        let r: pb::StatSnapshotResponse = self
            .unary(
                "/containerd.services.snapshots.v1.Snapshots/Stat",
                pb::StatSnapshotRequest {
                    snapshotter: "beam".into(),
                    key: key.into(),
                },
            )
            .await?;
        r.info.ok_or_else(|| tonic::Status::internal("no info"))
    }

    pub async fn mounts(
        &mut self,
        key: &str,
    ) -> Result<Vec<containerd_snapshots::api::types::Mount>, tonic::Status> {
        let r: pb::MountsResponse = self
            .unary(
                "/containerd.services.snapshots.v1.Snapshots/Mounts",
                pb::MountsRequest {
                    snapshotter: "beam".into(),
                    key: key.into(),
                },
            )
            .await?;
        Ok(r.mounts)
    }

    pub async fn remove(&mut self, key: &str) -> Result<(), tonic::Status> {
        let _: () = self
            .unary::<_, ()>(
                "/containerd.services.snapshots.v1.Snapshots/Remove",
                pb::RemoveSnapshotRequest {
                    snapshotter: "beam".into(),
                    key: key.into(),
                },
            )
            .await?;
        Ok(())
    }
}

impl SnapshotsClient {
    pub async fn commit(
        &mut self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), tonic::Status> {
        let _: () = self
            .unary::<_, ()>(
                "/containerd.services.snapshots.v1.Snapshots/Commit",
                pb::CommitSnapshotRequest {
                    snapshotter: "beam".into(),
                    name: name.into(),
                    key: key.into(),
                    labels,
                },
            )
            .await?;
        Ok(())
    }

    /// All snapshots (List), following the stream.
    pub async fn list(&mut self) -> Result<Vec<pb::Info>, tonic::Status> {
        self.list_filtered(&[]).await
    }

    /// The snapshots matching any of `filters` (containerd's filter syntax; List, as `Walk`
    /// with filters sends it), following the stream.
    pub async fn list_filtered(
        &mut self,
        filters: &[&str],
    ) -> Result<Vec<pb::Info>, tonic::Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let path = http::uri::PathAndQuery::from_static(
            "/containerd.services.snapshots.v1.Snapshots/List",
        );
        let codec: ProstCodec<pb::ListSnapshotsRequest, pb::ListSnapshotsResponse> =
            ProstCodec::default();
        let mut stream = self
            .grpc
            .server_streaming(
                tonic::Request::new(pb::ListSnapshotsRequest {
                    snapshotter: "beam".into(),
                    filters: filters.iter().map(|f| f.to_string()).collect(),
                }),
                path,
                codec,
            )
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(r) = stream.message().await? {
            out.extend(r.info);
        }
        Ok(out)
    }
}

/// `google.protobuf.FieldMask`, declared here because the `containerd-snapshots` crate does not
/// re-export `prost-types` (same wire format).
#[derive(Clone, PartialEq, prost::Message)]
struct FieldMask {
    #[prost(string, repeated, tag = "1")]
    paths: Vec<String>,
}

/// `UpdateSnapshotRequest` with the local [`FieldMask`] (same wire format).
#[derive(Clone, PartialEq, prost::Message)]
struct UpdateSnapshotRequest {
    #[prost(string, tag = "1")]
    snapshotter: String,
    #[prost(message, optional, tag = "2")]
    info: Option<pb::Info>,
    #[prost(message, optional, tag = "3")]
    update_mask: Option<FieldMask>,
}

impl SnapshotsClient {
    pub async fn view(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<containerd_snapshots::api::types::Mount>, tonic::Status> {
        let r: pb::ViewSnapshotResponse = self
            .unary(
                "/containerd.services.snapshots.v1.Snapshots/View",
                pb::ViewSnapshotRequest {
                    snapshotter: "beam".into(),
                    key: key.into(),
                    parent: parent.into(),
                    labels,
                },
            )
            .await?;
        Ok(r.mounts)
    }

    /// Update `info` (its name selects the snapshot) with `fieldpaths` as the update mask, as
    /// containerd's proxy sends it (always a mask, empty for "all mutable fields").
    pub async fn update(
        &mut self,
        info: pb::Info,
        fieldpaths: &[&str],
    ) -> Result<pb::Info, tonic::Status> {
        let r: pb::UpdateSnapshotResponse = self
            .unary(
                "/containerd.services.snapshots.v1.Snapshots/Update",
                UpdateSnapshotRequest {
                    snapshotter: "beam".into(),
                    info: Some(info),
                    update_mask: Some(FieldMask {
                        paths: fieldpaths.iter().map(|p| p.to_string()).collect(),
                    }),
                },
            )
            .await?;
        r.info.ok_or_else(|| tonic::Status::internal("no info"))
    }

    pub async fn usage(&mut self, key: &str) -> Result<pb::UsageResponse, tonic::Status> {
        self.unary(
            "/containerd.services.snapshots.v1.Snapshots/Usage",
            pb::UsageRequest {
                snapshotter: "beam".into(),
                key: key.into(),
            },
        )
        .await
    }

    /// containerd's Cleanup: remove what no snapshot uses.
    pub async fn cleanup(&mut self) -> Result<(), tonic::Status> {
        let _: () = self
            .unary::<_, ()>(
                "/containerd.services.snapshots.v1.Snapshots/Cleanup",
                pb::CleanupRequest {
                    snapshotter: "beam".into(),
                },
            )
            .await?;
        Ok(())
    }
}
