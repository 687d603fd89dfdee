//! OCI image layouts: as a directory (for skopeo, umoci, registries) and as a tar
//! archive (what k3s imports from its `agent/images/` folder).
use std::{fs, path::Path};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{
    blob::Blob,
    layer::{TarFile, reproducible_tar},
};

const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// The files of a layout holding `blobs` with `index` as its `index.json`, each blob
/// once, sorted by path.
fn layout_files<'a>(blobs: &[&'a Blob], index: &'a [u8]) -> Vec<(String, &'a [u8])> {
    let mut files: Vec<(String, &[u8])> = vec![
        ("oci-layout".into(), OCI_LAYOUT),
        ("index.json".into(), index),
    ];
    for blob in blobs {
        let path = format!("blobs/sha256/{}", blob.hex());
        if !files.iter().any(|(p, _)| *p == path) {
            files.push((path, &blob.bytes));
        }
    }
    files.sort();
    files
}

fn index_bytes(index: &Value) -> Vec<u8> {
    serde_json::to_vec(index).expect("a JSON value serializes")
}

/// Writes the layout to `dir`, replacing whatever was there (stale blobs included).
pub fn write_dir(dir: &Path, blobs: &[&Blob], index: &Value) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing the old {}", dir.display()))?;
    }
    let index = index_bytes(index);
    for (path, bytes) in layout_files(blobs, &index) {
        let path = dir.join(path);
        fs::create_dir_all(path.parent().unwrap())
            .with_context(|| format!("creating {}", path.parent().unwrap().display()))?;
        fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The layout as a reproducible tar archive (entries dated `mtime`).
pub fn tar_archive(blobs: &[&Blob], index: &Value, mtime: u64) -> Result<Vec<u8>> {
    let index = index_bytes(index);
    let files = layout_files(blobs, &index);
    let entries: Vec<TarFile> = files
        .iter()
        .map(|(path, bytes)| TarFile {
            path,
            mode: 0o644,
            bytes,
        })
        .collect();
    reproducible_tar(&entries, mtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_holds_the_layout_files_each_blob_once() {
        let a = Blob::new(b"a".to_vec());
        let b = Blob::new(b"b".to_vec());
        let index = serde_json::json!({"schemaVersion": 2});
        let tar_bytes = tar_archive(&[&a, &b, &a], &index, 0).unwrap();
        let mut archive = tar::Archive::new(&tar_bytes[..]);
        let paths: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        let mut want = vec![
            "blobs/".to_string(),
            "blobs/sha256/".into(),
            format!("blobs/sha256/{}", a.hex()),
            format!("blobs/sha256/{}", b.hex()),
            "index.json".into(),
            "oci-layout".into(),
        ];
        want[2..4].sort();
        assert_eq!(paths, want);
    }

    #[test]
    fn writing_a_directory_drops_stale_blobs() {
        let dir = std::env::temp_dir().join(format!("mbe-image-layout-{}", std::process::id()));
        let old = Blob::new(b"old".to_vec());
        let new = Blob::new(b"new".to_vec());
        let index = serde_json::json!({"schemaVersion": 2});
        write_dir(&dir, &[&old], &index).unwrap();
        write_dir(&dir, &[&new], &index).unwrap();
        assert!(dir.join("blobs/sha256").join(new.hex()).exists());
        assert!(!dir.join("blobs/sha256").join(old.hex()).exists());
        assert_eq!(fs::read(dir.join("oci-layout")).unwrap(), OCI_LAYOUT);
        fs::remove_dir_all(&dir).unwrap();
    }
}
