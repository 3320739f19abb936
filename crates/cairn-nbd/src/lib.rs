//! Cairn's NBD server: every volume head is a read-write export `NAME`, every checkpoint a
//! read-only export `NAME@CHECKPOINT`, so QEMU, `qemu-img`, `qemu-io`, libnbd's tools and the Linux
//! kernel can use them as disks.
//!
//! [`proto`] is the wire format (pure parsers and encoders, fuzzed); [`server`] runs the
//! negotiation and transmission phases over any byte stream on top of the engine's `Store`, plus
//! what the layers above attach: read-only images served from elsewhere, and volumes still being
//! filled ([`Backfill`]).

pub mod proto;
pub mod server;
pub mod tls;

pub use server::{
    Backfill, ClientInfo, Fence, ImageSource, Server, ServerConfig, ALLOCATION_CONTEXT,
    CHANGED_CONTEXT,
};
