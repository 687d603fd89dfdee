//! A writer for the cpio "newc" format the kernel unpacks as its initramfs
//! (Documentation/driver-api/early-userspace/buffer-format.rst): no root and no cpio
//! tool needed, device nodes included.
use std::io::{self, Write};

/// `S_IFDIR`.
pub const DIR: u32 = 0o040000;
/// `S_IFREG`.
pub const FILE: u32 = 0o100000;
/// `S_IFCHR`.
pub const CHAR_DEVICE: u32 = 0o020000;

/// The name of the archive's last entry.
pub const TRAILER: &str = "TRAILER!!!";

/// Writes newc entries to `out`; [`Writer::finish`] adds the trailer.
pub struct Writer<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

impl<W: Write> Writer<W> {
    /// Starts an archive.
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    /// A directory (parents first: the kernel does not create them).
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.entry(path, DIR | perm, 2, (0, 0), &[])
    }

    /// A regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, FILE | perm, 1, (0, 0), data)
    }

    /// A character device node, like `/dev/console` (5, 1).
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, CHAR_DEVICE | perm, 1, (major, minor), &[])
    }

    /// Ends the archive and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.next_ino = 0;
        self.entry(TRAILER, 0, 1, (0, 0), &[])?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let name = path.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad initramfs path {path:?}"),
            ));
        }
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{path}: over 4 GiB"))
        })?;
        let ino = self.next_ino;
        if ino != 0 {
            self.next_ino += 1;
        }
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - self.written % 4) % 4;
        self.put(&[0u8; 3][..n as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One parsed entry: name, mode, rdev, data.
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    /// A strict reader of what the writer writes (checks magic, alignment, sizes).
    fn parse(mut b: &[u8]) -> Vec<Entry> {
        let total = b.len();
        let mut out = vec![];
        loop {
            assert_eq!((total - b.len()) % 4, 0, "header aligned to 4");
            assert_eq!(&b[..6], b"070701", "magic");
            let field = |i: usize| {
                let s = std::str::from_utf8(&b[6 + 8 * i..14 + 8 * i]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let (mode, size, rdev, namesize) = (
                field(1),
                field(6) as usize,
                (field(9), field(10)),
                field(11) as usize,
            );
            let name = std::str::from_utf8(&b[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            assert_eq!(b[110 + namesize - 1], 0, "name NUL-terminated");
            let data_at = (110 + namesize).div_ceil(4) * 4;
            let data = b[data_at..data_at + size].to_vec();
            let next = (data_at + size).div_ceil(4) * 4;
            assert!(
                b[110 + namesize..data_at].iter().all(|&x| x == 0),
                "padding is zeros"
            );
            b = &b[next..];
            let done = name == TRAILER;
            out.push((name, mode, rdev, data));
            if done {
                assert!(b.is_empty(), "nothing after the trailer");
                return out;
            }
        }
    }

    #[test]
    fn entries_round_trip_with_alignment_and_trailer() {
        let mut w = Writer::new(Vec::new());
        w.dir("/dev", 0o755).unwrap();
        w.char_device("/dev/console", 0o600, 5, 1).unwrap();
        w.file("/init", 0o755, b"12345").unwrap();
        w.file("/odd-name-x", 0o644, b"").unwrap();
        w.file("/b", 0o644, &[7u8; 4099]).unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let e = parse(&bytes);
        let names: Vec<&str> = e.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(
            names,
            ["dev", "dev/console", "init", "odd-name-x", "b", TRAILER]
        );
        assert_eq!(e[0].1, DIR | 0o755);
        assert_eq!((e[1].1, e[1].2), (CHAR_DEVICE | 0o600, (5, 1)));
        assert_eq!((e[2].1, e[2].3.as_slice()), (FILE | 0o755, &b"12345"[..]));
        assert_eq!(e[4].3, vec![7u8; 4099]);
    }

    #[test]
    fn bad_paths_are_refused_by_name() {
        let mut w = Writer::new(Vec::new());
        let e = w.file("/", 0o644, b"").unwrap_err();
        assert!(e.to_string().contains("\"/\""), "{e}");
    }
}
