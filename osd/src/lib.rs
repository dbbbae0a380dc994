//! osd: filled by a later issue.
