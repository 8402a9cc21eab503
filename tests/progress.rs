//! What `mtasts serve` shows while a batch of certificates is issued, as a
//! person sees it: the real binary in ACME mode against a real pebble, with
//! stderr on a pseudo-terminal (a bar redrawn in place, then one final
//! line) or on a plain file (log lines only, never the bar).
//!
//! Without pebble the tests skip loudly; under `CI=true` they fail.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::ServeProc;
use common::pebble::Pebble;
use rustix::pty::OpenptFlags;

/// Enough names, ordered one at a time, that the batch lasts a few seconds:
/// several of the bar's 1 s redraws.
const DOMAINS: usize = 8;

/// A pebble, and an ACME-mode config for `DOMAINS` names on the ports
/// pebble validates against.
struct Batch {
    /// Kept for its processes (killed on drop).
    _pebble: Pebble,
    dir: tempfile::TempDir,
    config: PathBuf,
    https: SocketAddr,
    http: SocketAddr,
}

impl Batch {
    /// `None` when pebble is not installed (outside CI).
    fn new() -> Option<Batch> {
        let (https, http) = (common::loopback(), common::loopback());
        let pebble = Pebble::start(http.port(), https.port(), 0)?;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut text = common::server_section(https, http, &dir.path().join("state"));
        text.push_str(
            &pebble.tls_section(
                "max_concurrent_orders = 1\norders_per_hour = 10000\nretry_max = \"3s\"",
            ),
        );
        text.push_str("\n[defaults]\nmode = \"testing\"\nmx = [\"mx.example.net\"]\n");
        for i in 0..DOMAINS {
            text.push_str(&format!("\n[[domain]]\nname = \"p{i}.example.com\"\n"));
        }
        let config = common::write(dir.path(), "mtasts.toml", &text);
        Some(Batch {
            _pebble: pebble,
            dir,
            config,
            https,
            http,
        })
    }

    /// Starts `mtasts serve` with `stderr`, whose bytes end up in `log`.
    fn serve(&self, stderr: impl Into<Stdio>, log: PathBuf) -> ServeProc {
        let child = Command::new(common::bin())
            .args(["serve", "--config"])
            .arg(&self.config)
            // The "certificate issued" lines are part of what is checked.
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn mtasts serve");
        ServeProc {
            child,
            https: self.https,
            http: self.http,
            stderr: log,
        }
    }
}

/// A pseudo-terminal `cols` columns wide. Returns its slave end, for the
/// child's stderr, and a thread that copies everything written there to
/// `transcript` until the last slave descriptor is closed.
fn pty(cols: u16, transcript: &Path) -> (OwnedFd, JoinHandle<()>) {
    let master = rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY)
        .expect("open a pseudo-terminal");
    rustix::pty::grantpt(&master).expect("grantpt");
    rustix::pty::unlockpt(&master).expect("unlockpt");
    let name = rustix::pty::ptsname(&master, Vec::new()).expect("ptsname");
    let slave = rustix::fs::open(
        name.as_c_str(),
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .expect("open the pty slave");
    let size = rustix::termios::Winsize {
        ws_row: 24,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(&master, size).expect("set the window size");
    let mut out = File::create(transcript).expect("transcript");
    let mut master = File::from(master);
    let copier = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // Linux answers EIO once no slave descriptor is left: the end.
        while let Ok(n @ 1..) = master.read(&mut buf) {
            out.write_all(&buf[..n]).expect("write transcript");
        }
    });
    (slave, copier)
}

/// Waits until `done(log)`, at most `within`; panics with the log if the
/// process exits first or time runs out.
fn wait_for(proc: &mut ServeProc, within: Duration, what: &str, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        let log = proc.log();
        if done(&log) {
            return;
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            panic!("mtasts exited with {status} before {what}:\n{log}");
        }
        assert!(
            Instant::now() < deadline,
            "no {what} within {within:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stops the server with SIGTERM and waits for a clean exit.
fn stop(proc: &mut ServeProc) {
    proc.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = proc.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "mtasts did not stop:\n{}",
            proc.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}:\n{}", proc.log());
}

fn issued(log: &str) -> usize {
    log.matches("certificate issued").count()
}

/// `text` without escape sequences (`ESC [ … final`).
fn strip_escapes(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c != '[' && ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Every drawing of the progress bar in `text`: what was written between
/// two carriage returns or newlines, if it mentions orders in flight.
fn bar_draws(text: &str) -> Vec<String> {
    strip_escapes(text)
        .split(['\r', '\n'])
        .filter(|s| s.contains(" in flight"))
        .map(str::to_owned)
        .collect()
}

/// The rows a terminal `width` columns wide shows after `text` (all of
/// them, no scrolling), as far as this output needs a terminal: printing
/// with automatic wrap at the right margin, CR, LF and erase to the end of
/// the line (`ESC [ K`). Other escape sequences (colours) change nothing.
fn screen(width: usize, text: &str) -> Vec<String> {
    let mut rows: Vec<Vec<char>> = vec![Vec::new()];
    let (mut row, mut col) = (0, 0);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => col = 0,
            '\n' => {
                row += 1;
                if row == rows.len() {
                    rows.push(Vec::new());
                }
            }
            '\x1b' => {
                if chars.next_if_eq(&'[').is_some() {
                    let end = chars.by_ref().find(|c| ('@'..='~').contains(c));
                    if end == Some('K') {
                        rows[row].truncate(col);
                    }
                }
            }
            c if c.is_control() => {}
            c => {
                if col == width {
                    row += 1;
                    col = 0;
                    if row == rows.len() {
                        rows.push(Vec::new());
                    }
                }
                let r = &mut rows[row];
                if r.len() <= col {
                    r.resize(col, ' ');
                    r.push(c);
                } else {
                    r[col] = c;
                }
                col += 1;
            }
        }
    }
    rows.into_iter()
        .map(|r| r.into_iter().collect::<String>().trim_end().to_owned())
        .collect()
}

/// Whether `draw` is the bar of a batch under way: `[…] NN% V/M
/// certificates valid, K in flight…` with V < M.
fn under_way(draw: &str) -> bool {
    let Some((head, tail)) = draw.split_once(" certificates valid, ") else {
        return false;
    };
    let Some((valid, total)) = head.rsplit(' ').next().and_then(|c| c.split_once('/')) else {
        return false;
    };
    draw.starts_with('[')
        && total == DOMAINS.to_string()
        && valid.parse::<usize>().is_ok_and(|v| v < DOMAINS)
        && tail
            .split_once(" in flight")
            .is_some_and(|(k, _)| k.parse::<usize>().is_ok())
}

/// Runs a batch with stderr on a terminal `cols` wide; returns everything
/// written there. Waits for the final line, then stops the server.
fn batch_on_terminal(cols: u16) -> Option<String> {
    let batch = Batch::new()?;
    let transcript = batch.dir.path().join("terminal.log");
    let (slave, copier) = pty(cols, &transcript);
    let mut proc = batch.serve(slave, transcript);
    let last = format!("{DOMAINS}/{DOMAINS} certificates valid");
    wait_for(
        &mut proc,
        Duration::from_secs(180),
        "final progress line",
        |log| log.contains(&last),
    );
    stop(&mut proc);
    copier.join().expect("pty reader");
    Some(proc.log())
}

/// Checks what any width shows: the final line alone in its row, no bar
/// left behind, every log line starting in the first column.
fn assert_screen(cols: u16, text: &str) {
    let rows = screen(usize::from(cols), text);
    let shown = rows.join("\n");
    let last = format!("{DOMAINS}/{DOMAINS} certificates valid");
    assert!(
        rows.contains(&last),
        "no row reads exactly {last:?}:\n{shown}"
    );
    assert!(
        !rows
            .iter()
            .any(|r| r.contains("in flight") || r.starts_with('[')),
        "a progress bar is left on the screen:\n{shown}"
    );
    assert!(
        rows.iter()
            .filter(|r| r.contains(" INFO "))
            .all(|r| r.starts_with(|c: char| c.is_ascii_digit())),
        "a log line does not start at the left margin:\n{shown}"
    );
    assert_eq!(issued(&strip_escapes(text)), DOMAINS, "{shown}");
    assert!(rows.iter().any(|r| r.ends_with("stopped")), "{shown}");
}

/// On a terminal, the batch shows a bar redrawn in place with the counts
/// (`[###---]  37% 3/8 certificates valid, 1 in flight`), and once it is
/// done one line `8/8 certificates valid`. Log lines issued meanwhile
/// (`certificate issued`) start on a line of their own.
#[test]
fn terminal_shows_a_progress_bar_then_the_final_line() {
    let Some(text) = batch_on_terminal(100) else {
        return;
    };
    let draws = bar_draws(&text);
    assert!(
        draws.iter().any(|d| under_way(d)),
        "no progress bar while issuing; drawn: {draws:#?}\n{text}"
    );
    assert!(
        draws.iter().any(|d| d.contains(" 1 in flight")),
        "no order ever in flight; drawn: {draws:#?}"
    );
    assert!(draws.iter().all(|d| d.chars().count() < 100), "{draws:#?}");
    assert_screen(100, &text);
}

/// A terminal narrower than the bar: each drawing fits in one row (an
/// over-long one wraps, and the next carriage return goes back only to the
/// start of its last row, leaving the rest on the screen).
#[test]
fn narrow_terminal_keeps_the_progress_on_one_row() {
    const COLS: u16 = 40;
    let Some(text) = batch_on_terminal(COLS) else {
        return;
    };
    let draws = bar_draws(&text);
    assert!(!draws.is_empty(), "no progress shown:\n{text}");
    assert!(
        draws.iter().all(|d| d.chars().count() < usize::from(COLS)),
        "wider than {COLS} columns: {draws:#?}"
    );
    assert_screen(COLS, &text);
}

/// With stderr on a file (a journal), there is no bar and no final line,
/// only log lines: never a carriage return, nor a colour code.
#[test]
fn no_progress_bar_when_stderr_is_a_file() {
    let Some(batch) = Batch::new() else {
        return;
    };
    let log = batch.dir.path().join("stderr.log");
    let file = File::create(&log).expect("stderr log");
    let mut proc = batch.serve(file, log);
    wait_for(&mut proc, Duration::from_secs(180), "certificates", |log| {
        issued(log) == DOMAINS
    });
    // A terminal would show the final line within the next 1 s redraw.
    std::thread::sleep(Duration::from_millis(2_500));
    stop(&mut proc);
    let text = proc.log();
    assert!(!text.contains('\r'), "{text:?}");
    assert!(!text.contains('\x1b'), "colour codes in a file: {text:?}");
    assert!(!text.contains("in flight"), "{text}");
    assert!(!text.contains("certificates valid"), "{text}");
}
