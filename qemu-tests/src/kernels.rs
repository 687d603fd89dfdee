//! Debian kernel packages: which to boot (the newest of a series for an architecture)
//! and fetching them into a cache outside the repository with `apt-get download`,
//! keeping only `vmlinuz` and the modules the test needs.
use std::{
    fmt, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// A Debian architecture the tests boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Arch {
    /// 64-bit ARM (qemu-system-aarch64, `virt`).
    Arm64,
    /// x86_64 (qemu-system-x86_64, `q35`).
    Amd64,
}

impl Arch {
    /// Both, ARM64 first.
    pub const ALL: [Arch; 2] = [Arch::Arm64, Arch::Amd64];

    /// Debian's name (`arm64`, `amd64`).
    pub fn debian(self) -> &'static str {
        match self {
            Arch::Arm64 => "arm64",
            Arch::Amd64 => "amd64",
        }
    }

    /// The kernel flavour booted: the generic arm64 kernel, the cloud amd64 kernel.
    pub fn flavour(self) -> &'static str {
        match self {
            Arch::Arm64 => "arm64",
            Arch::Amd64 => "cloud-amd64",
        }
    }

    /// From Debian's name.
    pub fn from_debian(s: &str) -> Result<Self> {
        match s {
            "arm64" => Ok(Arch::Arm64),
            "amd64" => Ok(Arch::Amd64),
            _ => bail!("unknown architecture {s:?} (expected arm64 or amd64)"),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.debian())
    }
}

/// Modules the driver loads, relative to `lib/modules/<release>/` (Debian builds them as
/// modules; 6.12 packages compress them with xz, which the kernel decompresses itself).
pub const MODULES: &[&str] = &["kernel/drivers/net/veth.ko"];

/// The version token of an unsigned kernel image package of `arch`'s flavour in
/// `series` (`6.1.0-56` of `linux-image-6.1.0-56-arm64-unsigned`, `6.12.117+deb12` of
/// `linux-image-6.12.117+deb12-arm64-unsigned`), or None if `name` is not one.
pub fn version_token<'a>(name: &'a str, arch: Arch, series: &str) -> Option<&'a str> {
    let suffix = format!("-{}-unsigned", arch.flavour());
    let token = name
        .strip_prefix("linux-image-")?
        .strip_suffix(suffix.as_str())?;
    let rest = token.strip_prefix(series)?.strip_prefix('.')?;
    // <patch>-<abi> (6.1.0-56) or <patch>+deb<n> (6.12.117+deb12): nothing else, so
    // that -rt-, -cloud- or -dbg packages never match.
    let (patch, tail) = rest.split_once('-').or_else(|| rest.split_once("+deb"))?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(patch) && digits(tail)).then_some(token)
}

fn numbers(token: &str) -> Vec<u64> {
    token
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or(0))
        .collect()
}

/// The newest package among `names` for `arch` and `series` (`6.1`, `6.12`).
pub fn select_newest<'a>(
    names: impl IntoIterator<Item = &'a str>,
    arch: Arch,
    series: &str,
) -> Option<&'a str> {
    names
        .into_iter()
        .filter_map(|n| version_token(n, arch, series).map(|t| (numbers(t), n)))
        .max()
        .map(|(_, n)| n)
}

/// A kernel ready to boot.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// Package name.
    pub package: String,
    /// Package version.
    pub version: String,
    /// Architecture.
    pub arch: Arch,
    /// The kernel image.
    pub vmlinuz: PathBuf,
    /// [`MODULES`], in order.
    pub modules: Vec<PathBuf>,
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The newest package of `series` for `arch` that apt knows (`apt-cache pkgnames`).
pub fn newest_available(arch: Arch, series: &str) -> Result<String> {
    let names =
        run(Command::new("apt-cache").args(["pkgnames", &format!("linux-image-{series}")]))?;
    select_newest(names.lines(), arch, series)
        .map(String::from)
        .with_context(|| {
            format!(
                "apt knows no linux-image-{series}.*-{}-unsigned package for {arch} \
                 (is `dpkg --add-architecture {arch}` done and the package lists updated?)",
                arch.flavour()
            )
        })
}

/// The candidate version of `package` for `arch`.
pub fn candidate_version(package: &str, arch: Arch) -> Result<String> {
    let text = run(Command::new("apt-cache").args([
        "show",
        "--no-all-versions",
        &format!("{package}:{arch}"),
    ]))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("apt-cache show {package}:{arch} gave no Version"))
}

/// `package` at `version` for `arch`, from the cache or downloaded into it
/// (`apt-get download`, `dpkg-deb -x`; the .deb is removed once extracted).
pub fn fetch(cache: &Path, package: &str, version: &str, arch: Arch) -> Result<Kernel> {
    let dir = cache.join(format!("{package}_{}", version.replace(':', "%3a")));
    let kernel = |dir: &Path| -> Result<Kernel> {
        let modules = fs::read_to_string(dir.join("modules"))
            .with_context(|| format!("reading {}", dir.join("modules").display()))?
            .lines()
            .map(|m| dir.join(m))
            .collect();
        Ok(Kernel {
            package: package.into(),
            version: version.into(),
            arch,
            vmlinuz: dir.join("vmlinuz"),
            modules,
        })
    };
    if dir.join("complete").exists() {
        return kernel(&dir);
    }
    fs::create_dir_all(cache)
        .with_context(|| format!("creating kernel cache {}", cache.display()))?;
    let deb = cache.join(format!(
        "{package}_{}_{arch}.deb",
        version.replace(':', "%3a")
    ));
    if !deb.exists() {
        eprintln!("mbe-qemu: downloading {package} {version} ({arch})");
        run(Command::new("apt-get")
            .args(["download", "-q", &format!("{package}:{arch}={version}")])
            .current_dir(cache))
        .with_context(|| format!("downloading kernel package {package}"))?;
        if !deb.exists() {
            bail!("apt-get download {package} did not write {}", deb.display());
        }
    }
    let tmp = cache.join(format!(".extract-{package}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))
        .with_context(|| format!("extracting {}", deb.display()))?;
    let result = (|| -> Result<()> {
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let image = find_prefixed(&tmp.join("boot"), "vmlinuz-")?;
        fs::copy(&image, dir.join("vmlinuz"))
            .with_context(|| format!("copying {}", image.display()))?;
        let release_dir = only_subdir(&tmp.join("lib/modules"))?;
        let mut listed = vec![];
        for m in MODULES {
            let base = release_dir.join(m);
            let found = ["", ".xz", ".zst", ".gz"]
                .iter()
                .map(|ext| PathBuf::from(format!("{}{ext}", base.display())))
                .find(|p| p.exists())
                .with_context(|| format!("{package} has no {m}"))?;
            let name = found.file_name().context("module name")?.to_owned();
            fs::copy(&found, dir.join(&name))?;
            listed.push(name.to_string_lossy().into_owned());
        }
        fs::write(dir.join("modules"), listed.join("\n"))?;
        fs::write(dir.join("complete"), "")?;
        Ok(())
    })();
    let _ = fs::remove_dir_all(&tmp);
    result.with_context(|| format!("unpacking {}", deb.display()))?;
    fs::remove_file(&deb).with_context(|| format!("removing {}", deb.display()))?;
    kernel(&dir)
}

fn find_prefixed(dir: &Path, prefix: &str) -> Result<PathBuf> {
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        if e.file_name().to_string_lossy().starts_with(prefix) {
            return Ok(e.path());
        }
    }
    bail!("no {prefix}* in {}", dir.display())
}

fn only_subdir(dir: &Path) -> Result<PathBuf> {
    let mut dirs = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.path());
    match (dirs.next(), dirs.next()) {
        (Some(d), None) => Ok(d),
        _ => bail!(
            "expected exactly one kernel release under {}",
            dir.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: &[&str] = &[
        "linux-image-6.1.0-9-arm64-unsigned",
        "linux-image-6.1.0-56-arm64-unsigned",
        "linux-image-6.1.0-55-arm64-unsigned",
        "linux-image-6.1.0-57-rt-arm64-unsigned",
        "linux-image-6.1.0-58-cloud-arm64-unsigned",
        "linux-image-6.1.0-59-arm64-dbg",
        "linux-image-6.1.0-56-cloud-amd64-unsigned",
        "linux-image-6.1.0-60-amd64-unsigned",
        "linux-image-6.12.99+deb12-arm64-unsigned",
        "linux-image-6.12.117+deb12-arm64-unsigned",
        "linux-image-6.12.115+deb12-arm64-unsigned",
        "linux-image-6.12.118+deb12-rt-arm64-unsigned",
        "linux-image-6.12.117+deb12-cloud-amd64-unsigned",
        "linux-image-6.12-amd64-signed-template",
        "linux-image-6.12.200+deb12-amd64-unsigned",
    ];

    #[test]
    fn newest_of_each_series_and_flavour() {
        let pick = |arch, series| select_newest(NAMES.iter().copied(), arch, series);
        assert_eq!(
            pick(Arch::Arm64, "6.1"),
            Some("linux-image-6.1.0-56-arm64-unsigned")
        );
        assert_eq!(
            pick(Arch::Arm64, "6.12"),
            Some("linux-image-6.12.117+deb12-arm64-unsigned")
        );
        assert_eq!(
            pick(Arch::Amd64, "6.1"),
            Some("linux-image-6.1.0-56-cloud-amd64-unsigned")
        );
        assert_eq!(
            pick(Arch::Amd64, "6.12"),
            Some("linux-image-6.12.117+deb12-cloud-amd64-unsigned")
        );
        assert_eq!(pick(Arch::Amd64, "6.6"), None);
    }

    #[test]
    fn numeric_not_lexical_order() {
        let names = [
            "linux-image-6.1.0-9-arm64-unsigned",
            "linux-image-6.1.0-10-arm64-unsigned",
        ];
        assert_eq!(select_newest(names, Arch::Arm64, "6.1"), Some(names[1]));
    }

    #[test]
    fn series_prefixes_do_not_overlap() {
        assert_eq!(
            version_token(
                "linux-image-6.12.117+deb12-arm64-unsigned",
                Arch::Arm64,
                "6.1"
            ),
            None
        );
        assert_eq!(
            version_token("linux-image-6.1.0-56-arm64-unsigned", Arch::Arm64, "6.12"),
            None
        );
        assert_eq!(
            version_token("linux-image-6.1.0-56-arm64-unsigned", Arch::Arm64, "6.1"),
            Some("6.1.0-56")
        );
    }

    #[test]
    fn architectures_by_name() {
        assert_eq!(Arch::from_debian("arm64").unwrap(), Arch::Arm64);
        assert!(
            Arch::from_debian("riscv64")
                .unwrap_err()
                .to_string()
                .contains("riscv64")
        );
    }
}
