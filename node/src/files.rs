//! Reading the files named by flags (token, CA, client certificate and key, pods file)
//! without following a symlink out of the directory the path names. Kubernetes mounts
//! secrets and config maps as symlinks into a `..data/` directory beside them, which
//! stays allowed; a link to anywhere else (another file of the host) is refused.
use std::{
    fs::File,
    io::{self, Read},
    os::fd::{AsRawFd, FromRawFd},
    path::Path,
};

/// Reads at most `limit` bytes of `path` (an error names the limit when the file is
/// larger), resolving symlinks only inside the file's own directory.
pub fn read_beneath(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let file = open_beneath(path)?;
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::other(format!(
            "larger than the {limit} byte limit"
        )));
    }
    Ok(bytes)
}

/// Opens `path` read-only, refusing symlinks that lead out of its directory.
pub fn open_beneath(path: &Path) -> io::Result<File> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let dir = File::open(dir)?;
    let c_name = std::ffi::CString::new(name.as_encoded_bytes())?;
    // SAFETY: open_how is plain data; zeroed then filled.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 with a valid directory fd, a NUL-terminated name and the size of `how`.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c_name.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd >= 0 {
        // SAFETY: a fresh fd that nothing else owns.
        return Ok(unsafe { File::from_raw_fd(fd as i32) });
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EXDEV) => Err(escapes(path)),
        // Kernels before 5.6 have no openat2: resolve and compare instead.
        Some(libc::ENOSYS) => {
            let real = path.canonicalize()?;
            let real_dir = path.parent().unwrap_or(Path::new(".")).canonicalize()?;
            if !real.starts_with(&real_dir) {
                return Err(escapes(path));
            }
            File::open(&real)
        }
        _ => Err(err),
    }
}

fn escapes(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "{} is a symlink leading out of its directory; not followed",
            path.display()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn links_inside_the_directory_are_followed_and_links_out_of_it_are_not() {
        let root = std::env::temp_dir().join(format!("mbe-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let mounted = root.join("serviceaccount");
        std::fs::create_dir_all(mounted.join("..2026_11_25"))
            .and_then(|_| std::fs::write(mounted.join("..2026_11_25/token"), "abc"))
            .unwrap();
        // The kubelet's layout: token -> ..data/token, ..data -> ..<timestamp>.
        symlink("..2026_11_25", mounted.join("..data")).unwrap();
        symlink("..data/token", mounted.join("token")).unwrap();
        assert_eq!(read_beneath(&mounted.join("token"), 100).unwrap(), b"abc");

        std::fs::write(root.join("host-secret"), "secret").unwrap();
        symlink("../host-secret", mounted.join("up")).unwrap();
        symlink(root.join("host-secret"), mounted.join("absolute")).unwrap();
        for link in ["up", "absolute"] {
            let err = read_beneath(&mounted.join(link), 100).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{link}: {err}");
            assert!(
                err.to_string().contains("leading out of its directory"),
                "{err}"
            );
        }

        let err = read_beneath(&mounted.join("token"), 2).unwrap_err();
        assert!(err.to_string().contains("2 byte limit"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
