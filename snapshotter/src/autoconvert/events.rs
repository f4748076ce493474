//! Push events as registries send them, told apart by their content:
//! - Distribution's notifications: `{"events": [{"action": "push", "target": {...}}]}`, sent
//!   with the media type `application/vnd.docker.distribution.events.v1+json`;
//! - Harbor's webhooks, in its default format (`{"type": "PUSH_ARTIFACT", "event_data": ...}`)
//!   and in its CloudEvents format (`{"specversion": "1.0", "type": "harbor.artifact.pushed",
//!   "data": ...}`).
//!
//! Only what names a tagged image is kept: blob pushes, pulls, deletes and manifests pushed by
//! digest alone (the children of an index, whose tag arrives with the index, and artifacts
//! such as signatures and Beam's own) are dropped here with the reason counted. The registry
//! host in an event is ignored: the service talks only to the registry it is configured for,
//! so an event cannot send it anywhere else.

use serde::Deserialize;

/// A tag pushed to the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushEvent {
    /// Repository within the registry, e.g. `library/python`.
    pub repository: String,
    pub tag: String,
    /// The digest the push named, when the event carries it.
    pub digest: Option<String>,
}

/// What one request body held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub pushes: Vec<PushEvent>,
    /// Events that name no tagged image push (blob pushes, pulls, deletes, untagged manifests).
    pub ignored: usize,
    /// Which registry format the body was in.
    pub format: &'static str,
}

/// Why a body is not an event we understand.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("the body is not JSON: {0}")]
    NotJson(#[from] serde_json::Error),
    #[error("the body is neither a Distribution notification nor a Harbor webhook: {0}")]
    Unknown(String),
    #[error("malformed {format} event: {why}")]
    Malformed { format: &'static str, why: String },
}

/// Manifest and index media types: the targets of image pushes.
const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

#[derive(Deserialize)]
struct DistributionEnvelope {
    events: Vec<DistributionEvent>,
}

#[derive(Deserialize)]
struct DistributionEvent {
    action: String,
    #[serde(default)]
    target: DistributionTarget,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DistributionTarget {
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    digest: String,
    #[serde(default)]
    repository: String,
    #[serde(default)]
    tag: String,
}

#[derive(Deserialize)]
struct HarborData {
    #[serde(default)]
    resources: Vec<HarborResource>,
    repository: HarborRepository,
}

#[derive(Deserialize)]
struct HarborResource {
    #[serde(default)]
    digest: String,
    #[serde(default)]
    tag: String,
}

#[derive(Deserialize)]
struct HarborRepository {
    #[serde(default)]
    repo_full_name: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
}

/// Parse a request body.
pub fn parse(body: &[u8]) -> Result<Parsed, EventError> {
    let value: serde_json::Value = serde_json::from_slice(body)?;
    let obj = value
        .as_object()
        .ok_or_else(|| EventError::Unknown("not a JSON object".into()))?;
    if obj.contains_key("events") {
        return parse_distribution(value);
    }
    match (
        obj.get("type").and_then(|t| t.as_str()),
        obj.contains_key("event_data"),
        obj.contains_key("specversion"),
    ) {
        (Some(kind), true, _) => parse_harbor(kind, &value["event_data"], "harbor"),
        (Some(kind), _, true) => parse_harbor(kind, &value["data"], "harbor-cloudevents"),
        _ => Err(EventError::Unknown(
            "no \"events\" array, no Harbor \"type\" with \"event_data\" or \"data\"".into(),
        )),
    }
}

fn parse_distribution(value: serde_json::Value) -> Result<Parsed, EventError> {
    let format = "distribution";
    let env: DistributionEnvelope =
        serde_json::from_value(value).map_err(|e| EventError::Malformed {
            format,
            why: e.to_string(),
        })?;
    let mut out = Parsed {
        format,
        ..Parsed::default()
    };
    for e in env.events {
        let t = e.target;
        let wanted = e.action == "push"
            && MANIFEST_TYPES.contains(&t.media_type.as_str())
            && !t.tag.is_empty()
            && !t.repository.is_empty();
        if !wanted {
            out.ignored += 1;
            continue;
        }
        out.pushes.push(PushEvent {
            repository: t.repository,
            tag: t.tag,
            digest: (!t.digest.is_empty()).then_some(t.digest),
        });
    }
    Ok(out)
}

fn parse_harbor(
    kind: &str,
    data: &serde_json::Value,
    format: &'static str,
) -> Result<Parsed, EventError> {
    let mut out = Parsed {
        format,
        ..Parsed::default()
    };
    // Harbor's own names for a push: `PUSH_ARTIFACT` (default payload) and
    // `harbor.artifact.pushed` (CloudEvents). Every other event (pulls, deletes, scans,
    // replication, quota) is not ours.
    if kind != "PUSH_ARTIFACT" && kind != "harbor.artifact.pushed" {
        out.ignored += 1;
        return Ok(out);
    }
    let data: HarborData =
        serde_json::from_value(data.clone()).map_err(|e| EventError::Malformed {
            format,
            why: e.to_string(),
        })?;
    let repo = &data.repository;
    let repository = if !repo.repo_full_name.is_empty() {
        repo.repo_full_name.clone()
    } else if !repo.namespace.is_empty() && !repo.name.is_empty() {
        format!("{}/{}", repo.namespace, repo.name)
    } else {
        return Err(EventError::Malformed {
            format,
            why: "the repository has no name".into(),
        });
    };
    for r in data.resources {
        if r.tag.is_empty() {
            out.ignored += 1;
            continue;
        }
        out.pushes.push(PushEvent {
            repository: repository.clone(),
            tag: r.tag,
            digest: (!r.digest.is_empty()).then_some(r.digest),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from Distribution 2.8 (`docker-registry`) after `skopeo copy` of one image:
    /// the blob push and the tagged manifest push, in one envelope.
    const DISTRIBUTION: &str = r#"{"events":[
      {"id":"1","timestamp":"2026-12-06T10:00:00Z","action":"push",
       "target":{"mediaType":"application/octet-stream","size":123,
                 "digest":"sha256:aaaa","length":123,"repository":"apps/web",
                 "url":"http://127.0.0.1:5000/v2/apps/web/blobs/sha256:aaaa"},
       "request":{"id":"r1","addr":"127.0.0.1:4242","host":"127.0.0.1:5000","method":"PUT",
                  "useragent":"skopeo"},"actor":{},"source":{"addr":"x:5000","instanceID":"i"}},
      {"id":"2","timestamp":"2026-12-06T10:00:01Z","action":"push",
       "target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","size":400,
                 "digest":"sha256:bbbb","length":400,"repository":"apps/web",
                 "url":"http://127.0.0.1:5000/v2/apps/web/manifests/sha256:bbbb",
                 "tag":"v1"},
       "request":{"id":"r2","addr":"127.0.0.1:4242","host":"127.0.0.1:5000","method":"PUT",
                  "useragent":"skopeo"},"actor":{},"source":{"addr":"x:5000","instanceID":"i"}},
      {"id":"3","timestamp":"2026-12-06T10:00:02Z","action":"pull",
       "target":{"mediaType":"application/vnd.oci.image.manifest.v1+json",
                 "digest":"sha256:bbbb","repository":"apps/web","tag":"v1"}}
    ]}"#;

    #[test]
    fn distribution_keeps_tagged_manifest_pushes_only() {
        let p = parse(DISTRIBUTION.as_bytes()).unwrap();
        assert_eq!(p.format, "distribution");
        assert_eq!(
            p.pushes,
            vec![PushEvent {
                repository: "apps/web".into(),
                tag: "v1".into(),
                digest: Some("sha256:bbbb".into()),
            }]
        );
        assert_eq!(p.ignored, 2);
    }

    #[test]
    fn untagged_manifest_push_is_ignored() {
        let body = r#"{"events":[{"action":"push","target":{
            "mediaType":"application/vnd.oci.image.manifest.v1+json",
            "digest":"sha256:cc","repository":"r"}}]}"#;
        let p = parse(body.as_bytes()).unwrap();
        assert!(p.pushes.is_empty());
        assert_eq!(p.ignored, 1);
    }

    #[test]
    fn harbor_default_and_cloudevents() {
        let default = r#"{"type":"PUSH_ARTIFACT","occur_at":1700000000,"operator":"admin",
            "event_data":{"resources":[{"digest":"sha256:dd","tag":"latest",
              "resource_url":"harbor.example.com/library/nginx:latest"}],
             "repository":{"date_created":1,"name":"nginx","namespace":"library",
              "repo_full_name":"library/nginx","repo_type":"private"}}}"#;
        let p = parse(default.as_bytes()).unwrap();
        assert_eq!(p.format, "harbor");
        assert_eq!(p.pushes[0].repository, "library/nginx");
        assert_eq!(p.pushes[0].tag, "latest");
        assert_eq!(p.pushes[0].digest.as_deref(), Some("sha256:dd"));

        let cloud = r#"{"specversion":"1.0","id":"x","source":"/projects/1/webhook/policies/1",
            "type":"harbor.artifact.pushed","datacontenttype":"application/json",
            "data":{"resources":[{"digest":"sha256:ee","tag":"v2"}],
             "repository":{"name":"api","namespace":"team"}}}"#;
        let p = parse(cloud.as_bytes()).unwrap();
        assert_eq!(p.format, "harbor-cloudevents");
        assert_eq!(p.pushes[0].repository, "team/api");
        assert_eq!(p.pushes[0].tag, "v2");

        let pull = r#"{"type":"PULL_ARTIFACT","event_data":{"repository":{"name":"a"}}}"#;
        let p = parse(pull.as_bytes()).unwrap();
        assert!(p.pushes.is_empty());
        assert_eq!(p.ignored, 1);
    }

    #[test]
    fn bad_bodies_are_errors_not_panics() {
        for body in [
            &b"not json"[..],
            b"[]",
            b"{}",
            b"{\"events\": 3}",
            b"{\"events\": [{\"target\": {}}]}",
            b"{\"type\": \"PUSH_ARTIFACT\", \"event_data\": {}}",
            b"{\"type\": \"PUSH_ARTIFACT\", \"event_data\": {\"repository\": {}}}",
        ] {
            assert!(parse(body).is_err(), "{}", String::from_utf8_lossy(body));
        }
    }
}
