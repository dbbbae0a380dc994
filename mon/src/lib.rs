//! mon: filled by a later issue.
