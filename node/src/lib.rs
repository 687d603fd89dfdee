//! The Merbridge Edge node agent as a library: everything the `merbridge-edge` binary
//! (`src/main.rs`, the command line) runs. It exists so that the pure input handling
//! can be fuzzed from `node/fuzz/`: the kubelet PodList parser ([`podlist`]), the
//! PodList → policy step ([`policy`]), the annotation parsers ([`annotations`]) and the
//! map entries built from a policy ([`sync`]). It is not a stable API.
pub mod annotations;
mod cgroup_watch;
mod cgroups;
pub mod check;
pub mod cleanup;
pub mod datapath;
mod files;
pub mod kubelet;
mod memory;
pub mod mesh;
pub mod metrics;
mod mountinfo;
pub mod pod_netns;
pub mod podlist;
pub mod policy;
pub mod run;
pub mod sockhash_pin;
pub mod source;
pub mod status;
pub mod sync;
pub mod tcp_memory;
pub mod warnings;
