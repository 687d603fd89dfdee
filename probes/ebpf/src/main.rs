//! Merbridge Edge eBPF programs: one module per hook, maps in `maps`; what several hooks
//! share in its own module (`redirect`, `inbound`, `addr`, `pods`, `rules`, `netns`).
#![no_std]
#![no_main]
// Atomic add on map values (the BPF target has no core::sync::atomic RMW).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod addr;
mod bind;
mod connect;
mod dns;
mod getsockopt;
mod inbound;
mod maps;
mod netns;
mod release;
mod pods;
mod redirect;
mod rules;
mod sk_lookup;
mod sk_msg;
mod sockops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Licence section the kernel reads to allow GPL-only helpers (sockmap, cookies).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
