//! osd: filled by a later issue.
pub mod heartbeat;
