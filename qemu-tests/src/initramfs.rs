//! The initramfs of a test VM: `/init` (the static driver), `/merbridge-edge` (the
//! static agent), kernel modules the driver loads (`/modules/*.ko[.xz]`), the mount
//! points and a `/dev/console` node, as gzip-compressed newc.
use std::{fs, io::Write, path::Path};

use anyhow::{Context, Result};
use flate2::{Compression, write::GzEncoder};

use crate::newc::Writer;

/// What goes into one initramfs.
pub struct Contents<'a> {
    /// The in-VM driver, becomes `/init`.
    pub driver: &'a Path,
    /// The agent, becomes `/merbridge-edge`.
    pub agent: &'a Path,
    /// Kernel modules, become `/modules/<file name>` (loaded in this order).
    pub modules: &'a [&'a Path],
}

/// Writes the gzip-compressed newc archive of `contents` to `out`.
pub fn write(contents: &Contents, out: &Path) -> Result<()> {
    let read = |p: &Path| {
        fs::read(p).with_context(|| format!("reading {} for the initramfs", p.display()))
    };
    let gz = GzEncoder::new(Vec::new(), Compression::fast());
    let mut w = Writer::new(gz);
    for dir in ["/dev", "/proc", "/sys", "/tmp", "/run", "/modules"] {
        w.dir(dir, if dir == "/tmp" { 0o1777 } else { 0o755 })?;
    }
    w.char_device("/dev/console", 0o600, 5, 1)?;
    w.char_device("/dev/null", 0o666, 1, 3)?;
    w.file("/init", 0o755, &read(contents.driver)?)?;
    w.file("/merbridge-edge", 0o755, &read(contents.agent)?)?;
    for (i, m) in contents.modules.iter().enumerate() {
        let name = m
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("module path {} has no file name", m.display()))?;
        // A numeric prefix keeps the load order (dependencies first).
        w.file(&format!("/modules/{i:02}-{name}"), 0o644, &read(m)?)?;
    }
    let bytes = w.finish()?.finish()?;
    let mut f = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    f.write_all(&bytes)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;
    use std::io::Read;

    #[test]
    fn holds_init_agent_modules_and_console() {
        let dir = std::env::temp_dir().join(format!("mbe-initramfs-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (d, a, m) = (
            dir.join("driver"),
            dir.join("agent"),
            dir.join("veth.ko.xz"),
        );
        fs::write(&d, b"DRIVER").unwrap();
        fs::write(&a, b"AGENT").unwrap();
        fs::write(&m, b"MODULE").unwrap();
        let out = dir.join("initrd.gz");
        write(
            &Contents {
                driver: &d,
                agent: &a,
                modules: &[&m],
            },
            &out,
        )
        .unwrap();
        let mut raw = vec![];
        GzDecoder::new(fs::File::open(&out).unwrap())
            .read_to_end(&mut raw)
            .unwrap();
        let text = String::from_utf8_lossy(&raw);
        for needle in [
            "dev/console\0",
            "init\0",
            "DRIVER",
            "merbridge-edge\0",
            "AGENT",
            "modules/00-veth.ko.xz\0",
            "TRAILER!!!",
        ] {
            assert!(text.contains(needle), "{needle:?} missing");
        }
        let missing = write(
            &Contents {
                driver: &dir.join("nope"),
                agent: &a,
                modules: &[],
            },
            &out,
        )
        .unwrap_err();
        assert!(format!("{missing:#}").contains("nope"), "{missing:#}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
