//! messenger
