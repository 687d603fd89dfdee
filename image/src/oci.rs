//! The OCI documents of the image: per-architecture config and manifest, the
//! multi-architecture image index, and a layout's `index.json`.
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Result;
use serde_json::{Value, json};

use crate::{
    blob::{Blob, sha256_digest},
    layer::{TarFile, reproducible_gzip, reproducible_tar},
};

/// Media type of an image index.
pub const INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an image manifest.
pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an image config.
pub const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of a gzip-compressed layer.
pub const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Where the binary sits in the image, and so the entrypoint.
pub const BINARY_PATH: &str = "/merbridge-edge";

/// What every architecture's image shares.
pub struct ImageMeta {
    /// Repository name, e.g. `ghcr.io/merbridge-edge/merbridge-edge`.
    pub name: String,
    /// Tag, e.g. the crate version.
    pub tag: String,
    /// Build time in seconds since the epoch (the commit's time, for reproducibility).
    pub created: u64,
    /// Source revision (git commit), recorded as a label when known.
    pub revision: Option<String>,
}

impl ImageMeta {
    /// `name:tag`.
    pub fn reference(&self) -> String {
        format!("{}:{}", self.name, self.tag)
    }

    fn created_rfc3339(&self) -> String {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(self.created))
            .to_string()
    }
}

/// An OCI platform this project builds for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// linux/amd64 (x86_64).
    Amd64,
    /// linux/arm64/v8 (aarch64).
    Arm64,
}

impl Arch {
    /// Parses `amd64` or `arm64`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "amd64" => Ok(Self::Amd64),
            "arm64" => Ok(Self::Arm64),
            other => Err(format!(
                "unknown architecture '{other}' (expected amd64 or arm64)"
            )),
        }
    }

    /// The OCI `architecture` value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Amd64 => "amd64",
            Self::Arm64 => "arm64",
        }
    }

    /// The OCI platform object (arm64 carries variant v8).
    pub fn platform(self) -> Value {
        match self {
            Self::Amd64 => json!({ "architecture": "amd64", "os": "linux" }),
            Self::Arm64 => json!({ "architecture": "arm64", "os": "linux", "variant": "v8" }),
        }
    }
}

/// One architecture's image: the blobs its manifest names, and the manifest.
pub struct ArchImage {
    /// Its platform.
    pub arch: Arch,
    /// The gzip layer holding the binary.
    pub layer: Blob,
    /// The image config.
    pub config: Blob,
    /// The image manifest.
    pub manifest: Blob,
}

impl ArchImage {
    /// Builds the image of `binary` (a static `merbridge-edge` for `arch`).
    pub fn build(meta: &ImageMeta, arch: Arch, binary: &[u8]) -> Result<Self> {
        let tar = reproducible_tar(
            &[TarFile {
                path: BINARY_PATH.trim_start_matches('/'),
                mode: 0o755,
                bytes: binary,
            }],
            meta.created,
        )?;
        let diff_id = sha256_digest(&tar);
        let layer = Blob::new(reproducible_gzip(&tar)?);
        let created = meta.created_rfc3339();

        let mut labels = json!({
            "org.opencontainers.image.title": "merbridge-edge",
            "org.opencontainers.image.description":
                "Merbridge Edge node agent: eBPF traffic interception for service meshes",
            "org.opencontainers.image.version": meta.tag,
            "org.opencontainers.image.licenses": "Apache-2.0",
            "org.opencontainers.image.created": created,
        });
        if let Some(rev) = &meta.revision {
            labels["org.opencontainers.image.revision"] = json!(rev);
        }
        let mut config = arch.platform();
        config["created"] = json!(created);
        config["config"] = json!({
            "Entrypoint": [BINARY_PATH],
            "Cmd": ["run"],
            "WorkingDir": "/",
            "Labels": labels,
        });
        config["rootfs"] = json!({ "type": "layers", "diff_ids": [diff_id] });
        config["history"] = json!([{
            "created": created,
            "created_by": format!("mbe-image: {BINARY_PATH} (static, {})", arch.name()),
        }]);
        let config = Blob::json(&config);

        let manifest = Blob::json(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": config.descriptor(CONFIG),
            "layers": [layer.descriptor(LAYER_GZIP)],
            "annotations": {
                "org.opencontainers.image.created": created,
                "org.opencontainers.image.version": meta.tag,
            },
        }));
        Ok(Self {
            arch,
            layer,
            config,
            manifest,
        })
    }

    /// The manifest's descriptor with its platform, as an image index lists it.
    pub fn platform_descriptor(&self) -> Value {
        let mut d = self.manifest.descriptor(MANIFEST);
        d["platform"] = self.arch.platform();
        d
    }

    /// Compressed size: what a pull transfers (manifest, config, layer).
    pub fn compressed_size(&self) -> usize {
        self.manifest.bytes.len() + self.config.bytes.len() + self.layer.bytes.len()
    }

    /// The blobs of this image, manifest last.
    pub fn blobs(&self) -> [&Blob; 3] {
        [&self.layer, &self.config, &self.manifest]
    }
}

/// The multi-architecture image index over `images`.
pub fn image_index(images: &[ArchImage]) -> Blob {
    let manifests: Vec<Value> = images.iter().map(ArchImage::platform_descriptor).collect();
    Blob::json(&json!({ "schemaVersion": 2, "mediaType": INDEX, "manifests": manifests }))
}

/// A layout's `index.json` naming one entry point (`descriptor`) by tag
/// (`org.opencontainers.image.ref.name`, what skopeo and umoci look up) and by full
/// reference (`io.containerd.image.name`, what containerd and so k3s import as the name).
pub fn layout_index(meta: &ImageMeta, mut descriptor: Value) -> Value {
    descriptor["annotations"] = json!({
        "org.opencontainers.image.ref.name": meta.tag,
        "io.containerd.image.name": meta.reference(),
    });
    json!({ "schemaVersion": 2, "mediaType": INDEX, "manifests": [descriptor] })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> ImageMeta {
        ImageMeta {
            name: "example.test/merbridge-edge".into(),
            tag: "1.2.3".into(),
            created: 1_764_000_000,
            revision: Some("abc123".into()),
        }
    }

    #[test]
    fn manifest_names_config_and_layer_and_config_names_the_uncompressed_layer() {
        let img = ArchImage::build(&meta(), Arch::Arm64, b"\x7fELF binary").unwrap();
        let manifest: Value = serde_json::from_slice(&img.manifest.bytes).unwrap();
        assert_eq!(manifest["config"]["digest"], json!(img.config.digest));
        assert_eq!(manifest["config"]["size"], json!(img.config.bytes.len()));
        assert_eq!(manifest["layers"][0]["digest"], json!(img.layer.digest));
        assert_eq!(manifest["layers"][0]["mediaType"], json!(LAYER_GZIP));

        let config: Value = serde_json::from_slice(&img.config.bytes).unwrap();
        assert_eq!(config["architecture"], "arm64");
        assert_eq!(config["variant"], "v8");
        assert_eq!(config["os"], "linux");
        assert_eq!(config["config"]["Entrypoint"], json!(["/merbridge-edge"]));
        assert_eq!(config["config"]["Cmd"], json!(["run"]));
        assert_eq!(config["created"], "2025-11-24T16:00:00Z");
        assert_eq!(
            config["config"]["Labels"]["org.opencontainers.image.revision"],
            "abc123"
        );
        let mut tar = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(&img.layer.bytes[..]),
            &mut tar,
        )
        .unwrap();
        assert_eq!(config["rootfs"]["diff_ids"], json!([sha256_digest(&tar)]));
        let mut archive = tar::Archive::new(&tar[..]);
        let paths: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(paths, ["merbridge-edge"], "the layer holds only the binary");
    }

    #[test]
    fn same_inputs_same_digests_and_any_change_shows() {
        let a = ArchImage::build(&meta(), Arch::Amd64, b"bin").unwrap();
        let b = ArchImage::build(&meta(), Arch::Amd64, b"bin").unwrap();
        assert_eq!(a.manifest.digest, b.manifest.digest);
        let other_binary = ArchImage::build(&meta(), Arch::Amd64, b"bin2").unwrap();
        assert_ne!(a.manifest.digest, other_binary.manifest.digest);
        let other_arch = ArchImage::build(&meta(), Arch::Arm64, b"bin").unwrap();
        assert_ne!(a.manifest.digest, other_arch.manifest.digest);
    }

    #[test]
    fn index_lists_each_platform_and_the_layout_names_the_reference() {
        let images = [
            ArchImage::build(&meta(), Arch::Amd64, b"x86").unwrap(),
            ArchImage::build(&meta(), Arch::Arm64, b"arm").unwrap(),
        ];
        let index = image_index(&images);
        let doc: Value = serde_json::from_slice(&index.bytes).unwrap();
        assert_eq!(doc["manifests"][0]["platform"]["architecture"], "amd64");
        assert_eq!(doc["manifests"][1]["platform"]["architecture"], "arm64");
        assert_eq!(
            doc["manifests"][1]["digest"],
            json!(images[1].manifest.digest)
        );
        let layout = layout_index(&meta(), index.descriptor(INDEX));
        let entry = &layout["manifests"][0];
        assert_eq!(entry["mediaType"], INDEX);
        assert_eq!(
            entry["annotations"]["org.opencontainers.image.ref.name"],
            "1.2.3"
        );
        assert_eq!(
            entry["annotations"]["io.containerd.image.name"],
            "example.test/merbridge-edge:1.2.3"
        );
    }
}
