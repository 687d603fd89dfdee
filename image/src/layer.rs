//! The image's single layer: a tar holding the agent binary, gzip-compressed, with
//! nothing that varies between builds (fixed mtime, uid/gid 0, no user names).
use std::io::Write;

use anyhow::{Context, Result};
use flate2::{Compression, GzBuilder};

/// One file of a tar archive.
pub struct TarFile<'a> {
    /// Path inside the archive (no leading `/`).
    pub path: &'a str,
    /// Permission bits.
    pub mode: u32,
    /// Content.
    pub bytes: &'a [u8],
}

/// A reproducible ustar archive of `files` and the directories they need, sorted by
/// path, every entry owned by 0:0 with modification time `mtime`.
pub fn reproducible_tar(files: &[TarFile], mtime: u64) -> Result<Vec<u8>> {
    let mut entries: Vec<(String, Option<&TarFile>)> = Vec::new();
    for file in files {
        let mut dir = String::new();
        for part in file
            .path
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .unwrap()
            .1
        {
            dir.push_str(part);
            dir.push('/');
            if !entries.iter().any(|(p, _)| *p == dir) {
                entries.push((dir.clone(), None));
            }
        }
        entries.push((file.path.to_string(), Some(file)));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));

    let mut builder = tar::Builder::new(Vec::new());
    for (path, file) in entries {
        let mut header = tar::Header::new_ustar();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(mtime);
        match file {
            Some(file) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(file.mode);
                header.set_size(file.bytes.len() as u64);
                builder
                    .append_data(&mut header, &path, file.bytes)
                    .with_context(|| format!("adding {path} to the tar"))?;
            }
            None => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                builder
                    .append_data(&mut header, &path, std::io::empty())
                    .with_context(|| format!("adding {path} to the tar"))?;
            }
        }
    }
    builder.into_inner().context("finishing the tar")
}

/// `bytes` gzip-compressed with no name and a zero timestamp in the header.
pub fn reproducible_gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut encoder = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::best());
    encoder.write_all(bytes).context("compressing the layer")?;
    encoder.finish().context("compressing the layer")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(tar_bytes: &[u8]) -> Vec<(String, u32, u64, u64, u64)> {
        let mut archive = tar::Archive::new(tar_bytes);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    h.gid().unwrap(),
                    h.mtime().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn tar_is_sorted_owned_by_root_dated_and_has_parent_directories() {
        let files = [
            TarFile {
                path: "z",
                mode: 0o644,
                bytes: b"z",
            },
            TarFile {
                path: "a/b/c",
                mode: 0o755,
                bytes: b"c",
            },
        ];
        let bytes = reproducible_tar(&files, 1_700_000_000).unwrap();
        assert_eq!(
            entries(&bytes),
            vec![
                ("a/".into(), 0o755, 0, 0, 1_700_000_000),
                ("a/b/".into(), 0o755, 0, 0, 1_700_000_000),
                ("a/b/c".into(), 0o755, 0, 0, 1_700_000_000),
                ("z".into(), 0o644, 0, 0, 1_700_000_000),
            ]
        );
        assert_eq!(bytes, reproducible_tar(&files, 1_700_000_000).unwrap());
    }

    #[test]
    fn gzip_is_the_same_every_time_and_round_trips() {
        let data = vec![7u8; 100_000];
        let a = reproducible_gzip(&data).unwrap();
        assert_eq!(a, reproducible_gzip(&data).unwrap());
        assert_eq!(&a[4..8], &[0, 0, 0, 0], "no timestamp in the gzip header");
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&a[..]), &mut out).unwrap();
        assert_eq!(out, data);
    }
}
