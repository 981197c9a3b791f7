//! The live view in a real terminal: `ringctl watch`, `top` and `local` run in a
//! pseudo-terminal whose screen a terminal emulator model (vt100) keeps, and the same commands
//! piped print plain lines or JSON.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringmaster_tests::{Cluster, bin, wait_until};

const COLS: u16 = 120;
const ROWS: u16 = 40;

/// A command on a pseudo-terminal: its screen as a terminal shows it, and every byte it wrote.
struct Pty {
    child: Child,
    screen: Arc<Mutex<vt100::Parser>>,
    raw: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Pty {
    /// Starts `cmd` with stdin, stdout and stderr on a new 120x40 pseudo-terminal that is its
    /// controlling terminal, `TERM=xterm-256color`.
    fn spawn(mut cmd: Command) -> Pty {
        let mut master = -1;
        let mut slave = -1;
        let size = libc::winsize {
            ws_row: ROWS,
            ws_col: COLS,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two descriptors and reads the size; the pointers are valid.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size,
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors were just opened and are owned here alone.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        // Not inherited by what the other tests start meanwhile (a process holding the slave
        // would keep the reader below from seeing the end).
        for fd in [&master, &slave] {
            // SAFETY: F_SETFD on a descriptor owned here.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        let io = |fd: &OwnedFd| Stdio::from(fd.try_clone().expect("dup of the pty"));
        cmd.stdin(io(&slave))
            .stdout(io(&slave))
            .stderr(io(&slave))
            .env("TERM", "xterm-256color");
        // SAFETY: setsid and ioctl are async-signal-safe; they touch only the child.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("starting the command on the pty");
        drop(slave);
        let screen = Arc::new(Mutex::new(vt100::Parser::new(
            ROWS.try_into().unwrap(),
            COLS.try_into().unwrap(),
            1000,
        )));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (screen.clone(), raw.clone());
        let reader = std::thread::spawn(move || {
            let mut input = std::fs::File::from(master.try_clone().expect("dup of the pty"));
            let mut output = std::fs::File::from(master);
            let mut buf = [0u8; 8192];
            let mut tail: Vec<u8> = Vec::new();
            // EIO once the command and everything it started closed the terminal.
            while let Ok(n) = input.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let chunk = &buf[..n];
                let mut screen = s.lock().unwrap();
                screen.process(chunk);
                r.lock().unwrap().extend_from_slice(chunk);
                // A cursor position query (ESC [ 6 n, what an inline view asks at its start)
                // is answered as a terminal would, with the cursor where the screen has it.
                tail.extend_from_slice(chunk);
                let queries = tail.windows(4).filter(|w| w == b"\x1b[6n").count();
                for _ in 0..queries {
                    let (row, col) = screen.screen().cursor_position();
                    let _ = write!(output, "\x1b[{};{}R", row + 1, col + 1);
                }
                // What follows the last query answered; at most 3 bytes (a query's start).
                let after = tail
                    .windows(4)
                    .rposition(|w| w == b"\x1b[6n")
                    .map_or(0, |i| i + 4);
                tail.drain(..after.max(tail.len().saturating_sub(3)));
            }
        });
        Pty {
            child,
            screen,
            raw,
            reader: Some(reader),
        }
    }

    /// What the screen shows now (rows trimmed).
    fn contents(&self) -> String {
        self.screen.lock().unwrap().screen().contents()
    }

    /// Everything above the screen (scrolled out) and on it, oldest first.
    fn scrollback_and_screen(&self) -> String {
        let mut p = self.screen.lock().unwrap();
        let mut all = Vec::new();
        let total = {
            p.screen_mut().set_scrollback(usize::MAX);
            p.screen().scrollback()
        };
        for off in (1..=total).rev() {
            p.screen_mut().set_scrollback(off);
            let top: String = p
                .screen()
                .contents()
                .lines()
                .next()
                .unwrap_or("")
                .to_owned();
            all.push(top);
        }
        p.screen_mut().set_scrollback(0);
        all.extend(p.screen().contents().lines().map(str::to_owned));
        all.join("\n")
    }

    fn raw(&self) -> Vec<u8> {
        self.raw.lock().unwrap().clone()
    }

    /// Waits for the command's exit code (and for its last output).
    fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let status = wait_until(timeout, "the command on the pty to exit", || {
            self.child.try_wait().unwrap()
        });
        // The last output: the reader ends when nothing holds the terminal any more.
        if let Some(r) = self.reader.take() {
            wait_until(timeout, "the pty's output to end", || {
                r.is_finished().then_some(())
            });
            let _ = r.join();
        }
        status.code()
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn one_node() -> Cluster {
    let mut c = Cluster::start(Some("w0 slots=2\n"), "10s");
    c.start_agent("w0", 2, &[]);
    c.wait_joined(&["w0"]);
    c
}

#[test]
fn watch_redraws_in_a_terminal_and_prints_lines_or_json_when_piped() {
    let c = one_node();
    let (job, _out) = c.submit_held_job("held.yaml");
    c.wait_all_ranks_running(&job, Duration::from_secs(30));

    let mut watch = c.ringctl_cmd();
    watch.args(["watch", &job]);
    let mut pty = Pty::spawn(watch);
    // The view: title, rank table, events.
    let running = wait_until(Duration::from_secs(20), "the live view", || {
        let s = pty.contents();
        (s.contains("RUNNING") && s.contains("RANK") && s.contains("events")).then_some(s)
    });
    assert!(running.contains(&job), "{running}");
    assert!(running.contains("generation 0  restarts 0/"), "{running}");
    for r in ["0", "1"] {
        assert!(
            running.lines().any(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.len() >= 4 && w[0] == r && w[1] == "w0" && w[3] == "RUNNING"
            }),
            "rank {r}: {running}"
        );
    }

    // `top` on the same terminal kind: the job in a redrawn table.
    let mut top = c.ringctl_cmd();
    top.args(["top", "--count", "2", "--every", "200ms"]);
    let mut top_pty = Pty::spawn(top);
    assert_eq!(top_pty.wait(Duration::from_secs(20)), Some(0));
    let shown = top_pty.contents();
    assert!(shown.contains("1 job(s) not ended"), "{shown}");
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with(&job) && l.contains("RUNNING")),
        "{shown}"
    );
    // Piped: a plain table; JSON: an array per update.
    let plain = c.ringctl(&["top", "--count", "1"]);
    let text = String::from_utf8_lossy(&plain.stdout);
    assert!(plain.status.success(), "{text}");
    assert!(text.starts_with("ID  ") && text.contains(&job), "{text}");
    assert!(!plain.stdout.contains(&0x1b), "{text}");
    let json = c.ringctl(&["top", "--count", "1", "--output", "json"]);
    let arr: serde_json::Value = serde_json::from_slice(&json.stdout).expect("top JSON");
    assert_eq!(arr[0]["id"], job.as_str(), "{arr:#}");

    c.finish_held_job(&job, 2);
    assert_eq!(pty.wait(Duration::from_secs(30)), Some(0));
    let screen = pty.scrollback_and_screen();
    // Redrawn in place: the last frame says SUCCEEDED, and the title line is on the screen
    // once, not once per update.
    let titles: Vec<&str> = screen
        .lines()
        .filter(|l| l.starts_with(&format!("{job} ")))
        .collect();
    assert_eq!(titles.len(), 1, "{screen}");
    assert!(titles[0].contains("SUCCEEDED"), "{screen}");
    let raw = String::from_utf8_lossy(&pty.raw()).into_owned();
    assert!(
        raw.contains("RUNNING"),
        "the view showed the running job first"
    );
    assert!(screen.contains("Succeeded"), "the events: {screen}");

    // Piped: plain lines, no escape sequences.
    let plain = c.ringctl(&["watch", &job]);
    assert_eq!(plain.status.code(), Some(0));
    assert!(!plain.stdout.contains(&0x1b));
    let text = String::from_utf8_lossy(&plain.stdout);
    assert!(text.contains(&format!("{job} SUCCEEDED")), "{text}");
    // JSON: one object per line, each parses.
    let json = c.ringctl(&["watch", &job, "--output", "json"]);
    assert_eq!(json.status.code(), Some(0));
    let text = String::from_utf8_lossy(&json.stdout);
    assert!(text.lines().count() >= 1, "{text}");
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON object per line");
        assert_eq!(v["id"], job.as_str());
    }
}

#[test]
fn local_shows_worker_lines_above_its_view() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("hello.yaml");
    std::fs::write(
        &spec,
        "command: [sh, -c, 'echo hello from rank $RANK; sleep 0.5; echo bye from rank $RANK']\n",
    )
    .unwrap();
    let mut cmd = Command::new(bin("ringctl"));
    cmd.current_dir(dir.path()).env_remove("RUST_LOG").args([
        "local",
        spec.to_str().unwrap(),
        "--nodes",
        "2",
    ]);
    let mut pty = Pty::spawn(cmd);
    assert_eq!(
        pty.wait(Duration::from_secs(60)),
        Some(0),
        "{}",
        pty.contents()
    );
    let screen = pty.scrollback_and_screen();
    let lines: Vec<&str> = screen.lines().collect();
    let title = lines
        .iter()
        .position(|l| l.contains("SUCCEEDED") && l.contains("generation 0"))
        .unwrap_or_else(|| {
            let raw = pty.raw();
            let _ = std::fs::write("/tmp/view-local-raw.bin", &raw);
            panic!("no final view: {screen}")
        });
    for r in 0..2 {
        for word in ["hello", "bye"] {
            let want = format!("[rank {r}] {word} from rank {r}");
            let at = lines
                .iter()
                .position(|l| l.trim_end() == want)
                .unwrap_or_else(|| panic!("{want:?} not shown: {screen}"));
            // A line printed while the job ran scrolls above the view; the last lines may
            // come after the job's end, below its final frame.
            if word == "hello" {
                assert!(at < title, "{want:?} below the view: {screen}");
            }
        }
    }
    assert!(!screen.contains("generation="), "{screen}");
    // The view began before the ranks were placed (sized for none) and grew in place: one
    // frame on the screen, not one per size.
    let frames = lines
        .iter()
        .filter(|l| l.contains("generation 0  restarts"))
        .count();
    assert_eq!(frames, 1, "{screen}");
}
