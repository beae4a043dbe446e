//! Rules for names that come from clients.

use crate::error::Error;

/// Longest collection name, in characters.
pub const MAX_COLLECTION_LEN: usize = 128;
/// Longest document id or client id, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// A collection: 1-128 characters of `[A-Za-z0-9_.-]`.
pub fn collection(field: impl std::fmt::Display, name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= MAX_COLLECTION_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("collection must be 1-{MAX_COLLECTION_LEN} characters of [A-Za-z0-9_.-]"),
        ))
    }
}

/// A document id: 1-256 bytes, no control characters.
pub fn id(field: impl std::fmt::Display, id: &str) -> Result<(), Error> {
    if id.is_empty() || id.len() > MAX_ID_BYTES || id.chars().any(char::is_control) {
        return Err(Error::invalid(
            field,
            format!("id must be 1-{MAX_ID_BYTES} bytes without control characters"),
        ));
    }
    Ok(())
}

/// A client id: empty (anonymous) or up to 256 bytes, no control characters.
pub fn client_id(client_id: &str) -> Result<(), Error> {
    if client_id.len() > MAX_ID_BYTES || client_id.chars().any(char::is_control) {
        return Err(Error::invalid(
            "client_id",
            format!("must be at most {MAX_ID_BYTES} bytes without control characters"),
        ));
    }
    Ok(())
}

/// A collections filter: each one a valid collection name.
pub fn collections(names: &[String]) -> Result<(), Error> {
    names
        .iter()
        .enumerate()
        .try_for_each(|(i, name)| collection(format_args!("collections[{i}]"), name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(collection("c", "todos.v2_a-b").is_ok());
        for bad in ["", "a b", "ä", &"x".repeat(129)] {
            assert!(collection("c", bad).is_err(), "{bad:?}");
        }
        assert!(id("i", "any thing/ü").is_ok());
        for bad in ["", "a\nb", &"x".repeat(257)] {
            assert!(id("i", bad).is_err(), "{bad:?}");
        }
    }
}
