//! Booting one kernel with its initramfs under qemu (TCG) with a hard timeout,
//! collecting the serial console.
use std::{
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::{kernels::Arch, protocol::VmOutput};

/// The qemu command line for `arch` (TCG: /dev/kvm is not usable on the CI machines).
/// `-no-reboot` with `panic=-1` makes qemu exit even if /init dies.
pub fn command(arch: Arch, vmlinuz: &Path, initrd: &Path, memory_mb: u32) -> Command {
    let (binary, machine, cpu, console) = match arch {
        // `-cpu max` is twice as slow as cortex-a57 under TCG.
        Arch::Arm64 => ("qemu-system-aarch64", "virt", "cortex-a57", "ttyAMA0"),
        Arch::Amd64 => ("qemu-system-x86_64", "q35", "max", "ttyS0"),
    };
    let mut cmd = Command::new(binary);
    cmd.args(["-machine", machine, "-accel", "tcg", "-cpu", cpu])
        .args(["-m", &format!("{memory_mb}M")])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &format!("console={console} panic=-1 quiet")])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
            "-display",
            "none",
        ]);
    cmd
}

/// What one boot gave.
#[derive(Debug)]
pub struct Boot {
    /// The whole serial console (CR removed).
    pub transcript: String,
    /// The protocol lines in it.
    pub output: VmOutput,
    /// Seconds from starting qemu to the driver's first line (kernel boot), if it came.
    pub boot_secs: Option<f64>,
    /// Seconds from starting qemu until it exited or was killed.
    pub total_secs: f64,
    /// qemu was killed at the timeout.
    pub timed_out: bool,
    /// qemu's own messages (stderr), if any.
    pub qemu_stderr: String,
}

/// Runs `cmd` (a [`command`]) to completion or until `timeout`, whichever is first.
pub fn boot(mut cmd: Command, timeout: Duration) -> Result<Boot> {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let mut stderr = child.stderr.take().context("qemu stderr")?;
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        while matches!(r.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            let line = String::from_utf8_lossy(&buf).replace('\r', "");
            if tx
                .send((Instant::now(), line.trim_end_matches('\n').to_string()))
                .is_err()
            {
                break;
            }
            buf.clear();
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = started + timeout;
    let mut out = Boot {
        transcript: String::new(),
        output: VmOutput::default(),
        boot_secs: None,
        total_secs: 0.0,
        timed_out: false,
        qemu_stderr: String::new(),
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, line)) => {
                out.output.feed(&line);
                if out.boot_secs.is_none() && out.output.kernel.is_some() {
                    out.boot_secs = Some((at - started).as_secs_f64());
                }
                out.transcript.push_str(&line);
                out.transcript.push('\n');
            }
            // qemu closed the console: it exited.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                out.timed_out = true;
                let _ = child.kill();
                break;
            }
        }
    }
    let _ = child.wait();
    out.total_secs = started.elapsed().as_secs_f64();
    out.qemu_stderr = err_reader.join().unwrap_or_default();
    Ok(out)
}
