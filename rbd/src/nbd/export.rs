//! What a server offers: the exports a client may pick during option haggling.

use super::error::CatalogError;

/// The spec's limit on any string (export names, descriptions): "MUST be no longer than 4096 bytes".
pub const STRING_BYTES_MAX: usize = 4096;

/// One export as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub size_bytes: u64,
    /// Advertised with `NBD_FLAG_READ_ONLY`; writes, trims and zeroing are refused with `EPERM`.
    pub read_only: bool,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`: only when a flush or FUA acknowledged on one connection is
    /// visible to reads on every other connection to the same export (true for librbd without a
    /// writeback cache; the caller knows which it runs).
    pub can_multi_conn: bool,
    /// Shown to humans by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`; may be empty.
    pub description: String,
}

/// The validated, immutable list of exports. Shared by every session of a server (`Arc`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportCatalog {
    exports: Vec<ExportInfo>,
}

impl ExportCatalog {
    /// Checks what the spec requires of strings (at most 4096 bytes, no NUL) and that names are unique.
    /// Order matters: `NBD_OPT_LIST` reports exports in this order, and the first one is the default
    /// export that an empty name selects.
    pub fn new(exports: Vec<ExportInfo>) -> Result<Self, CatalogError> {
        for (i, export) in exports.iter().enumerate() {
            let name = || export.name.clone();
            if export.name.len() > STRING_BYTES_MAX {
                return Err(CatalogError::NameTooLong { name: name(), max: STRING_BYTES_MAX });
            }
            if export.name.contains('\0') {
                return Err(CatalogError::NameHasNul { name: name() });
            }
            if export.description.len() > STRING_BYTES_MAX {
                return Err(CatalogError::DescriptionTooLong { name: name(), max: STRING_BYTES_MAX });
            }
            if export.description.contains('\0') {
                return Err(CatalogError::DescriptionHasNul { name: name() });
            }
            if exports[..i].iter().any(|other| other.name == export.name) {
                return Err(CatalogError::DuplicateName { name: name() });
            }
        }
        Ok(ExportCatalog { exports })
    }

    pub fn exports(&self) -> &[ExportInfo] {
        &self.exports
    }

    /// The export a client's name selects: an exact byte match, or for the empty name (the spec's
    /// "default" export) the first export when none is literally named "".
    pub fn find(&self, name: &[u8]) -> Option<&ExportInfo> {
        let exact = self.exports.iter().find(|e| e.name.as_bytes() == name);
        if exact.is_none() && name.is_empty() {
            return self.exports.first();
        }
        exact
    }
}
