//! Every process an attempt starts ends with the attempt, even one that left its process group
//! (`setsid sleep 600 &`, a daemonizing program).
//!
//! Two mechanisms, chosen once at worker start (`worker.containment`):
//!
//! - **cgroup** (v2): each attempt runs in its own cgroup, a child of the worker's
//!   (`<worker's cgroup>/fleet-worker-<pid>/attempt-<n>`). The attempt's process is moved
//!   there between clone and exec (`super::spawn`), so everything it starts is inside, wherever
//!   it moves in the process tree. At the end the cgroup is killed (`cgroup.kill`, or SIGKILL
//!   to every pid in `cgroup.procs` on kernels before 5.14) and, once empty, kept for the next
//!   attempt (removed when the worker stops). Needs a writable cgroup v2
//!   tree: root, or systemd's `Delegate=yes` (the shipped worker unit sets it). `auto` picks it
//!   when creating the worker's cgroup works.
//! - **subreaper**: the worker marks itself `PR_SET_CHILD_SUBREAPER`, so an attempt's orphans
//!   are re-parented to the worker instead of init. At the end, every descendant of the worker
//!   whose environment carries the attempt's `FLEET_FENCING_TOKEN` is killed (and reaped).
//!   Works without privileges; a process that clears its environment (`env -i`) escapes it.
//!
//! Either way, escaped processes get SIGTERM with the process group when an attempt is stopped
//! (timeout, cancel, fencing), and SIGKILL once the attempt is over.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Which mechanism a worker uses (`worker.containment`).
#[derive(Debug)]
pub enum Containment {
    Cgroup {
        dir: PathBuf,
        pool: Mutex<CgroupPool>,
    },
    Subreaper,
}

/// Empty attempt cgroups kept for the next attempts: creating and removing a cgroup per
/// attempt was a tenth of the worker's CPU per no-op task (perf: `cgroup_mkdir`,
/// `cgroup_rmdir`).
#[derive(Debug, Default)]
pub struct CgroupPool {
    free: Vec<AttemptCgroup>,
    /// Attempt cgroups created so far (names them).
    created: u64,
}

/// What an attempt (or a persistent executor process) holds for its containment.
#[derive(Debug)]
pub struct Contained {
    /// The environment entry every process of it inherits (`FLEET_FENCING_TOKEN=<token>` for
    /// an attempt, `FLEET_EXECUTOR_ID=<id>` for a persistent executor): how the subreaper
    /// mechanism finds them.
    pub mark: String,
    /// The attempt's cgroup (cgroup mechanism only).
    cgroup: Option<AttemptCgroup>,
}

/// An attempt cgroup and its `cgroup.procs`, kept open for the attempts that reuse it.
#[derive(Debug)]
struct AttemptCgroup {
    dir: PathBuf,
    procs: std::fs::File,
}

impl Contained {
    /// The fd the attempt's process writes to move into its cgroup (`spawn::Request`).
    pub fn cgroup_procs(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd as _;
        self.cgroup.as_ref().map(|c| c.procs.as_raw_fd())
    }
}

/// Attempt leaders the worker is running (pid): the subreaper must not reap them, tokio does.
static LEADERS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

impl Containment {
    /// Sets up `choice` (`auto`, `cgroup` or `subreaper`). `cgroup` fails with the reason when
    /// the cgroup tree is not writable; `auto` falls back to the subreaper.
    pub fn setup(choice: &str) -> anyhow::Result<Containment> {
        match choice {
            "subreaper" => subreaper(),
            "cgroup" => worker_cgroup().map(Containment::cgroup),
            _ => match worker_cgroup() {
                Ok(dir) => Ok(Containment::cgroup(dir)),
                Err(e) => {
                    tracing::info!(reason = %e, "no writable cgroup v2 tree; attempts are contained with PR_SET_CHILD_SUBREAPER");
                    subreaper()
                }
            },
        }
    }

    fn cgroup(dir: PathBuf) -> Containment {
        Containment::Cgroup {
            dir,
            pool: Mutex::default(),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Containment::Cgroup { .. } => "cgroup",
            Containment::Subreaper => "subreaper",
        }
    }

    /// Prepares an attempt so that everything it starts can be found again. For a cgroup:
    /// takes an empty attempt cgroup from the pool (or creates one) and opens its
    /// `cgroup.procs`, which the child writes between clone and exec (`spawn`) to move in.
    pub fn prepare(&self, mark: String) -> std::io::Result<Contained> {
        let Containment::Cgroup { dir, pool } = self else {
            return Ok(Contained { mark, cgroup: None });
        };
        // One lock, released before any file system call.
        let (free, n) = {
            let mut p = pool.lock().expect("cgroup pool lock");
            match p.free.pop() {
                Some(cg) => (Some(cg), 0),
                None => {
                    p.created += 1;
                    (None, p.created)
                }
            }
        };
        let cg = match free {
            Some(cg) => cg,
            None => {
                let cg = dir.join(format!("attempt-{n}"));
                match std::fs::create_dir(&cg) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
                match std::fs::OpenOptions::new()
                    .write(true)
                    .open(cg.join("cgroup.procs"))
                {
                    Ok(procs) => AttemptCgroup { dir: cg, procs },
                    Err(e) => {
                        let _ = std::fs::remove_dir(&cg);
                        return Err(e);
                    }
                }
            }
        };
        Ok(Contained {
            mark,
            cgroup: Some(cg),
        })
    }

    /// Starts the attempt's process with `start` and records it (the subreaper must leave it to
    /// the attempt). The record is taken under the lock [`reap_orphans`] holds, so a leader
    /// that exits at once is never mistaken for an orphan.
    pub fn spawn(
        &self,
        start: impl FnOnce() -> std::io::Result<super::spawn::Spawned>,
    ) -> std::io::Result<super::spawn::Spawned> {
        let mut leaders = LEADERS.lock().expect("leaders lock");
        let child = start()?;
        leaders.push(child.process.id());
        Ok(child)
    }

    /// Gives back what [`Containment::prepare`] took for an attempt that never started.
    pub fn release(&self, c: Contained) {
        if let (Some(cg), Containment::Cgroup { pool, .. }) = (c.cgroup, self) {
            pool.lock().expect("cgroup pool lock").free.push(cg);
        }
    }

    /// Sends `sig` to every process of the attempt outside its process group's reach as well.
    pub fn signal(&self, c: &Contained, sig: i32) {
        for pid in self.members(c) {
            // SAFETY: signals a process of this attempt.
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// The attempt is over (its process was waited for): kills whatever it left behind, reaps
    /// it, and removes its cgroup. Bounded: a process that keeps forking faster than it is
    /// killed is given up on after a few rounds (and logged).
    pub async fn end(&self, c: Contained, leader: Option<u32>) {
        if let Some(pid) = leader {
            LEADERS.lock().expect("leaders lock").retain(|p| *p != pid);
        }
        for _ in 0..END_ROUNDS {
            let left = self.members(&c);
            if left.is_empty() {
                break;
            }
            match &c.cgroup {
                Some(cg) if std::fs::write(cg.dir.join("cgroup.kill"), "1").is_ok() => {}
                _ => self.signal(&c, libc::SIGKILL),
            }
            if matches!(self, Containment::Subreaper) {
                reap(&left);
            }
            // The kernel needs a moment to tear a killed process down (pacing, not sync).
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        if matches!(self, Containment::Subreaper) {
            reap_orphans();
        }
        if let (Some(cg), Containment::Cgroup { pool, .. }) = (c.cgroup, self) {
            if members_of(&cg.dir).is_empty() {
                // Empty: the next attempt reuses it.
                pool.lock().expect("cgroup pool lock").free.push(cg);
            } else if let Err(e) = std::fs::remove_dir(&cg.dir) {
                tracing::warn!(cgroup = %cg.dir.display(), error = %e, "cannot remove the attempt's cgroup");
            }
        }
    }

    /// The attempt's processes still alive.
    fn members(&self, c: &Contained) -> Vec<i32> {
        match &c.cgroup {
            Some(cg) => members_of(&cg.dir),
            None => descendants_marked(std::process::id() as i32, &c.mark),
        }
    }
}

/// The processes in cgroup `cg`.
fn members_of(cg: &Path) -> Vec<i32> {
    std::fs::read_to_string(cg.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Rounds of kill-and-check at the end of an attempt.
const END_ROUNDS: usize = 50;

fn subreaper() -> anyhow::Result<Containment> {
    // SAFETY: prctl on this process.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) } != 0 {
        anyhow::bail!(
            "cannot become a child subreaper: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(Containment::Subreaper)
}

/// Creates this worker's cgroup (`fleet-worker-<pid>` under its own), after removing those of
/// dead workers (killing what they left running: attempts of a dead worker are unfenced).
fn worker_cgroup() -> anyhow::Result<PathBuf> {
    let mount =
        cgroup2_mount().ok_or_else(|| anyhow::anyhow!("no cgroup v2 file system is mounted"))?;
    let own = std::fs::read_to_string("/proc/self/cgroup")?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        .ok_or_else(|| anyhow::anyhow!("this process is in no cgroup v2 group"))?;
    let parent = mount.join(own.trim_start_matches('/'));
    sweep_dead_workers(&parent);
    let dir = parent.join(format!("fleet-worker-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("cannot create the cgroup {}: {e}", dir.display()))?;
    // Prove that processes can be moved in: a probe cgroup taking this very thread would
    // change the worker's own cgroup, so only the write permission of cgroup.procs is checked.
    let probe = dir.join("cgroup.procs");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&probe)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", probe.display()))?;
    Ok(dir)
}

fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next()? == "cgroup2")
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// Removes `fleet-worker-<pid>` cgroups whose worker is gone, killing what is left in them.
fn sweep_dead_workers(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("fleet-worker-")
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only asks whether the process exists.
        if pid == std::process::id() as i32 || unsafe { libc::kill(pid, 0) } == 0 {
            continue;
        }
        let dir = e.path();
        if let Ok(attempts) = std::fs::read_dir(&dir) {
            for a in attempts.flatten().filter(|a| a.path().is_dir()) {
                let _ = std::fs::write(a.path().join("cgroup.kill"), "1");
                let _ = std::fs::remove_dir(a.path());
            }
        }
        if std::fs::remove_dir(&dir).is_ok() {
            tracing::info!(cgroup = %dir.display(), "removed the cgroup of a dead worker");
        }
    }
}

/// Descendants of `root` whose environment holds the entry `needle` (`KEY=value`).
fn descendants_marked(root: i32, needle: &str) -> Vec<i32> {
    descendants(root)
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|b| *b == 0).any(|v| v == needle.as_bytes()))
                .unwrap_or(false)
        })
        .collect()
}

/// Every process below `root` in the process tree (from /proc).
fn descendants(root: i32) -> Vec<i32> {
    let mut parent_of: Vec<(i32, i32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Some(ppid) = ppid_of(pid) {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (child, _) in parent_of.iter().filter(|(_, pp)| *pp == p) {
            out.push(*child);
            frontier.push(*child);
        }
    }
    out
}

fn ppid_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Reaps the given processes if they are the worker's (re-parented) children.
fn reap(pids: &[i32]) {
    for pid in pids {
        let mut status = 0;
        // SAFETY: waitpid on a specific pid, never -1: tokio reaps its own children itself.
        unsafe { libc::waitpid(*pid, &mut status, libc::WNOHANG) };
    }
}

/// Reaps re-parented orphans that exited on their own (zombies), leaving attempt leaders to
/// tokio.
fn reap_orphans() {
    let me = std::process::id() as i32;
    let leaders = LEADERS.lock().expect("leaders lock");
    let zombies: Vec<i32> = descendants(me)
        .into_iter()
        .filter(|pid| ppid_of(*pid) == Some(me) && !leaders.contains(&(*pid as u32)))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rfind(')')
                        .and_then(|i| s[i + 2..].split_whitespace().next().map(|f| f == "Z"))
                })
                .unwrap_or(false)
        })
        .collect();
    reap(&zombies);
}

impl Drop for Containment {
    /// Removes this worker's cgroup when the worker stops (empty once every attempt ended).
    fn drop(&mut self) {
        if let Containment::Cgroup { dir, pool } = self {
            for cg in pool.get_mut().expect("cgroup pool lock").free.drain(..) {
                let _ = std::fs::remove_dir(cg.dir);
            }
            let _ = std::fs::remove_dir(dir);
        }
    }
}
