//! `mbe-image`: writes the Merbridge Edge OCI image from the static binaries of
//! `scripts/build-static`, with no container engine: a multi-architecture OCI layout
//! and one OCI archive per architecture for air-gapped k3s nodes. The same inputs give
//! the same digests.
mod blob;
mod layer;
mod layout;
mod oci;

use std::{fs, path::PathBuf};

use anyhow::{Context, Result, bail};
use argh::FromArgs;

use crate::oci::{Arch, ArchImage, INDEX, ImageMeta};

/// Default repository name of the image.
const DEFAULT_NAME: &str = "ghcr.io/merbridge-edge/merbridge-edge";

/// Writes the Merbridge Edge OCI image (scratch, one layer holding the static binary).
#[derive(FromArgs)]
struct Args {
    /// a static agent binary as ARCH=PATH (ARCH: amd64 or arm64); give one per architecture
    #[argh(option, from_str_fn(parse_binary))]
    binary: Vec<(Arch, PathBuf)>,
    /// repository name (default ghcr.io/merbridge-edge/merbridge-edge)
    #[argh(option, default = "DEFAULT_NAME.to_string()")]
    name: String,
    /// image tag (default: this release's version)
    #[argh(option, default = "env!(\"CARGO_PKG_VERSION\").to_string()")]
    tag: String,
    /// creation time in seconds since the epoch (default: $SOURCE_DATE_EPOCH)
    #[argh(option)]
    created: Option<u64>,
    /// source revision, recorded as the org.opencontainers.image.revision label
    #[argh(option)]
    revision: Option<String>,
    /// output folder: OUT/oci is the multi-arch layout, OUT/merbridge-edge-TAG-ARCH.tar
    /// the per-architecture archives (default dist)
    #[argh(option, default = "PathBuf::from(\"dist\")")]
    out: PathBuf,
}

fn parse_binary(s: &str) -> Result<(Arch, PathBuf), String> {
    let (arch, path) = s.split_once('=').ok_or_else(|| {
        format!("--binary {s}: expected ARCH=PATH, e.g. amd64=dist/amd64/merbridge-edge")
    })?;
    Ok((Arch::parse(arch)?, PathBuf::from(path)))
}

fn main() {
    let args: Args = argh::from_env();
    if let Err(e) = build(args) {
        eprintln!("mbe-image: {e:#}");
        std::process::exit(1);
    }
}

fn build(args: Args) -> Result<()> {
    if args.binary.is_empty() {
        bail!("no --binary given (e.g. --binary amd64=dist/amd64/merbridge-edge)");
    }
    let mut arches: Vec<Arch> = args.binary.iter().map(|(a, _)| *a).collect();
    arches.sort_by_key(|a| a.name());
    arches.dedup();
    if arches.len() != args.binary.len() {
        bail!("--binary names an architecture twice");
    }
    let created = match args.created {
        Some(t) => t,
        None => std::env::var("SOURCE_DATE_EPOCH")
            .context("no --created and no SOURCE_DATE_EPOCH: the creation time must be fixed for reproducible digests")?
            .trim()
            .parse()
            .context("SOURCE_DATE_EPOCH is not a number of seconds")?,
    };
    let meta = ImageMeta {
        name: args.name,
        tag: args.tag,
        created,
        revision: args.revision,
    };

    let mut binaries = args.binary;
    binaries.sort_by_key(|(a, _)| a.name());
    let mut images = Vec::new();
    for (arch, path) in &binaries {
        let bytes = fs::read(path)
            .with_context(|| format!("--binary {}: reading {}", arch.name(), path.display()))?;
        if !bytes.starts_with(b"\x7fELF") {
            bail!(
                "--binary {}: {} is not an ELF executable",
                arch.name(),
                path.display()
            );
        }
        images.push(ArchImage::build(&meta, *arch, &bytes)?);
    }

    fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let index = oci::image_index(&images);
    let mut blobs: Vec<&blob::Blob> = images.iter().flat_map(|i| i.blobs()).collect();
    blobs.push(&index);
    let layout_dir = args.out.join("oci");
    layout::write_dir(
        &layout_dir,
        &blobs,
        &oci::layout_index(&meta, index.descriptor(INDEX)),
    )?;
    println!(
        "{} {}: {}",
        layout_dir.display(),
        meta.reference(),
        index.digest
    );

    for image in &images {
        let archive = layout::tar_archive(
            &image.blobs(),
            &oci::layout_index(&meta, image.platform_descriptor()),
            meta.created,
        )?;
        let path = args.out.join(format!(
            "merbridge-edge-{}-{}.tar",
            meta.tag,
            image.arch.name()
        ));
        fs::write(&path, &archive).with_context(|| format!("writing {}", path.display()))?;
        println!(
            "linux/{}: manifest {}, compressed {:.2} MB; {} ({:.2} MB)",
            image.arch.name(),
            image.manifest.digest,
            image.compressed_size() as f64 / 1e6,
            path.display(),
            archive.len() as f64 / 1e6,
        );
    }
    Ok(())
}
