//! The shipped artefacts under `dist/`: the static binaries of `scripts/build-static`.
use std::path::PathBuf;

/// The workspace's `dist/` folder.
pub fn dist_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dist")
}

/// `dist/<arch>/merbridge-edge` (arch `amd64` or `arm64`), or None when it was not
/// built: the test is skipped with a note, or fails when MBE_REQUIRE_DIST=1
/// (`scripts/test` builds them and sets it).
pub fn static_binary(arch: &str, test: &str) -> Option<PathBuf> {
    let path = dist_dir().join(arch).join("merbridge-edge");
    if path.exists() {
        return Some(path);
    }
    let why = format!("{} not built (scripts/build-static {arch})", path.display());
    if std::env::var("MBE_REQUIRE_DIST").as_deref() == Ok("1") {
        panic!("{test}: {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
    None
}
