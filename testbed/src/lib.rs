//! A Kubernetes node in miniature, for testing Merbridge Edge on the real kernel:
//! pods are network namespaces on a bridge, containers are cgroups in the kubelet's
//! layout, and processes are started inside both. Everything made is removed on drop,
//! also when a test fails.
pub mod agent;
pub mod agent_container;
pub mod churn;
pub mod containerd;
pub mod dist;
pub mod fixture;
pub mod iptables;
pub mod kubelet_standin;
pub mod manifest;
pub mod maps;
pub mod node;
pub mod podlist;
pub mod proc;
pub mod runtime_pods;

pub use node::{Node, Pod, PodSpec};
