//! Container and pod identity read from a cgroup path.
//!
//! Container runtimes and the kubelet name cgroups after what runs in them; that name is
//! all a node agent can know without asking the runtime or the API server (which a guard
//! that must work while the machine is drowning should not depend on). Recognised, with
//! either cgroup driver:
//!
//! - Kubernetes: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice/…`
//!   (systemd driver, the uid's `-` written `_`) and `kubepods/<qos>/pod<uid>/<id>`
//!   (cgroupfs driver); Guaranteed pods sit directly under `kubepods`.
//! - Container scopes: `docker-<id>.scope`, `cri-containerd-<id>.scope`,
//!   `crio-<id>.scope`, `libpod-<id>.scope` (podman), and the cgroupfs driver's bare
//!   64-hex-digit directory (under a pod, or under `/docker/`). The runtimes' monitor
//!   processes (`crio-conmon-…`, `libpod-conmon-…`) are not containers.
//!
//! A cgroup below a container (`…/cri-containerd-<id>.scope/init.scope`) carries its
//! container's identity; the last container and pod on the path win. The `QoS` class is a
//! pod's: the kubelet's `QoS` parent slices themselves have none.
use serde::{Deserialize, Serialize};

/// Who a cgroup belongs to. Every field is optional: a system service has none.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// `docker`, `containerd`, `cri-o`, `podman`, or `kubernetes` when only the kubelet's
    /// own layout says so (cgroupfs driver: the runtime does not name its directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// The container id (64 hex digits as the runtime prints it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The pod's UID, with dashes (as `kubectl get pod -o jsonpath={.metadata.uid}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// `guaranteed`, `burstable` or `besteffort`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos_class: Option<String>,
}

impl Identity {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Short text for tables and notifications: `pod 7c1a…/containerd 3f2e1d0c9b8a`.
    #[must_use]
    pub fn short(&self) -> String {
        let mut parts = Vec::new();
        if let Some(p) = &self.pod_uid {
            parts.push(format!("pod {p}"));
        }
        if let Some(c) = &self.container_id {
            let rt = self.runtime.as_deref().unwrap_or("container");
            parts.push(format!("{rt} {}", &c[..c.len().min(12)]));
        }
        parts.join(" / ")
    }

    /// `(label, value)` pairs for metrics, events and notifications.
    #[must_use]
    pub fn labels(&self) -> Vec<(&'static str, String)> {
        [
            ("runtime", &self.runtime),
            ("container_id", &self.container_id),
            ("pod_uid", &self.pod_uid),
            ("qos_class", &self.qos_class),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
        .collect()
    }
}

fn is_hex_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `<prefix><64 hex>.scope` → the id.
fn scope_id<'a>(component: &'a str, prefix: &str) -> Option<&'a str> {
    component
        .strip_prefix(prefix)?
        .strip_suffix(".scope")
        .filter(|id| is_hex_id(id))
}

const SCOPES: [(&str, &str); 4] = [
    ("docker-", "docker"),
    ("cri-containerd-", "containerd"),
    ("crio-", "cri-o"),
    ("libpod-", "podman"),
];

const QOS: [&str; 2] = ["burstable", "besteffort"];

/// A pod uid as the kubelet writes it in a component: `pod<uid>` (cgroupfs) or
/// `…-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid(component: &str) -> Option<String> {
    let rest = component.strip_suffix(".slice").unwrap_or(component);
    let at = rest.rfind("pod")?;
    // systemd names: the `pod` follows a dash (`kubepods-burstable-pod…`); cgroupfs
    // names start with it.
    if at != 0 && !rest[..at].ends_with('-') {
        return None;
    }
    let uid = rest[at + 3..].replace('_', "-");
    let hex_and_dashes = uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    (uid.len() == 36 && hex_and_dashes && uid.matches('-').count() == 4).then_some(uid)
}

/// The identity of the cgroup at `path` (relative to the cgroup v2 root, `/`-led).
#[must_use]
pub fn of(path: &str) -> Identity {
    let mut id = Identity::default();
    let mut in_kubepods = false;
    let mut parent_is_docker = false;
    for (depth, c) in path.split('/').filter(|c| !c.is_empty()).enumerate() {
        // The kubelet's tree starts at the top (or one level down, under a
        // `--cgroup-root` such as kind's kubelet.slice): a `kubepods…` directory deeper
        // down is somebody's lookalike (a user can make one in a subtree of theirs).
        let kubepods_component = (in_kubepods || depth <= 1)
            && (c == "kubepods"
                || c.starts_with("kubepods.")
                || c.starts_with("kubepods-")
                || c.starts_with("kubelet-kubepods"));
        if kubepods_component {
            in_kubepods = true;
            id.qos_class.get_or_insert_with(|| "guaranteed".into());
            for q in QOS {
                if c.contains(&format!("-{q}")) {
                    id.qos_class = Some(q.into());
                }
            }
        } else if in_kubepods && QOS.contains(&c) {
            id.qos_class = Some(c.into());
        }
        if in_kubepods && let Some(uid) = pod_uid(c) {
            id.pod_uid = Some(uid);
            id.container_id = None;
        }
        if let Some((cid, rt)) = SCOPES
            .iter()
            .find_map(|(prefix, rt)| scope_id(c, prefix).map(|cid| (cid, *rt)))
        {
            id.container_id = Some(cid.into());
            id.runtime = Some(rt.into());
        } else if is_hex_id(c) && (id.pod_uid.is_some() || parent_is_docker) {
            // cgroupfs driver: a bare id under a pod or under /docker.
            id.container_id = Some(c.into());
            id.runtime = Some(
                if parent_is_docker {
                    "docker"
                } else {
                    "kubernetes"
                }
                .into(),
            );
        }
        parent_is_docker = c == "docker";
    }
    // A QoS class belongs to pods: the kubelet's QoS parents (`kubepods.slice`,
    // `kubepods-besteffort.slice`) hold every pod of their class and are no pod
    // themselves. Giving them the class let a `qos_class` rule act on all those pods at
    // once.
    if id.pod_uid.is_none() {
        id.qos_class = None;
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "3f2e1d0c9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e";
    const UID: &str = "7c1a5f2e-3b4d-4c5e-9f6a-1b2c3d4e5f60";

    fn id(runtime: Option<&str>, cid: bool, pod: bool, qos: Option<&str>) -> Identity {
        Identity {
            runtime: runtime.map(Into::into),
            container_id: cid.then(|| CID.into()),
            pod_uid: pod.then(|| UID.into()),
            qos_class: qos.map(Into::into),
        }
    }

    /// Paths as they appear on real nodes (kubelet with the systemd and the cgroupfs
    /// driver, containerd, CRI-O, Docker, podman rootful and rootless, kind).
    #[test]
    fn real_world_paths() {
        let u = UID.replace('-', "_");
        let cases: Vec<(String, Identity)> = vec![
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{CID}.scope"
                ),
                id(Some("containerd"), true, true, Some("burstable")),
            ),
            (
                format!("/kubepods.slice/kubepods-pod{u}.slice/crio-{CID}.scope"),
                id(Some("cri-o"), true, true, Some("guaranteed")),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice"
                ),
                id(None, false, true, Some("besteffort")),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/crio-conmon-{CID}.scope"
                ),
                id(None, false, true, Some("burstable")),
            ),
            (
                format!("/kubepods/burstable/pod{UID}/{CID}"),
                id(Some("kubernetes"), true, true, Some("burstable")),
            ),
            (
                format!("/kubepods/pod{UID}/{CID}"),
                id(Some("kubernetes"), true, true, Some("guaranteed")),
            ),
            (
                format!(
                    "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope"
                ),
                id(Some("containerd"), true, true, Some("besteffort")),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{CID}.scope/init.scope"
                ),
                id(Some("containerd"), true, true, Some("burstable")),
            ),
            (
                format!("/system.slice/docker-{CID}.scope"),
                id(Some("docker"), true, false, None),
            ),
            (
                format!("/docker/{CID}"),
                id(Some("docker"), true, false, None),
            ),
            (
                format!("/machine.slice/libpod-{CID}.scope"),
                id(Some("podman"), true, false, None),
            ),
            (
                format!(
                    "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope/container"
                ),
                id(Some("podman"), true, false, None),
            ),
            (
                format!("/machine.slice/libpod-conmon-{CID}.scope"),
                Identity::default(),
            ),
            // The kubelet's QoS parents are no pod: a `qos_class` rule must match the
            // pods of that class, never the slice that holds them all.
            ("/kubepods.slice".into(), Identity::default()),
            (
                "/kubepods.slice/kubepods-burstable.slice".into(),
                Identity::default(),
            ),
            (
                "/kubepods.slice/kubepods-besteffort.slice".into(),
                Identity::default(),
            ),
            ("/kubepods/besteffort".into(), Identity::default()),
        ];
        for (path, want) in cases {
            assert_eq!(of(&path), want, "{path}");
        }
    }

    /// Lookalikes are nobody's container.
    #[test]
    fn lookalikes_are_not_containers() {
        for path in [
            "/",
            "/system.slice/docker.service",
            "/system.slice/containerd.service",
            "/user.slice/user-1000.slice/session-2.scope",
            "/system.slice/docker-abc.scope",
            &format!("/system.slice/{CID}"),
            &format!("/system.slice/docker-{CID}.service"),
            "/system.slice/spod7c1a5f2e_3b4d_4c5e_9f6a_1b2c3d4e5f60.slice",
            &format!("/podman/pod{UID}"),
            // A user's lookalike pod, deep in their own subtree.
            &format!(
                "/user.slice/user-1000.slice/user@1000.service/kubepods.slice/kubepods-pod{}.slice",
                UID.replace('-', "_")
            ),
        ] {
            assert!(of(path).is_empty(), "{path}: {:?}", of(path));
        }
    }

    #[test]
    fn labels_and_short_text() {
        let i = id(Some("containerd"), true, true, Some("burstable"));
        assert_eq!(
            i.labels(),
            vec![
                ("runtime", "containerd".to_owned()),
                ("container_id", CID.to_owned()),
                ("pod_uid", UID.to_owned()),
                ("qos_class", "burstable".to_owned()),
            ]
        );
        assert_eq!(i.short(), format!("pod {UID} / containerd 3f2e1d0c9b8a"));
        assert!(Identity::default().labels().is_empty());
    }
}
