//! The matrix table and, for failures, what went wrong: failing checks with their
//! output, verifier logs, the console tail of a VM that did not finish.
use std::fmt::Write as _;

use crate::{kernels::Arch, qemu::Boot};

/// One kernel's row.
pub struct Row<'a> {
    /// Package and version booted.
    pub kernel: String,
    /// Its architecture.
    pub arch: Arch,
    /// What the boot gave.
    pub boot: &'a Boot,
}

impl Row<'_> {
    /// Everything passed: the VM finished, its summary agrees, no check failed.
    pub fn ok(&self) -> bool {
        !self.boot.timed_out && self.boot.output.all_passed()
    }

    fn status(&self) -> &'static str {
        let o = &self.boot.output;
        if self.ok() {
            "ok"
        } else if self.boot.timed_out {
            "TIMEOUT"
        } else if o.kernel.is_none() {
            "NO BOOT"
        } else if o.summary.is_none() {
            "DIED"
        } else {
            "FAIL"
        }
    }
}

/// The table: kernel, arch, boot time, total time, checks passed/failed, verifier
/// errors, status.
pub fn table(rows: &[Row]) -> String {
    let header = [
        "kernel", "arch", "boot s", "total s", "passed", "failed", "verifier", "status",
    ];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            let o = &r.boot.output;
            [
                r.kernel.clone(),
                r.arch.to_string(),
                r.boot.boot_secs.map_or("-".into(), |s| format!("{s:.1}")),
                format!("{:.1}", r.boot.total_secs),
                o.passed().to_string(),
                o.failed().to_string(),
                if o.verifier.is_empty() {
                    "none".into()
                } else {
                    format!("{} lines", o.verifier.len())
                },
                r.status().to_string(),
            ]
        })
        .collect();
    let mut width = header.map(str::len);
    for c in &cells {
        for (w, s) in width.iter_mut().zip(c) {
            *w = (*w).max(s.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cols: Vec<&str>| {
        let text: Vec<String> = cols
            .iter()
            .zip(width)
            .map(|(s, w)| format!("{s:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(header.to_vec());
    line(
        width
            .iter()
            .map(|&w| &"------------------------------------------------------------------"[..w])
            .collect(),
    );
    for c in &cells {
        line(c.iter().map(String::as_str).collect());
    }
    out
}

/// What went wrong on the failing rows (empty when all passed).
pub fn failures(rows: &[Row]) -> String {
    let mut out = String::new();
    for r in rows.iter().filter(|r| !r.ok()) {
        let b = r.boot;
        let _ = writeln!(out, "=== {} ({}): {}", r.kernel, r.arch, r.status());
        for c in b.output.checks.iter().filter(|c| !c.passed) {
            let _ = writeln!(out, "FAIL {}: {}", c.name, c.summary);
            for d in &c.details {
                let _ = writeln!(out, "    {d}");
            }
        }
        if !b.output.verifier.is_empty() {
            let _ = writeln!(out, "verifier log:");
            for v in &b.output.verifier {
                let _ = writeln!(out, "    {v}");
            }
        }
        if b.timed_out || b.output.summary.is_none() {
            let _ = writeln!(
                out,
                "last console lines{}:",
                if b.timed_out {
                    " (killed at the timeout)"
                } else {
                    ""
                }
            );
            let lines: Vec<&str> = b.transcript.lines().collect();
            for l in &lines[lines.len().saturating_sub(40)..] {
                let _ = writeln!(out, "    {l}");
            }
        }
        if !b.qemu_stderr.trim().is_empty() {
            let _ = writeln!(out, "qemu said: {}", b.qemu_stderr.trim());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{
        VmOutput, begin_line, detail_line, result_line, summary_line, verifier_line,
    };

    fn boot(text: &str, timed_out: bool) -> Boot {
        Boot {
            transcript: text.into(),
            output: VmOutput::parse(text),
            boot_secs: Some(1.52),
            total_secs: 9.04,
            timed_out,
            qemu_stderr: String::new(),
        }
    }

    #[test]
    fn table_and_failure_report() {
        let good = boot(
            &[
                begin_line("k1", "aarch64"),
                result_line("a", true, "fine"),
                summary_line(1, 0),
            ]
            .join("\n"),
            false,
        );
        let bad = boot(
            &[
                begin_line("k2", "x86_64"),
                result_line("a", true, ""),
                result_line("agent-attaches", false, "agent exited"),
                detail_line("agent-attaches", "verifier rejected mb_connect4"),
                verifier_line("R1 invalid mem access"),
                summary_line(1, 1),
            ]
            .join("\n"),
            false,
        );
        let dead = boot("[ 1.0] Kernel panic - not syncing", true);
        let rows = [
            Row {
                kernel: "linux-image-a 1".into(),
                arch: Arch::Arm64,
                boot: &good,
            },
            Row {
                kernel: "linux-image-b 2".into(),
                arch: Arch::Amd64,
                boot: &bad,
            },
            Row {
                kernel: "linux-image-c 3".into(),
                arch: Arch::Amd64,
                boot: &dead,
            },
        ];
        let t = table(&rows);
        assert!(t.lines().next().unwrap().starts_with("kernel"), "{t}");
        let row = |k: &str| {
            t.lines()
                .find(|l| l.starts_with(k))
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            row("linux-image-a")[2..],
            ["arm64", "1.5", "9.0", "1", "0", "none", "ok"]
        );
        assert_eq!(row("linux-image-b")[6..], ["1", "1", "lines", "FAIL"]);
        assert_eq!(*row("linux-image-c").last().unwrap(), "TIMEOUT");
        assert!(rows[0].ok() && !rows[1].ok() && !rows[2].ok());
        let f = failures(&rows);
        assert!(!f.contains("linux-image-a"), "{f}");
        assert!(
            f.contains("FAIL agent-attaches: agent exited\n    verifier rejected mb_connect4"),
            "{f}"
        );
        assert!(
            f.contains("verifier log:\n    R1 invalid mem access"),
            "{f}"
        );
        assert!(
            f.contains("(killed at the timeout)") && f.contains("Kernel panic"),
            "{f}"
        );
    }
}
