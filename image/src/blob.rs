//! Content-addressed blobs and the OCI descriptors that point at them.
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// A blob of an OCI layout: its bytes and `sha256:<hex>` digest.
pub struct Blob {
    /// The blob's content.
    pub bytes: Vec<u8>,
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
}

impl Blob {
    /// A blob holding `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        let digest = sha256_digest(&bytes);
        Self { bytes, digest }
    }

    /// A blob holding `doc` as compact JSON (keys sorted, so the bytes are reproducible).
    pub fn json(doc: &Value) -> Self {
        Self::new(serde_json::to_vec(doc).expect("a JSON value serializes"))
    }

    /// The hex part of the digest: the blob's file name under `blobs/sha256/`.
    pub fn hex(&self) -> &str {
        self.digest.trim_start_matches("sha256:")
    }

    /// A descriptor of this blob with `media_type`.
    pub fn descriptor(&self, media_type: &str) -> Value {
        json!({ "mediaType": media_type, "digest": self.digest, "size": self.bytes.len() })
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_the_sha256_of_the_bytes() {
        // sha256("abc") from FIPS 180-2.
        assert_eq!(
            Blob::new(b"abc".to_vec()).digest,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn json_blobs_do_not_depend_on_key_order() {
        let a = Blob::json(&json!({"b": 1, "a": 2}));
        let b = Blob::json(&json!({"a": 2, "b": 1}));
        assert_eq!(a.digest, b.digest);
        assert_eq!(a.bytes, br#"{"a":2,"b":1}"#);
    }
}
