//! What an init does before anything else: mounts, kernel modules, sysctls, network
//! namespaces held by file descriptor and pinned as files, power-off.
use std::{
    ffi::CString,
    fs,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::OpenOptionsExt},
    },
    path::Path,
};

use anyhow::{Context, Result, bail};

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Mounts `fstype` at `target` (created first).
pub fn mount(fstype: &str, target: &str) -> Result<()> {
    fs::create_dir_all(target).with_context(|| format!("creating {target}"))?;
    let (src, tgt, ty) = (
        CString::new(fstype)?,
        CString::new(target)?,
        CString::new(fstype)?,
    );
    // SAFETY: NUL-terminated strings, no data argument.
    if unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), ty.as_ptr(), 0, std::ptr::null()) } != 0 {
        bail!("mounting {fstype} on {target}: {}", errno());
    }
    Ok(())
}

/// proc, sysfs, cgroup2 and bpffs at their usual places, a tmpfs on /run and
/// /var/run pointing to it (as on Debian: where `ip netns` and containerd pin network
/// namespaces).
pub fn mount_all() -> Result<()> {
    mount("proc", "/proc")?;
    mount("sysfs", "/sys")?;
    mount("cgroup2", "/sys/fs/cgroup")?;
    mount("bpf", "/sys/fs/bpf")?;
    mount("tmpfs", "/run")?;
    fs::create_dir_all("/var").context("creating /var")?;
    std::os::unix::fs::symlink("/run", "/var/run").context("linking /var/run to /run")
}

/// Loads every module in `dir`, in name order (`finit_module`; compressed modules are
/// decompressed by the kernel). Returns their names.
pub fn load_modules(dir: &Path) -> Result<Vec<String>> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let mut names = vec![];
    for path in files {
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let f = fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        const MODULE_INIT_COMPRESSED_FILE: libc::c_long = 4;
        let flags = if [".xz", ".zst", ".gz"].iter().any(|e| name.ends_with(e)) {
            MODULE_INIT_COMPRESSED_FILE
        } else {
            0
        };
        // SAFETY: a valid fd and an empty NUL-terminated parameter string.
        let r =
            unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), c"".as_ptr(), flags) };
        if r != 0 && errno().raw_os_error() != Some(libc::EEXIST) {
            bail!("loading module {name}: {}", errno());
        }
        names.push(name);
    }
    Ok(names)
}

/// Writes a value to a /proc/sys or /sys file.
pub fn write(path: &str, value: &str) -> Result<()> {
    fs::write(path, value).with_context(|| format!("writing {value:?} to {path}"))
}

/// `uname -r` and `uname -m`.
pub fn uname() -> (String, String) {
    // SAFETY: uname fills a zeroed struct.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    unsafe { libc::uname(&mut u) };
    let s = |f: &[libc::c_char]| {
        let bytes: Vec<u8> = f
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    (s(&u.release), s(&u.machine))
}

fn open_netns() -> Result<OwnedFd> {
    let f =
        fs::File::open("/proc/thread-self/ns/net").context("opening /proc/thread-self/ns/net")?;
    Ok(f.into())
}

fn setns(fd: &OwnedFd) -> Result<()> {
    // SAFETY: setns on an open namespace fd.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", errno());
    }
    Ok(())
}

/// A new network namespace, held open by the returned fd (no bind mount needed); the
/// calling thread stays in its own.
pub fn new_netns() -> Result<OwnedFd> {
    let home = open_netns()?;
    // SAFETY: unshare of the calling thread's network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!("unshare(CLONE_NEWNET): {}", errno());
    }
    let ns = open_netns();
    setns(&home)?;
    ns
}

/// Makes network namespace `ns` a file at `path`, as `ip netns add` does: an empty
/// file with `/proc/self/fd/<fd>` bind-mounted onto it.
pub fn pin_netns(ns: &OwnedFd, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let src = CString::new(format!("/proc/self/fd/{}", ns.as_raw_fd()))?;
    let tgt = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: NUL-terminated strings; a bind mount takes no type or data.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if r != 0 {
        bail!(
            "bind-mounting the network namespace on {}: {}",
            path.display(),
            errno()
        );
    }
    Ok(())
}

/// Runs `f` inside `ns`, then returns to the calling thread's namespace.
pub fn in_netns<T>(ns: &OwnedFd, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let home = open_netns()?;
    setns(ns)?;
    let r = f();
    setns(&home)?;
    r
}

/// Syncs and powers the machine off (qemu exits); never returns.
pub fn poweroff() -> ! {
    // SAFETY: sync and reboot have no memory preconditions.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}
