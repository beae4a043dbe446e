//! Bearer tokens: made at random, kept only as their SHA-256.

use sha2::{Digest, Sha256};

/// Random bytes in a new token: 256 bits.
const TOKEN_BYTES: usize = 32;

/// A new random token (64 lowercase hex characters, URL-safe) from the
/// operating system's generator.
pub fn new() -> Result<String, String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness from the system: {e}"))?;
    Ok(hex(&bytes))
}

/// The SHA-256 of a token.
pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// How the auth file writes a token's hash: `sha256:<64 lowercase hex>`.
pub fn hash_string(token: &str) -> String {
    format!("sha256:{}", hex(&hash(token)))
}

/// Reads `sha256:<64 lowercase hex digits>`.
pub fn parse_hash(text: &str) -> Result<[u8; 32], String> {
    let bad = || {
        format!(
            "token `{text}` is not `sha256:` and 64 lowercase hex digits (the hash, never the token)"
        )
    };
    let digits = text.strip_prefix("sha256:").ok_or_else(bad)?;
    if digits.len() != 64
        || !digits
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rule: a new token is 256 random bits, and its printed hash reads
    /// back as the hash of the token.
    #[test]
    fn tokens_and_hashes() {
        let (a, b) = (new().unwrap(), new().unwrap());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert_eq!(parse_hash(&hash_string(&a)).unwrap(), hash(&a));
        // SHA-256("abc"), a published test vector.
        assert_eq!(
            hash_string("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        for bad in ["abc", "sha256:ABC", &format!("sha256:{}", "A".repeat(64))] {
            assert!(parse_hash(bad).is_err(), "{bad}");
        }
    }
}
