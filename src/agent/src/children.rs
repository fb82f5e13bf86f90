//! The commands the agent started, and who reaps them.
//!
//! Under an init, each session waits for its own command. As PID 1 the agent also inherits
//! every orphan in the guest, so one reaper thread collects every child and hands the statuses
//! of session commands to their sessions. Either way a pid is signalled only while it is
//! registered and not yet reaped, under the same lock the reaping takes, so a signal can never
//! reach a process that reused the pid.

use crate::proto::Exited;
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal as NixSignal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The agent's children.
#[derive(Default)]
pub struct Children {
    /// Registered commands: `None` while running, their status once reaped.
    running: Mutex<HashMap<i32, Option<Exited>>>,
    /// Signalled when a status arrives or a child is started.
    changed: Condvar,
    /// Whether a reaper thread collects every child (PID 1).
    reaper: bool,
}

fn exited(status: WaitStatus) -> Exited {
    match status {
        WaitStatus::Exited(_, code) => Exited {
            code: Some(code),
            signal: None,
        },
        WaitStatus::Signaled(_, sig, _) => Exited {
            code: None,
            signal: Some(sig as i32),
        },
        _ => Exited {
            code: None,
            signal: None,
        },
    }
}

impl Children {
    /// Each session reaps its own command (the agent runs under another init, or in tests).
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A reaper thread collects every child, orphans included (the agent is PID 1).
    pub fn with_reaper() -> std::io::Result<Arc<Self>> {
        let children = Arc::new(Self {
            reaper: true,
            ..Self::default()
        });
        let c = children.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || c.reap_forever())?;
        Ok(children)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i32, Option<Exited>>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts `cmd` and registers it. The lock is held across the fork, so the reaper cannot
    /// collect the child before it is known.
    pub fn spawn(&self, cmd: &mut Command) -> std::io::Result<Child> {
        let mut running = self.lock();
        let child = cmd.spawn()?;
        running.insert(child.id() as i32, None);
        self.changed.notify_all();
        Ok(child)
    }

    /// Sends `signal` to the registered command `pid` if it has not been reaped.
    pub fn signal(&self, pid: u32, signal: i32) {
        let running = self.lock();
        if matches!(running.get(&(pid as i32)), Some(None)) {
            if let Ok(sig) = NixSignal::try_from(signal) {
                let _ = kill(Pid::from_raw(pid as i32), sig);
            }
        }
    }

    /// Waits for the registered command `pid` to end, and forgets it.
    pub fn wait(&self, pid: u32) -> Exited {
        let pid = pid as i32;
        if !self.reaper {
            // Wait without reaping, then reap under the lock that signals take.
            while let Err(Errno::EINTR) = waitid(
                Id::Pid(Pid::from_raw(pid)),
                WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
            ) {}
            let mut running = self.lock();
            let status = waitpid(Pid::from_raw(pid), None).map(exited);
            running.remove(&pid);
            return status.unwrap_or(Exited {
                code: None,
                signal: None,
            });
        }
        let mut running = self.lock();
        loop {
            if let Some(Some(status)) = running.get(&pid) {
                let status = *status;
                running.remove(&pid);
                return status;
            }
            running = self
                .changed
                .wait(running)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// PID 1's reaper: collects every child as it ends.
    fn reap_forever(&self) {
        loop {
            match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    let mut running = self.lock();
                    let status = waitpid(pid, Some(WaitPidFlag::WNOHANG));
                    if let (Some(slot), Ok(status)) = (running.get_mut(&pid.as_raw()), status) {
                        *slot = Some(exited(status));
                        self.changed.notify_all();
                    }
                }
                Err(Errno::EINTR) => {}
                // No children at all: none can become an orphan of ours until a session
                // starts one, so sleep until one is registered (under the lock spawn holds).
                Err(_) => {
                    let running = self.lock();
                    if !running.values().any(Option::is_none) {
                        drop(self.changed.wait(running));
                    }
                }
            }
        }
    }
}
