//! rados: filled by a later issue.
