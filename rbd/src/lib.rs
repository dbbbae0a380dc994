//! rbd: filled by a later issue.
