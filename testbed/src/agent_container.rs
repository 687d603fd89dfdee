//! The agent run from its shipped image under containerd, with what the k3s manifest
//! grants and nothing more: its capabilities, read-only root, the runtime's default
//! seccomp profile, host network, its host mounts, its memory limit. Everything is
//! read from `k3s/merbridge-edge.yaml`; the test's own paths are mapped onto the
//! manifest's mounts.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::{containerd::Containerd, manifest::Manifest};

/// The environment variable that selects the runtime the testbed's agents run under:
/// `containerd` runs `run` from the image in a private containerd.
pub const RUNTIME_VAR: &str = "MERBRIDGE_EDGE_RUNTIME";

/// The agent's path in its image (the image's entrypoint; `args` follow it, as the
/// kubelet runs a container whose spec gives `args` and no `command`).
pub const ENTRYPOINT: &str = "/merbridge-edge";

/// Whether the testbed's agents run under containerd (`MERBRIDGE_EDGE_RUNTIME=containerd`).
pub fn under_containerd() -> bool {
    std::env::var(RUNTIME_VAR).as_deref() == Ok("containerd")
}

/// The per-architecture OCI archive `scripts/build-image` writes for this machine:
/// `dist/merbridge-edge-<version>-<arch>.tar`.
pub fn image_archive() -> PathBuf {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("no image is built for {other}"),
    };
    crate::dist::dist_dir().join(format!(
        "merbridge-edge-{}-{arch}.tar",
        env!("CARGO_PKG_VERSION")
    ))
}

/// Every Linux capability by name, in bit order (CAP_CHOWN = 0 … CAP_CHECKPOINT_RESTORE = 40).
pub const ALL_CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// One bind mount of the container.
#[derive(Clone, Debug, PartialEq)]
pub struct Mount {
    /// Host path.
    pub source: PathBuf,
    /// Path in the container.
    pub destination: PathBuf,
    /// Read-only.
    pub read_only: bool,
    /// Recursive (submounts included), as Kubernetes binds its hostPath volumes.
    pub recursive: bool,
    /// Later host mounts below it appear in the container (HostToContainer: rslave).
    pub host_to_container: bool,
    /// Why it is there: the manifest's volume, or the test-only stand-in it is.
    pub why: String,
}

impl Mount {
    /// The mount as `ctr run --mount` takes it.
    pub fn ctr_flag(&self) -> String {
        let mut options = vec![if self.recursive { "rbind" } else { "bind" }];
        options.push(if self.read_only { "ro" } else { "rw" });
        if self.host_to_container {
            options.push("rslave");
        }
        format!(
            "type=bind,src={},dst={},options={}",
            self.source.display(),
            self.destination.display(),
            options.join(":")
        )
    }
}

/// The container the agent runs in: the `ctr run` flags that grant it what the
/// manifest grants, its mounts, and its arguments with the test's paths mapped.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Flags for `ctr run` (security, network, memory), mounts excluded.
    pub flags: Vec<String>,
    /// The bind mounts.
    pub mounts: Vec<Mount>,
    /// The agent's arguments, paths as the container sees them.
    pub args: Vec<String>,
    /// Environment variables (the manifest's, where the test's environment has them).
    pub env: Vec<(String, String)>,
}

impl Plan {
    /// What `args` (the agent's arguments as a test gives them for a bare process)
    /// become inside the container the manifest describes.
    ///
    /// The manifest's path flags (`--cgroup-root`, `--bpffs`) name the container side of
    /// its host mounts. A test's value for such a flag is a host path: one below the
    /// mount's host path is mapped into the mount; any other stands in for the mount's
    /// host path (the test node's own bpffs stands in for the host's /sys/fs/bpf). Other
    /// absolute paths the test gives (a pods file, the kubelet stand-in's CA, token and
    /// client certificate) are test-only stand-ins for what reaches a real agent through
    /// the kubelet's API and the service-account volume: their directories are bound
    /// read-only at the same path, not recursively.
    pub fn new(manifest: &Manifest, args: &[&str]) -> Self {
        let container = manifest.agent_container();
        let pod = manifest.pod_spec();
        let sc = container
            .security_context
            .clone()
            .expect("the agent's securityContext");
        let mut flags = vec![];
        assert_eq!(sc.privileged, Some(false), "not privileged");
        if sc.read_only_root_filesystem == Some(true) {
            flags.push("--read-only".into());
        }
        let seccomp = sc.seccomp_profile.clone().map(|s| s.type_);
        assert_eq!(
            seccomp.as_deref(),
            Some("RuntimeDefault"),
            "the runtime's default seccomp profile"
        );
        flags.push("--seccomp".into());
        if sc.allow_privilege_escalation != Some(false) {
            // ctr sets no_new_privs unless told otherwise, as the manifest asks.
            flags.push("--allow-new-privs".into());
        }
        assert_eq!(sc.run_as_user, Some(0), "root in the host user namespace");
        let caps = sc.capabilities.clone().expect("capabilities");
        let drop = caps.drop.unwrap_or_default();
        assert_eq!(drop, ["ALL"], "every capability dropped first");
        let add: Vec<String> = caps.add.unwrap_or_default();
        for cap in &add {
            flags.extend(["--cap-add".into(), format!("CAP_{cap}")]);
        }
        // `ctr run --cap-drop CAP_ALL` drops nothing in containerd 1.6 (found here: the
        // task kept runc's default set), while the CRI plugin honours `drop: ["ALL"]`;
        // so every capability not added is dropped by name (ctr drops after adding).
        for cap in ALL_CAPABILITIES {
            if !add.iter().any(|a| a == cap) {
                flags.extend(["--cap-drop".into(), format!("CAP_{cap}")]);
            }
        }
        if pod.host_network == Some(true) {
            flags.push("--net-host".into());
        }
        if let Some(bytes) = manifest.memory_limit_bytes() {
            flags.extend(["--memory-limit".into(), bytes.to_string()]);
        }

        // The manifest's path flags and which mount each names.
        let manifest_args = container.args.clone().unwrap_or_default();
        let host_mounts = manifest.host_mounts();
        let mut mounts: Vec<Mount> = host_mounts
            .iter()
            .map(|m| Mount {
                source: m.host_path.clone(),
                destination: m.mount_path.clone(),
                read_only: m.read_only,
                recursive: true,
                host_to_container: m.host_to_container,
                why: format!("the manifest's volume {}", m.name),
            })
            .collect();
        let mut out: Vec<String> = vec![];
        let mut i = 0;
        while i < args.len() {
            let arg = args[i];
            out.push(arg.to_string());
            i += 1;
            let Some(&value) = args.get(i).filter(|v| v.starts_with('/')) else {
                continue;
            };
            let flag_mount = manifest_args
                .iter()
                .position(|a| a == arg)
                .and_then(|p| manifest_args.get(p + 1))
                .and_then(|dst| mounts.iter().position(|m| Path::new(dst) == m.destination));
            let host = Path::new(value);
            let mapped = match flag_mount {
                Some(m) => {
                    if let Ok(rest) = host.strip_prefix(&mounts[m].source) {
                        mounts[m].destination.join(rest)
                    } else {
                        mounts[m].why = format!(
                            "the manifest's volume {} ({} on the host), from the test node's {}",
                            host_mounts[m].name,
                            host_mounts[m].host_path.display(),
                            host.display()
                        );
                        mounts[m].source = host.to_path_buf();
                        mounts[m].destination.clone()
                    }
                }
                None => {
                    if !mounts.iter().any(|m| host.starts_with(&m.destination)) {
                        let dir = if host.is_dir() {
                            host
                        } else {
                            host.parent().unwrap_or(host)
                        };
                        mounts.push(Mount {
                            source: dir.to_path_buf(),
                            destination: dir.to_path_buf(),
                            read_only: true,
                            recursive: false,
                            host_to_container: false,
                            why: format!(
                                "test-only: {arg} {value} stands in for the kubelet's API or the service-account volume"
                            ),
                        });
                    }
                    host.to_path_buf()
                }
            };
            out.push(mapped.display().to_string());
            i += 1;
        }
        let env = container
            .env
            .unwrap_or_default()
            .into_iter()
            .filter_map(|e| Some((e.name.clone(), std::env::var(&e.name).ok()?)))
            .collect();
        Self {
            flags,
            mounts,
            args: out,
            env,
        }
    }

    /// Where the agent in the container sees the host path `host` (unchanged when no
    /// mount covers it).
    pub fn path_in_container(&self, host: &Path) -> PathBuf {
        self.mounts
            .iter()
            .find_map(|m| Some(m.destination.join(host.strip_prefix(&m.source).ok()?)))
            .unwrap_or_else(|| host.to_path_buf())
    }

    /// `ctr run --rm` of `image` as container `id` in `containerd`, with this plan's
    /// grants, mounts and arguments, in a cgroup below the instance's own parent;
    /// `extra` flags (a pid file) come before the image.
    pub fn ctr_run(
        &self,
        containerd: &Containerd,
        image: &str,
        id: &str,
        extra: &[&str],
    ) -> Command {
        let mut c = containerd.ctr();
        c.args(["run", "--rm"])
            .args(self.ctr_run_args())
            .args(containerd.ctr_run_private_flags())
            .arg("--cgroup")
            .arg(format!("{}/{id}", containerd.cgroup_parent))
            .args(extra)
            .args([image, id, ENTRYPOINT])
            .args(&self.args);
        c
    }

    /// Every argument of `ctr run` before the image name: flags, mounts, environment.
    pub fn ctr_run_args(&self) -> Vec<String> {
        let mut a = self.flags.clone();
        for m in &self.mounts {
            a.extend(["--mount".into(), m.ctr_flag()]);
        }
        for (k, v) in &self.env {
            a.extend(["--env".into(), format!("{k}={v}")]);
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_grants_what_the_manifest_grants_and_maps_the_test_paths() {
        let p = Plan::new(
            &Manifest::load(),
            &[
                "run",
                "--cgroup-root",
                "/sys/fs/cgroup/unified/mbe-test-1",
                "--bpffs",
                "/tmp/mbe-test-1/bpffs",
                "--pods-file",
                "/tmp/mbe-test-1/pods.json",
                "--interval",
                "200ms",
            ],
        );
        assert_eq!(
            p.args,
            [
                "run",
                "--cgroup-root",
                "/host/sys/fs/cgroup/unified/mbe-test-1",
                "--bpffs",
                "/host/sys/fs/bpf",
                "--pods-file",
                "/tmp/mbe-test-1/pods.json",
                "--interval",
                "200ms"
            ]
        );
        let flags = p.flags.join(" ");
        assert!(
            flags.starts_with(
                "--read-only --seccomp --cap-add CAP_BPF --cap-add CAP_NET_ADMIN \
                 --cap-add CAP_PERFMON --cap-drop CAP_CHOWN --cap-drop CAP_DAC_OVERRIDE "
            ),
            "{flags}"
        );
        assert!(
            flags.ends_with("--cap-drop CAP_CHECKPOINT_RESTORE --net-host --memory-limit 67108864"),
            "{flags}"
        );
        let dropped = p.flags.iter().filter(|f| *f == "--cap-drop").count();
        assert_eq!(dropped, ALL_CAPABILITIES.len() - 3, "{flags}");
        let mounts: Vec<String> = p.mounts.iter().map(Mount::ctr_flag).collect();
        assert_eq!(
            mounts,
            [
                "type=bind,src=/sys/fs/cgroup,dst=/host/sys/fs/cgroup,options=rbind:ro",
                "type=bind,src=/tmp/mbe-test-1/bpffs,dst=/host/sys/fs/bpf,options=rbind:rw",
                "type=bind,src=/var/run/netns,dst=/var/run/netns,options=rbind:ro:rslave",
                "type=bind,src=/tmp/mbe-test-1,dst=/tmp/mbe-test-1,options=bind:ro",
            ]
        );
        assert_eq!(
            p.path_in_container(Path::new("/sys/fs/cgroup/unified")),
            Path::new("/host/sys/fs/cgroup/unified")
        );
    }
}
