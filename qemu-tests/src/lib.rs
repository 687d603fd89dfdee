//! qemu-tests: boots Debian's ARM64 and x86_64 kernels under qemu (TCG) with an
//! initramfs holding the static agent and an in-VM test driver, and proves the
//! datapath there: the probes pass the verifier, traffic is redirected, nothing stays
//! attached after the agent stops.
//!
//! The host side lives here (one concern per module); the in-VM driver is the
//! `mbe-vm-test` binary, and both speak [`protocol`] over the serial console.
pub mod initramfs;
pub mod kernels;
pub mod newc;
pub mod protocol;
pub mod qemu;
pub mod report;
