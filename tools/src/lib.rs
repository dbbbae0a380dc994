//! tools: binaries only; filled by later issues.
