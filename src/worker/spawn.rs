//! Starting an attempt's process without copying the worker's address space.
//!
//! Forking the worker (a multi-threaded process of tens of MiB) was more than half of the
//! worker's CPU per no-op task (perf: the page-table copy in `dup_mmap`, then copy-on-write
//! faults in both processes until the child's `exec`). std and tokio start children with
//! `posix_spawn` (vfork-like: the child borrows the parent's memory until it execs) only when
//! nothing must run between fork and exec, and an attempt needs three things there: its own
//! process group, `PR_SET_PDEATHSIG` (die with the worker) and, with cgroup containment, the
//! move into its cgroup. So this module does what glibc's `posix_spawn` does, with those steps:
//!
//! - everything the child needs (paths, argv, envp, fds) is prepared before the clone;
//! - the calling thread blocks every signal, then `clone(CLONE_VM | CLONE_VFORK |
//!   CLONE_PIDFD)` runs the child on its own stack, sharing the worker's memory; the calling
//!   thread is suspended until the child execs or exits;
//! - the child runs only system calls on that prepared memory (no allocation, no locks): into
//!   the cgroup, its own process group, the parent-death signal, its stdio, default signal
//!   dispositions and an empty mask, then `execve`. A failing step leaves its errno in the
//!   shared memory and `_exit(127)`s;
//! - the parent restores its signal mask and gets a pidfd, which [`Process::wait`] awaits and
//!   reaps with `waitid(P_PIDFD)`.
//!
//! The child's stdout and stderr are one pipe (the output tail is one stream anyway).
//!
//! The parent-death signal makes the kernel SIGKILL the attempt's process when the worker dies
//! (`kill -9`, a crash, the OOM killer): a dead worker cannot be fenced or heartbeat, so an
//! attempt that outlived it would run unfenced while its lease expires and another worker runs
//! the task again. Under systemd, the unit's `KillMode=mixed` also kills whatever the command
//! started when the worker dies; without systemd, only the command's own process is covered.
//! The kernel ties the signal to the *thread* that cloned: attempts are spawned from the
//! worker's async runtime threads, which live as long as the process.

use std::ffi::{c_char, c_int, c_void, CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use tokio::io::unix::AsyncFd;

/// What to start.
pub struct Request<'a> {
    pub program: &'a str,
    pub args: Vec<&'a str>,
    /// The complete environment of the child.
    pub env: Vec<(OsString, OsString)>,
    /// An fd of the attempt's `cgroup.procs`, opened for writing (cgroup containment).
    pub cgroup_procs: Option<RawFd>,
    pub stdio: Stdio,
}

/// How the child's standard streams are connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdio {
    /// stdin from `/dev/null`; stdout and stderr into one pipe (a one-shot attempt).
    Combined,
    /// Three pipes: stdin to write requests to, stdout to read results from, stderr for output
    /// (a persistent executor, [`super::persistent`]).
    Separate,
}

/// A started attempt process.
pub struct Spawned {
    pub process: Process,
    /// The read end of the child's stdout (and of its stderr with [`Stdio::Combined`]).
    pub output: OwnedFd,
    /// With [`Stdio::Separate`]: the write end of its stdin, the read end of its stderr.
    pub stdin: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// A child process, awaited through its pidfd.
pub struct Process {
    pid: u32,
    pidfd: AsyncFd<OwnedFd>,
    status: Option<ExitStatus>,
}

impl Process {
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// Whether the process has exited (reaping it then), without waiting.
    pub fn has_exited(&mut self) -> bool {
        if self.status.is_none() {
            if let Ok(Some(s)) = reap(self.pidfd.get_ref().as_raw_fd()) {
                self.status = Some(s);
            }
        }
        self.status.is_some()
    }

    /// Waits for the process to exit and reaps it. Returns the same status when called again.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(s) = self.status {
                return Ok(s);
            }
            let mut ready = self.pidfd.readable().await?;
            match reap(self.pidfd.get_ref().as_raw_fd())? {
                Some(s) => self.status = Some(s),
                None => ready.clear_ready(),
            }
        }
    }
}

/// `waitid(P_PIDFD, WEXITED | WNOHANG)`: the exit status once the process has exited.
fn reap(pidfd: RawFd) -> io::Result<Option<ExitStatus>> {
    // SAFETY: siginfo_t is plain data; waitid fills it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid filled the CLD_* fields (si_pid is 0 when nothing has exited yet).
    let (pid, code, status) = unsafe { (info.si_pid(), info.si_code, info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    // Back to the wait(2) encoding that ExitStatus reads.
    let raw = match code {
        libc::CLD_EXITED => (status & 0xff) << 8,
        libc::CLD_DUMPED => status | 0x80,
        _ => status,
    };
    Ok(Some(ExitStatus::from_raw(raw)))
}

/// Linux signals are 1..NSIG.
const NSIG: c_int = 65;

/// The steps of the child, for the error message of a failed start.
const STEPS: [&str; 6] = [
    "enter the attempt's cgroup",
    "create its process group",
    "set the parent-death signal",
    "connect its stdio",
    "reset its signal handling",
    "execute",
];

/// Shared between the parent and the child (the child writes `errno` and `step`).
#[repr(C)]
struct ChildArgs {
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    cgroup_procs: c_int,
    stdin: c_int,
    output: c_int,
    errout: c_int,
    worker_pid: libc::pid_t,
    errno: c_int,
    step: c_int,
}

/// Starts `req`. Must be called from a thread that lives as long as the worker (the kernel ties
/// the parent-death signal to the calling thread): the async runtime's worker threads.
pub fn spawn(req: &Request<'_>) -> io::Result<Spawned> {
    let (path, cached) = resolve(req.program, &req.env)?;
    match spawn_at(req, &path) {
        // The program moved since it was found: look it up again.
        Err((EXEC, e)) if cached && e.kind() == io::ErrorKind::NotFound => {
            forget(req.program);
            let (path, _) = resolve(req.program, &req.env)?;
            spawn_at(req, &path).map_err(|(_, e)| e)
        }
        r => r.map_err(|(_, e)| e),
    }
}

/// The index of the `execve` step in [`STEPS`].
const EXEC: usize = 5;

/// [`spawn`] of the program at `path`; a failure names the child's step that failed.
fn spawn_at(req: &Request<'_>, path: &Path) -> Result<Spawned, (usize, io::Error)> {
    let early = |e| (usize::MAX, e);
    let path = cstring(path.as_os_str()).map_err(early)?;
    let mut argv_owned = Vec::with_capacity(req.args.len() + 1);
    argv_owned.push(cstring(OsStr::new(req.program)).map_err(early)?);
    for a in &req.args {
        argv_owned.push(cstring(OsStr::new(a)).map_err(early)?);
    }
    let env_owned = req
        .env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.clone();
            kv.push("=");
            kv.push(v);
            cstring(&kv)
        })
        .collect::<io::Result<Vec<_>>>()
        .map_err(early)?;
    let argv = null_terminated(&argv_owned);
    let envp = null_terminated(&env_owned);
    let (read, write) = pipe().map_err(early)?;
    // The child's ends (dropped here once it has execed) and the worker's.
    let (child_in, child_err, parent_in, parent_err) = match req.stdio {
        Stdio::Combined => (None, None, None, None),
        Stdio::Separate => {
            let (in_r, in_w) = pipe().map_err(early)?;
            let (err_r, err_w) = pipe().map_err(early)?;
            (Some(in_r), Some(err_w), Some(in_w), Some(err_r))
        }
    };
    let stdin = match &child_in {
        Some(fd) => fd.as_raw_fd(),
        None => dev_null().map_err(early)?.as_raw_fd(),
    };
    let mut args = ChildArgs {
        path: path.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cgroup_procs: req.cgroup_procs.unwrap_or(-1),
        stdin,
        output: write.as_raw_fd(),
        errout: child_err
            .as_ref()
            .map_or(write.as_raw_fd(), |fd| fd.as_raw_fd()),
        worker_pid: std::process::id() as libc::pid_t,
        errno: 0,
        step: -1,
    };
    // The child's stack: it runs a handful of system calls.
    let mut stack = vec![0u8; 64 * 1024];
    // SAFETY: the top of `stack`, aligned down to 16 bytes as the ABI wants.
    let top = unsafe { stack.as_mut_ptr().add(stack.len()) } as usize & !15;
    let mut pidfd: c_int = -1;
    let pid = {
        let _blocked = BlockSignals::new();
        // SAFETY: the child runs `child_main` on its own stack with CLONE_VM: it reads `args`
        // and the buffers it points to (alive until this returns: CLONE_VFORK suspends this
        // thread until the child execs or exits), writes only `args.errno`/`args.step`, and
        // makes only system calls. Every signal is blocked meanwhile, so no handler of the
        // worker runs on the child's stack.
        unsafe {
            libc::clone(
                child_main,
                top as *mut c_void,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
                (&mut args as *mut ChildArgs).cast(),
                &mut pidfd as *mut c_int,
            )
        }
    };
    if pid < 0 {
        return Err(early(io::Error::last_os_error()));
    }
    // SAFETY: CLONE_PIDFD stored a new fd that this process owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    drop(write);
    drop(child_in);
    drop(child_err);
    if args.step >= 0 {
        // The child failed before exec and exited: reap it, then report why.
        let _ = reap(pidfd.as_raw_fd());
        let step = args.step as usize;
        let what = STEPS.get(step).copied().unwrap_or("start");
        let e = io::Error::from_raw_os_error(args.errno);
        return Err((
            step,
            io::Error::new(e.kind(), format!("cannot {what}: {e}")),
        ));
    }
    set_nonblocking(pidfd.as_raw_fd()).map_err(early)?;
    // SAFETY: an OwnedFd keeps its fd open, and names the same one, for its whole life.
    let pidfd = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
        .map_err(|e| early(e.into()))?;
    Ok(Spawned {
        process: Process {
            pid: pid as u32,
            pidfd,
            status: None,
        },
        output: read,
        stdin: parent_in,
        stderr: parent_err,
    })
}

/// The child, between clone and exec: system calls only.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the parent's `ChildArgs`, alive while the parent is suspended.
    let a = unsafe { &mut *(arg as *mut ChildArgs) };
    /// Leaves the failed step and its errno for the parent, and exits.
    unsafe fn fail(a: &mut ChildArgs, step: c_int) -> ! {
        a.errno = *libc::__errno_location();
        a.step = step;
        libc::_exit(127)
    }
    // SAFETY (the whole body): system calls on fds and memory prepared by the parent.
    unsafe {
        if a.cgroup_procs >= 0 && libc::write(a.cgroup_procs, b"0".as_ptr().cast(), 1) != 1 {
            fail(a, 0);
        }
        if libc::setpgid(0, 0) != 0 {
            fail(a, 1);
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            fail(a, 2);
        }
        // The worker may have died before the prctl: then nobody would signal us.
        if libc::getppid() != a.worker_pid {
            *libc::__errno_location() = libc::ESRCH;
            fail(a, 2);
        }
        if libc::dup2(a.stdin, 0) < 0 || libc::dup2(a.output, 1) < 0 || libc::dup2(a.errout, 2) < 0
        {
            fail(a, 3);
        }
        // Default dispositions (the worker ignores SIGPIPE; handlers are reset by exec anyway)
        // and an empty mask (the parent blocked everything around the clone).
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for sig in 1..NSIG {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                // Signals glibc reserves refuse the change (EINVAL); nothing to reset there.
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
            fail(a, 4);
        }
        libc::execve(a.path, a.argv, a.envp);
        fail(a, 5)
    }
}

/// Blocks every signal on this thread until dropped.
struct BlockSignals(libc::sigset_t);

impl BlockSignals {
    fn new() -> BlockSignals {
        // SAFETY: sigset_t is plain data; pthread_sigmask changes this thread's mask only.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            BlockSignals(old)
        }
    }
}

impl Drop for BlockSignals {
    fn drop(&mut self) {
        // SAFETY: restores this thread's mask saved in `new`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// `/dev/null` for every child's stdin, opened once (close-on-exec, as std opens every file).
fn dev_null() -> io::Result<&'static std::fs::File> {
    static NULL: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();
    if let Some(f) = NULL.get() {
        return Ok(f);
    }
    let f = std::fs::File::open("/dev/null")?;
    Ok(NULL.get_or_init(|| f))
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{:?} contains a NUL byte", s),
        )
    })
}

fn null_terminated(strings: &[CString]) -> Vec<*const c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: pipe2 fills two fds this process then owns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fds from pipe2.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd this process owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Programs found in `PATH` before, by name and the `PATH` searched: a search is a `stat`
/// and an `access` per directory tried, per attempt. An entry that no longer executes is
/// forgotten and searched again ([`spawn`]).
static FOUND: std::sync::Mutex<Option<std::collections::HashMap<(String, OsString), PathBuf>>> =
    std::sync::Mutex::new(None);

/// Bounds [`FOUND`]: past this many entries it starts over.
const FOUND_MAX: usize = 1024;

/// The program's path (and whether it came from [`FOUND`]): as given when it names a path,
/// else the first executable file of that name in the child's `PATH` (the worker's when the
/// child has none).
fn resolve(program: &str, env: &[(OsString, OsString)]) -> io::Result<(PathBuf, bool)> {
    if program.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the command is empty",
        ));
    }
    if program.contains('/') {
        return Ok((PathBuf::from(program), false));
    }
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .or_else(|| std::env::var_os("PATH"))
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let key = (program.to_string(), path);
    if let Some(p) = FOUND
        .lock()
        .expect("found lock")
        .as_ref()
        .and_then(|m| m.get(&key))
    {
        return Ok((p.clone(), true));
    }
    let found = std::env::split_paths(&key.1)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{program:?} was not found in PATH"),
            )
        })?;
    let mut cache = FOUND.lock().expect("found lock");
    let m = cache.get_or_insert_with(Default::default);
    if m.len() >= FOUND_MAX {
        m.clear();
    }
    m.insert(key, found.clone());
    Ok((found, false))
}

/// Forgets every `PATH` lookup of `program`.
fn forget(program: &str) {
    if let Some(m) = FOUND.lock().expect("found lock").as_mut() {
        m.retain(|(p, _), _| p != program);
    }
}

fn is_executable(p: &Path) -> bool {
    let Ok(c) = CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access(2) on a NUL-terminated path.
    p.is_file() && unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn env() -> Vec<(OsString, OsString)> {
        std::env::vars_os().collect()
    }

    async fn run(program: &str, args: &[&str]) -> (ExitStatus, String, u32) {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let s = spawn(&Request {
            program,
            args: args.iter().map(String::as_str).collect(),
            env: env(),
            cgroup_procs: None,
            stdio: Stdio::Combined,
        })
        .expect("spawn");
        let mut p = s.process;
        let mut out = tokio::net::unix::pipe::Receiver::from_owned_fd(s.output).unwrap();
        let mut text = String::new();
        out.read_to_string(&mut text).await.unwrap();
        (p.wait().await.unwrap(), text, p.id())
    }

    #[tokio::test]
    async fn runs_a_command_with_its_output_and_status() {
        let (s, out, _) = run("sh", &["-c", "echo out; echo err >&2; exit 3"]).await;
        assert_eq!(s.code(), Some(3));
        assert_eq!(out, "out\nerr\n");
        let (s, _, _) = run("true", &[]).await;
        assert!(s.success());
    }

    #[tokio::test]
    async fn the_child_leads_its_own_group_with_default_signals() {
        // Process group = own pid; SIGPIPE not ignored (field SigIgn of /proc/self/status).
        let (s, out, pid) = run(
            "sh",
            &[
                "-c",
                "cut -d' ' -f5 /proc/$$/stat; grep SigIgn /proc/$$/status",
            ],
        )
        .await;
        assert!(s.success(), "{out}");
        let mut lines = out.lines();
        assert_eq!(lines.next().unwrap(), pid.to_string(), "{out}");
        let ign = u64::from_str_radix(lines.next().unwrap().split_whitespace().nth(1).unwrap(), 16)
            .unwrap();
        assert_eq!(
            ign & (1 << (libc::SIGPIPE - 1)),
            0,
            "SIGPIPE is ignored: {out}"
        );
    }

    #[tokio::test]
    async fn a_signal_death_is_reported() {
        let (s, _, _) = run("sh", &["-c", "kill -9 $$"]).await;
        assert_eq!(s.signal(), Some(libc::SIGKILL));
        assert_eq!(s.code(), None);
    }

    #[tokio::test]
    async fn a_program_that_moved_is_looked_up_again() {
        use std::os::unix::fs::PermissionsExt;
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let write = |dir: &Path, code: u8| {
            let p = dir.join("fleet-moved-program");
            std::fs::write(&p, format!("#!/bin/sh\nexit {code}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p
        };
        let first = write(d1.path(), 3);
        let mut env = env();
        env.retain(|(k, _)| k != "PATH");
        let path = std::env::join_paths([d1.path(), d2.path()]).unwrap();
        env.push(("PATH".into(), path));
        let start = |env: &Vec<(OsString, OsString)>| {
            spawn(&Request {
                program: "fleet-moved-program",
                args: Vec::new(),
                env: env.clone(),
                cgroup_procs: None,
                stdio: Stdio::Combined,
            })
            .expect("spawn")
        };
        assert_eq!(start(&env).process.wait().await.unwrap().code(), Some(3));
        std::fs::remove_file(first).unwrap();
        write(d2.path(), 4);
        assert_eq!(start(&env).process.wait().await.unwrap().code(), Some(4));
    }

    #[test]
    fn a_missing_program_and_a_failed_exec_are_named() {
        let e = spawn(&Request {
            program: "no-such-program-fleet",
            args: Vec::new(),
            env: env(),
            cgroup_procs: None,
            stdio: Stdio::Combined,
        })
        .err()
        .unwrap();
        assert!(e.to_string().contains("not found in PATH"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("not-executable");
        std::fs::write(&f, "x").unwrap();
        let e = spawn(&Request {
            program: f.to_str().unwrap(),
            args: Vec::new(),
            env: env(),
            cgroup_procs: None,
            stdio: Stdio::Combined,
        })
        .err()
        .unwrap();
        assert!(e.to_string().contains("cannot execute"), "{e}");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    }
}

#[cfg(test)]
mod wait_tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waits_for_a_running_process() {
        let args = ["-c".to_string(), "sleep 0.2".to_string()];
        let s = spawn(&Request {
            program: "sh",
            args: args.iter().map(String::as_str).collect(),
            env: std::env::vars_os().collect(),
            cgroup_procs: None,
            stdio: Stdio::Combined,
        })
        .unwrap();
        let mut p = s.process;
        let st = tokio::time::timeout(std::time::Duration::from_secs(5), p.wait())
            .await
            .expect("exit seen");
        assert!(st.unwrap().success());
    }
}
