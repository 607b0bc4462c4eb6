//! A spawned child process owned by a test.
//!
//! Both `etcd` and the sidecar are real processes. Tests signal them
//! (SIGTERM for graceful shutdown, SIGKILL for a crash, SIGSTOP for a hang)
//! and must never leak them: dropping a [`ChildProcess`] resumes, kills and
//! reaps it. Its stdout and stderr go to a log file that tests can read and
//! that is printed (tail) when a test panics while the process is alive.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use super::wait::wait_for;

/// A child process with its output appended to a log file.
#[derive(Debug)]
pub struct ChildProcess {
    name: String,
    child: std::process::Child,
    log: PathBuf,
    status: Option<ExitStatus>,
    /// Print the log tail to stderr when dropped during a panic.
    pub dump_log_on_panic: bool,
}

impl ChildProcess {
    /// Spawns `cmd` with stdin closed and stdout + stderr appended to `log`.
    ///
    /// # Panics
    /// If the log cannot be opened or the program cannot be started.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> ChildProcess {
        let out = open_log(log);
        let err = out.try_clone().expect("clone log file handle");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot spawn {cmd:?}: {e}"));
        ChildProcess {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            status: None,
            dump_log_on_panic: true,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The path of the log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Sends signal `sig` (e.g. `libc::SIGTERM`). A no-op once the process
    /// has been reaped, so the pid can never hit an unrelated process.
    pub fn signal(&mut self, sig: i32) {
        if self.try_status().is_some() {
            return;
        }
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our
        // unreaped child, so it cannot have been recycled.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, sig) };
        assert_eq!(
            rc,
            0,
            "{}: kill({sig}) failed: {}",
            self.name,
            std::io::Error::last_os_error()
        );
    }

    /// The exit status if the process has exited (reaping it), else `None`.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Waits up to `timeout` for the process to exit.
    ///
    /// # Panics
    /// On timeout, with the tail of the log.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let what = format!("{} (pid {}) to exit", self.name, self.pid());
        match wait_for(&what, timeout, || std::future::ready(self.try_status())).await {
            Ok(status) => status,
            Err(t) => panic!(
                "{t}\n--- last 60 lines of {} ---\n{}",
                self.name,
                self.log_tail(60)
            ),
        }
    }

    /// SIGCONT (in case it is stopped), SIGKILL, and reap.
    pub fn kill_and_reap(&mut self) -> ExitStatus {
        if let Some(status) = self.try_status() {
            return status;
        }
        self.signal(libc::SIGCONT);
        self.signal(libc::SIGKILL);
        let status = self.child.wait().expect("wait for killed child");
        self.status = Some(status);
        status
    }

    /// The whole log so far (lossy UTF-8; empty if unreadable).
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log(), n)
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let was_running = self.try_status().is_none();
        self.kill_and_reap();
        if std::thread::panicking() && self.dump_log_on_panic && was_running {
            eprintln!(
                "--- {} log (last 60 lines) ---\n{}",
                self.name,
                self.log_tail(60)
            );
        }
    }
}

/// Opens `path` for appending, creating it.
pub fn open_log(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log {}: {e}", path.display()))
}

/// Reads a file as lossy UTF-8; a missing file reads as empty.
pub fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Looks `program` up in the directories of `path_var` (a `PATH`-style list),
/// then in `fallbacks`; returns the first existing file.
pub fn find_program(
    program: &str,
    path_var: Option<&std::ffi::OsStr>,
    fallbacks: &[&Path],
) -> Option<PathBuf> {
    let from_path = path_var
        .into_iter()
        .flat_map(std::env::split_paths)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(program));
    from_path
        .chain(fallbacks.iter().map(|p| p.to_path_buf()))
        .find(|p| p.is_file())
}
