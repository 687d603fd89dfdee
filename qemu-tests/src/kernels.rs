//! Debian kernel packages: which to boot (the newest of a series for an architecture)
//! and fetching them into a cache outside the repository with `apt-get download`,
//! keeping only `vmlinuz` and the modules the test needs. Series of this machine's
//! Debian release (bookworm: 6.1, 6.12) come from the system's apt; older series
//! (bullseye's 5.10) from a private apt configuration kept under the cache ([`Apt`]),
//! which leaves the system's sources, lists and status alone.
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
/// modules; 6.12 packages compress them with xz, which the kernel decompresses itself;
/// 5.10 and 6.1 ship them plain).
pub const MODULES: &[&str] = &["kernel/drivers/net/veth.ko"];

/// The version token of an unsigned kernel image package of `arch`'s flavour in
/// `series` (`6.1.0-56` of `linux-image-6.1.0-56-arm64-unsigned`, `5.10.0-46` of
/// `linux-image-5.10.0-46-cloud-amd64-unsigned`, `6.12.117+deb12` of
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

/// The packages among `names` for `arch` and `series` (`5.10`, `6.1`, `6.12`), newest
/// first.
pub fn newest_first<'a>(
    names: impl IntoIterator<Item = &'a str>,
    arch: Arch,
    series: &str,
) -> Vec<&'a str> {
    let mut found: Vec<(Vec<u64>, &str)> = names
        .into_iter()
        .filter_map(|n| version_token(n, arch, series).map(|t| (numbers(t), n)))
        .collect();
    found.sort();
    found.dedup();
    found.into_iter().rev().map(|(_, n)| n).collect()
}

/// The newest package among `names` for `arch` and `series`.
pub fn select_newest<'a>(
    names: impl IntoIterator<Item = &'a str>,
    arch: Arch,
    series: &str,
) -> Option<&'a str> {
    newest_first(names, arch, series).into_iter().next()
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

/// The Debian release whose archive holds kernel series `series` when it is not this
/// machine's (bullseye for 5.10); None: the system's apt has it.
pub fn foreign_release(series: &str) -> Option<&'static str> {
    match series {
        "5.10" => Some("bullseye"),
        _ => None,
    }
}

/// The keyring that signs every Debian release's archive (debian-archive-keyring).
const ARCHIVE_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Private package lists older than this are updated before use.
const LISTS_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// How apt is asked about kernel packages: the system's configuration, or a private one
/// for another Debian release whose sources, lists, package cache and (empty) dpkg
/// status all live in one directory under the kernel cache (`apt-<release>/`), so
/// nothing of the system's apt changes.
#[derive(Clone, Debug, Default)]
pub struct Apt {
    /// `-o` options given to apt-get and apt-cache (none for the system's apt).
    options: Vec<String>,
}

impl Apt {
    /// The system's apt.
    pub fn system() -> Self {
        Self::default()
    }

    /// The apt that knows `series`: the system's, or a private one for
    /// [`foreign_release`] under `cache`, its lists updated when missing or a day old
    /// (a failed update with lists present only warns: the cached kernels still boot).
    pub fn for_series(series: &str, cache: &Path) -> Result<Self> {
        let Some(release) = foreign_release(series) else {
            return Ok(Self::system());
        };
        let (archive, security) = system_mirrors();
        let dir = cache.join(format!("apt-{release}"));
        for sub in [
            "lists/partial",
            "cache/archives/partial",
            "sources.list.d",
            "preferences.d",
        ] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let sources = dir.join("sources.list");
        fs::write(
            &sources,
            format!(
                "deb [signed-by={ARCHIVE_KEYRING}] {archive} {release} main\n\
                 deb [signed-by={ARCHIVE_KEYRING}] {security} {release}-security main\n"
            ),
        )
        .with_context(|| format!("writing {}", sources.display()))?;
        let status = dir.join("status");
        if !status.exists() {
            fs::write(&status, "").with_context(|| format!("writing {}", status.display()))?;
        }
        let d = |sub: &str| dir.join(sub).display().to_string();
        let mut options: Vec<String> = vec![
            format!("Dir::Etc::sourcelist={}", d("sources.list")),
            format!("Dir::Etc::sourceparts={}", d("sources.list.d")),
            format!("Dir::Etc::preferences={}", d("preferences")),
            format!("Dir::Etc::preferencesparts={}", d("preferences.d")),
            format!("Dir::State::lists={}", d("lists")),
            format!("Dir::State::status={}", d("status")),
            format!("Dir::Cache={}", d("cache")),
            "Acquire::Languages=none".into(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".into(),
        ];
        for arch in Arch::ALL {
            options.push(format!("APT::Architectures::={}", arch.debian()));
        }
        let apt = Self { options };
        let fresh = fs::read_dir(dir.join("lists"))
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with("_Packages"))
            .filter_map(|e| e.metadata().ok()?.modified().ok())
            .map(|t| t.elapsed().is_ok_and(|age| age < LISTS_MAX_AGE))
            .collect::<Vec<bool>>();
        if fresh.is_empty() || fresh.contains(&false) {
            eprintln!(
                "mbe-qemu: updating the {release} package lists in {}",
                dir.display()
            );
            if let Err(e) = run(apt.apt_get().args(["update", "-q"])) {
                if fresh.is_empty() {
                    return Err(e.context(format!("updating the {release} package lists")));
                }
                eprintln!("mbe-qemu: warning: {e:#}; using the lists from before");
            }
        }
        Ok(apt)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        for o in &self.options {
            cmd.arg("-o").arg(o);
        }
        cmd
    }

    fn apt_get(&self) -> Command {
        self.command("apt-get")
    }

    fn apt_cache(&self) -> Command {
        self.command("apt-cache")
    }
}

/// The Debian archive and security archive this machine's apt uses (the first `URIs:`
/// or `deb` entry ending in `/debian` and `/debian-security` in /etc/apt's sources),
/// else deb.debian.org's.
pub fn system_mirrors() -> (String, String) {
    let mut texts = vec![fs::read_to_string("/etc/apt/sources.list").unwrap_or_default()];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut files: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for f in files {
            let name = f.to_string_lossy();
            if name.ends_with(".sources") || name.ends_with(".list") {
                texts.push(fs::read_to_string(&f).unwrap_or_default());
            }
        }
    }
    mirrors_in(&texts.join("\n"))
}

/// The archive and security archive URIs named in apt sources `text` (one-line or
/// deb822 format); deb.debian.org's where none is.
pub fn mirrors_in(text: &str) -> (String, String) {
    let uris: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .flat_map(|l| {
            if let Some(v) = l.strip_prefix("URIs:") {
                v.split_whitespace().collect::<Vec<_>>()
            } else if l.starts_with("deb ") {
                l.split_whitespace()
                    .skip(1)
                    .filter(|w| w.contains("://"))
                    .take(1)
                    .collect()
            } else {
                vec![]
            }
        })
        .map(|u| u.trim_end_matches('/'))
        .collect();
    let find = |suffix: &str, default: &str| {
        uris.iter()
            .find(|u| u.ends_with(suffix))
            .map_or_else(|| default.to_string(), |u| u.to_string())
    };
    (
        find("/debian", "http://deb.debian.org/debian"),
        find("/debian-security", "http://deb.debian.org/debian-security"),
    )
}

/// The packages of `series` for `arch` that `apt` knows (`apt-cache pkgnames`), newest
/// first. An archive's index can name packages its mirror no longer (or not yet)
/// serves, so the caller falls back to older ones when a download fails.
pub fn available(apt: &Apt, arch: Arch, series: &str) -> Result<Vec<String>> {
    let names = run(apt
        .apt_cache()
        .args(["pkgnames", &format!("linux-image-{series}")]))?;
    let found: Vec<String> = newest_first(names.lines(), arch, series)
        .into_iter()
        .map(String::from)
        .collect();
    if found.is_empty() {
        bail!(
            "apt knows no linux-image-{series}.*-{}-unsigned package for {arch} \
             (is `dpkg --add-architecture {arch}` done and the package lists updated?)",
            arch.flavour()
        );
    }
    Ok(found)
}

/// The candidate version of `package` for `arch` in `apt`.
pub fn candidate_version(apt: &Apt, package: &str, arch: Arch) -> Result<String> {
    let text =
        run(apt
            .apt_cache()
            .args(["show", "--no-all-versions", &format!("{package}:{arch}")]))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("apt-cache show {package}:{arch} gave no Version"))
}

/// `package` at `version` for `arch`, from the cache or downloaded into it
/// (`apt-get download`, `dpkg-deb -x`; the .deb is removed once extracted).
pub fn fetch(apt: &Apt, cache: &Path, package: &str, version: &str, arch: Arch) -> Result<Kernel> {
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
        run(apt
            .apt_get()
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
        // bullseye's, as its archive and bullseye-security name them
        "linux-image-5.10.0-9-arm64-unsigned",
        "linux-image-5.10.0-46-arm64-unsigned",
        "linux-image-5.10.0-45-arm64-unsigned",
        "linux-image-5.10.0-47-rt-arm64-unsigned",
        "linux-image-5.10.0-48-cloud-arm64-unsigned",
        "linux-image-5.10.0-46-arm64-dbg",
        "linux-image-5.10.0-49-arm64",
        "linux-image-5.10.0-46-cloud-amd64-unsigned",
        "linux-image-5.10.0-47-amd64-unsigned",
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
        assert_eq!(
            pick(Arch::Arm64, "5.10"),
            Some("linux-image-5.10.0-46-arm64-unsigned")
        );
        assert_eq!(
            pick(Arch::Amd64, "5.10"),
            Some("linux-image-5.10.0-46-cloud-amd64-unsigned")
        );
        assert_eq!(pick(Arch::Amd64, "6.6"), None);
        assert_eq!(pick(Arch::Amd64, "5.1"), None);
    }

    #[test]
    fn only_older_series_use_a_private_apt() {
        assert_eq!(foreign_release("5.10"), Some("bullseye"));
        assert_eq!(foreign_release("6.1"), None);
        assert_eq!(foreign_release("6.12"), None);
    }

    #[test]
    fn mirrors_from_deb822_and_one_line_sources() {
        let deb822 = "Types: deb\n# http://snapshot.debian.org/archive/debian/x\n\
                      URIs: http://mirror.example/debian/\nSuites: bookworm\n\n\
                      Types: deb\nURIs: http://mirror.example/debian-security\n\
                      Suites: bookworm-security\n";
        assert_eq!(
            mirrors_in(deb822),
            (
                "http://mirror.example/debian".into(),
                "http://mirror.example/debian-security".into()
            )
        );
        let one_line = "deb [arch=amd64 signed-by=/k.gpg] https://m.example/debian bookworm main\n\
                        deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n";
        assert_eq!(
            mirrors_in(one_line),
            (
                "https://m.example/debian".into(),
                "http://deb.debian.org/debian-security".into()
            )
        );
    }

    #[test]
    fn fallbacks_newest_first_without_other_flavours() {
        assert_eq!(
            newest_first(NAMES.iter().copied(), Arch::Arm64, "5.10"),
            [
                "linux-image-5.10.0-46-arm64-unsigned",
                "linux-image-5.10.0-45-arm64-unsigned",
                "linux-image-5.10.0-9-arm64-unsigned",
            ]
        );
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
        assert_eq!(
            version_token(
                "linux-image-5.10.0-46-cloud-amd64-unsigned",
                Arch::Amd64,
                "5.10"
            ),
            Some("5.10.0-46")
        );
        assert_eq!(
            version_token("linux-image-5.10.0-46-arm64-unsigned", Arch::Arm64, "5.1"),
            None
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
