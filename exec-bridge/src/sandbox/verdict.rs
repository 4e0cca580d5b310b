//! The verdict of a run that ended by itself, told from GNU `time`'s report (which both
//! sandboxes write the same way) and the exit status of the sandbox around it.

use std::process::ExitStatus;
use std::time::Duration;

use crate::job::{Limits, TimeLimit, Verdict};

const SIGKILL: i32 = 9;
const SIGXCPU: i32 = 24;

/// What GNU `time` wrote about the program.
#[derive(Debug, PartialEq)]
struct Report {
    signal: Option<i32>,
    code: i32,
    cpu: Duration,
    max_resident_bytes: u64,
}

fn parse_report(text: &str) -> Option<Report> {
    let signal = text
        .lines()
        .find_map(|line| line.strip_prefix("Command terminated by signal "))
        .and_then(|n| n.trim().parse().ok());
    let mut fields = text.lines().last()?.split_whitespace();
    let code = fields.next()?.parse().ok()?;
    let user: f64 = fields.next()?.parse().ok()?;
    let system: f64 = fields.next()?.parse().ok()?;
    let max_resident_kib: u64 = fields.next()?.parse().ok()?;
    let cpu = Duration::try_from_secs_f64(user + system).ok()?;
    Some(Report { signal, code, cpu, max_resident_bytes: max_resident_kib * 1024 })
}

/// The verdict of a run that ended by itself, from bwrap's status and `time`'s report.
pub(crate) fn judge(status: ExitStatus, report: &str, limits: &Limits) -> Verdict {
    let Some(report) = parse_report(report) else {
        // `time` never ran (bwrap failed to set up, which it explains on stderr) or the
        // program mangled the report: fall back on bwrap's status, 128+N meaning signal N.
        return match status.code() {
            Some(code) if code > 128 => Verdict::Signaled { signal: code - 128 },
            Some(code) => Verdict::Exited { code },
            None => Verdict::Signaled { signal: std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0) },
        };
    };
    let near_memory_limit = report.max_resident_bytes >= limits.memory_bytes / 4 * 3;
    match report.signal {
        Some(SIGXCPU) => Verdict::TimeLimit(TimeLimit::Cpu),
        Some(SIGKILL) if report.cpu >= limits.cpu_time => Verdict::TimeLimit(TimeLimit::Cpu),
        Some(_) if near_memory_limit => Verdict::MemoryLimit,
        Some(signal) => Verdict::Signaled { signal },
        // A shell (`sh -c` of the project's `run` setting) reports its child's death by signal N
        // as exit code 128+N; with the CPU time used, SIGXCPU or SIGKILL is the CPU limit.
        // (`time` rounds the CPU seconds it reports, so a tenth of the limit is allowed for.)
        None if cpu_killed_child(report.code) && report.cpu >= limits.cpu_time.mul_f64(0.9) => {
            Verdict::TimeLimit(TimeLimit::Cpu)
        }
        None if report.code != 0 && near_memory_limit => Verdict::MemoryLimit,
        None => Verdict::Exited { code: report.code },
    }
}

/// Whether `code` is how a shell reports a child killed by the CPU time limit's signals.
fn cpu_killed_child(code: i32) -> bool {
    code == 128 + SIGXCPU || code == 128 + SIGKILL
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    fn check(report: &str, expected: Verdict) {
        let limits = Limits::default();
        assert_eq!(judge(ExitStatus::from_raw(0), report, &limits), expected, "report {report:?}");
    }

    #[test]
    fn judges_time_reports() {
        check("0 0.01 0.00 9000\n", Verdict::Exited { code: 0 });
        check("Command exited with non-zero status 139\n139 0.01 0.00 9000\n", Verdict::Exited { code: 139 });
        check("Command terminated by signal 11\n0 0.01 0.00 9000\n", Verdict::Signaled { signal: 11 });
        check("Command terminated by signal 24\n0 5.00 0.00 9000\n", Verdict::TimeLimit(TimeLimit::Cpu));
        check("Command terminated by signal 9\n0 5.90 0.10 9000\n", Verdict::TimeLimit(TimeLimit::Cpu));
        check("Command terminated by signal 9\n0 0.10 0.10 9000\n", Verdict::Signaled { signal: 9 });
        check("Command exited with non-zero status 1\n1 0.20 0.10 250000\n", Verdict::MemoryLimit);
        check("Command terminated by signal 11\n0 0.20 0.10 250000\n", Verdict::MemoryLimit);
        check("0 0.20 0.10 250000\n", Verdict::Exited { code: 0 });
        // Through a shell: its child's SIGXCPU (or the SIGKILL after it) as 128+N.
        check("Command exited with non-zero status 152\n152 5.01 0.00 9000\n", Verdict::TimeLimit(TimeLimit::Cpu));
        check("Command exited with non-zero status 137\n137 6.00 0.00 9000\n", Verdict::TimeLimit(TimeLimit::Cpu));
        check("Command exited with non-zero status 152\n152 0.01 0.00 9000\n", Verdict::Exited { code: 152 });
    }

    #[test]
    fn falls_back_on_bwrap_status_without_a_report() {
        let limits = Limits::default();
        assert_eq!(judge(ExitStatus::from_raw(139 << 8), "", &limits), Verdict::Signaled { signal: 11 });
        assert_eq!(judge(ExitStatus::from_raw(1 << 8), "garbage", &limits), Verdict::Exited { code: 1 });
    }
}
