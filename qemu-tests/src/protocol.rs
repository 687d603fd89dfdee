//! The lines the in-VM driver prints on the serial console and the host parses.
//! Every line starts with [`PREFIX`] so kernel messages interleaved on the same
//! console are told apart:
//!
//! ```text
//! MBE-VM BEGIN kernel=6.1.0-56-arm64 arch=aarch64
//! MBE-VM RESULT PASS outbound-redirect who=b-app orig=10.231.0.3:8080
//! MBE-VM RESULT FAIL inbound-redirect sidecar b saw no connection
//! MBE-VM DETAIL inbound-redirect <one line of the failing check's output>
//! MBE-VM VERIFIER <one line of a verifier log>
//! MBE-VM SUMMARY 7 passed, 1 failed
//! ```

/// What every protocol line starts with.
pub const PREFIX: &str = "MBE-VM ";

/// The first line: the kernel release and machine (`uname -r`, `uname -m`).
pub fn begin_line(kernel: &str, arch: &str) -> String {
    format!("{PREFIX}BEGIN kernel={kernel} arch={arch}")
}

/// The result of one check; `summary` is a single line (newlines become spaces).
pub fn result_line(name: &str, passed: bool, summary: &str) -> String {
    let verdict = if passed { "PASS" } else { "FAIL" };
    format!("{PREFIX}RESULT {verdict} {name} {}", one_line(summary))
}

/// One line of output belonging to check `name` (printed for failures).
pub fn detail_line(name: &str, text: &str) -> String {
    format!("{PREFIX}DETAIL {name} {}", one_line(text))
}

/// One line of a verifier log.
pub fn verifier_line(text: &str) -> String {
    format!("{PREFIX}VERIFIER {}", one_line(text))
}

/// The last line.
pub fn summary_line(passed: usize, failed: usize) -> String {
    format!("{PREFIX}SUMMARY {passed} passed, {failed} failed")
}

fn one_line(s: &str) -> String {
    s.replace(['\r', '\n'], " ").trim_end().to_string()
}

/// One check's outcome as parsed from the console.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckResult {
    /// Check name, like `outbound-redirect`.
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// Its one-line summary.
    pub summary: String,
    /// Lines of output printed for it (failures only).
    pub details: Vec<String>,
}

/// Everything a VM said, parsed from its serial output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmOutput {
    /// `kernel=` of the BEGIN line, when the driver got that far.
    pub kernel: Option<String>,
    /// `arch=` of the BEGIN line.
    pub arch: Option<String>,
    /// The checks, in order.
    pub checks: Vec<CheckResult>,
    /// Verifier log lines.
    pub verifier: Vec<String>,
    /// The SUMMARY counts (passed, failed), when the driver got that far.
    pub summary: Option<(usize, usize)>,
}

impl VmOutput {
    /// Checks that passed.
    pub fn passed(&self) -> usize {
        self.checks.iter().filter(|c| c.passed).count()
    }

    /// Checks that failed.
    pub fn failed(&self) -> usize {
        self.checks.iter().filter(|c| !c.passed).count()
    }

    /// A complete, consistent run: BEGIN and SUMMARY seen, the SUMMARY agrees with the
    /// RESULT lines, at least one check and none failed.
    pub fn all_passed(&self) -> bool {
        self.kernel.is_some()
            && self.summary == Some((self.passed(), self.failed()))
            && self.failed() == 0
            && !self.checks.is_empty()
    }

    /// Feeds one console line (anything without [`PREFIX`] is ignored).
    pub fn feed(&mut self, raw: &str) {
        let Some(at) = raw.find(PREFIX) else { return };
        let line = raw[at + PREFIX.len()..].trim_end_matches(['\r', '\n']);
        let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
        match kind {
            "BEGIN" => {
                for kv in rest.split_whitespace() {
                    match kv.split_once('=') {
                        Some(("kernel", v)) => self.kernel = Some(v.to_string()),
                        Some(("arch", v)) => self.arch = Some(v.to_string()),
                        _ => {}
                    }
                }
            }
            "RESULT" => {
                let mut parts = rest.splitn(3, ' ');
                let verdict = parts.next().unwrap_or("");
                let name = parts.next().unwrap_or("").to_string();
                let summary = parts.next().unwrap_or("").to_string();
                if name.is_empty() || !matches!(verdict, "PASS" | "FAIL") {
                    return;
                }
                self.checks.push(CheckResult {
                    name,
                    passed: verdict == "PASS",
                    summary,
                    details: vec![],
                });
            }
            "DETAIL" => {
                let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
                // Details follow their RESULT line; attach to the latest check of that name.
                if let Some(c) = self.checks.iter_mut().rev().find(|c| c.name == name) {
                    c.details.push(text.to_string());
                }
            }
            "VERIFIER" => self.verifier.push(rest.to_string()),
            "SUMMARY" => self.summary = parse_summary(rest),
            _ => {}
        }
    }

    /// Parses a whole console transcript.
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for line in text.lines() {
            out.feed(line);
        }
        out
    }
}

/// `"7 passed, 1 failed"` → (7, 1).
pub fn parse_summary(s: &str) -> Option<(usize, usize)> {
    let (p, f) = s.trim().split_once(", ")?;
    let passed = p.strip_suffix(" passed")?.parse().ok()?;
    let failed = f.strip_suffix(" failed")?.parse().ok()?;
    Some((passed, failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transcript_with_kernel_noise_parses() {
        let text = [
            "[    0.000000] Booting Linux on physical CPU 0x0",
            &begin_line("6.1.0-56-arm64", "aarch64"),
            &result_line("outbound-redirect", true, "who=b-app\norig=10.231.0.3:8080"),
            // A kernel message glued in front of ours on the same console line.
            &format!(
                "[    2.1] random: crng init done{}",
                result_line("inbound", false, "no line")
            ),
            &detail_line("inbound", "sidecar log: []"),
            &detail_line("inbound", "second line"),
            &verifier_line("0: (bf) r6 = r1"),
            &summary_line(1, 1),
            "[    3.0] reboot: Power down",
        ]
        .join("\r\n");
        let out = VmOutput::parse(&text);
        assert_eq!(out.kernel.as_deref(), Some("6.1.0-56-arm64"));
        assert_eq!(out.arch.as_deref(), Some("aarch64"));
        assert_eq!(out.checks.len(), 2);
        assert_eq!(out.checks[0].summary, "who=b-app orig=10.231.0.3:8080");
        assert!(out.checks[0].passed && !out.checks[1].passed);
        assert_eq!(out.checks[1].details, ["sidecar log: []", "second line"]);
        assert_eq!(out.verifier, ["0: (bf) r6 = r1"]);
        assert_eq!(out.summary, Some((1, 1)));
        assert!(!out.all_passed());
    }

    #[test]
    fn all_passed_needs_a_consistent_summary() {
        let mut out = VmOutput::parse(&format!(
            "{}\n{}\n",
            begin_line("k", "x86_64"),
            result_line("a", true, "")
        ));
        assert!(!out.all_passed(), "no SUMMARY: the VM died");
        out.feed(&summary_line(2, 0));
        assert!(!out.all_passed(), "SUMMARY disagrees with the RESULT lines");
        out.summary = Some((1, 0));
        assert!(out.all_passed());
        assert!(
            !VmOutput::parse(&summary_line(0, 0)).all_passed(),
            "no BEGIN"
        );
    }

    #[test]
    fn summaries_parse_strictly() {
        assert_eq!(parse_summary("7 passed, 0 failed"), Some((7, 0)));
        assert_eq!(parse_summary("7 passed 0 failed"), None);
        assert_eq!(parse_summary("x passed, 0 failed"), None);
    }

    #[test]
    fn malformed_lines_are_ignored() {
        let out = VmOutput::parse(
            "MBE-VM RESULT MAYBE x y\nMBE-VM RESULT PASS\nMBE-VM DETAIL nobody z\n",
        );
        assert!(out.checks.is_empty());
    }
}
