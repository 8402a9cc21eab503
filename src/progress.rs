//! The progress line `mtasts serve` keeps at the bottom of a terminal while
//! certificates are issued, and the log writer that erases it before each
//! log line, so that the two never share a row. When stderr is not a
//! terminal nothing here draws: the ACME manager's log line every 30 s is
//! the progress report of journals and files.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::acme::Progress;
use crate::acme::status::bar;
use crate::server::Server;

/// Columns assumed when the terminal does not tell its width.
const DEFAULT_WIDTH: usize = 80;

/// Whether the progress line is on the screen, unfinished (no newline after
/// it). Held while anything is written to stderr through this module, so a
/// log line and a redraw never interleave.
static SHOWN: Mutex<bool> = Mutex::new(false);

fn shown() -> MutexGuard<'static, bool> {
    crate::sync::lock(&SHOWN)
}

/// Carriage return, then erase to the end of the line (ECMA-48 EL): the
/// cursor goes back to the start of the progress row and all of the row is
/// cleared, however long the text it held.
const ERASE: &str = "\r\x1b[K";

/// While certificates are being issued and stderr is a terminal: every
/// second, `[####----]  40% 4/10 certificates valid, 1 in flight` on one
/// row, redrawn in place; once the batch is done, `10/10 certificates
/// valid` on a line of its own. Returns at once otherwise.
pub async fn show(server: Arc<Server>) {
    if !std::io::stderr().is_terminal() || server.acme_progress().is_none() {
        return;
    }
    // A batch was drawn, so its end gets the final line.
    let mut drawn = false;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(p) = server.acme_progress() else {
            return;
        };
        if p.pending > 0 || p.in_flight > 0 {
            let width = terminal_width().unwrap_or(DEFAULT_WIDTH);
            write_stderr(&format!("{ERASE}{}", line(&p, width)), true);
            drawn = true;
        } else if drawn {
            write_stderr(
                &format!("{ERASE}{}/{} certificates valid\n", p.valid, p.configured),
                false,
            );
            drawn = false;
        }
    }
}

/// Removes the progress line if it is on the screen (before the process
/// prints its last words on exit).
pub fn clear() {
    let mut shown = shown();
    if *shown {
        let _ = std::io::stderr().write_all(ERASE.as_bytes());
        *shown = false;
    }
}

fn write_stderr(text: &str, unfinished: bool) {
    let mut shown = shown();
    let _ = std::io::stderr().write_all(text.as_bytes());
    *shown = unfinished;
}

/// The progress row for a terminal `width` columns wide: the bar and the
/// counts, or the counts alone where both do not fit, cut to the width. It
/// stays one column short of the edge: a row that fills the last column
/// wraps on some terminals, and the next carriage return would then go back
/// to the wrapped part only, leaving the rest on the screen.
pub(crate) fn line(p: &Progress, width: usize) -> String {
    let mut counts = format!(
        "{}/{} certificates valid, {} in flight",
        p.valid, p.configured, p.in_flight
    );
    if p.failing > 0 {
        counts.push_str(&format!(", {} failing", p.failing));
    }
    let room = width.saturating_sub(1);
    let full = format!("{}{counts}", bar(p.valid, p.configured));
    if full.chars().count() <= room {
        full
    } else {
        counts.chars().take(room).collect()
    }
}

/// Columns of the terminal on stderr, if it says.
#[cfg(unix)]
fn terminal_width() -> Option<usize> {
    rustix::termios::tcgetwinsize(std::io::stderr())
        .ok()
        .map(|w| usize::from(w.ws_col))
        .filter(|&w| w > 0)
}

#[cfg(not(unix))]
fn terminal_width() -> Option<usize> {
    None
}

/// The `tracing` writer of `mtasts`: stderr, with the progress line erased
/// before each log line (it is drawn again within a second).
pub fn log_writer() -> LogWriter {
    LogWriter
}

/// See [`log_writer`].
pub struct LogWriter;

impl Write for LogWriter {
    /// The whole buffer at once (`tracing` hands over one formatted line per
    /// call), so that no redraw lands in the middle of a log line.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut shown = shown();
        let mut stderr = std::io::stderr().lock();
        if *shown {
            stderr.write_all(ERASE.as_bytes())?;
            *shown = false;
        }
        stderr.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(valid: usize, configured: usize, in_flight: usize, failing: usize) -> Progress {
        Progress {
            configured,
            valid,
            pending: configured - valid,
            failing,
            in_flight,
            ..Progress::default()
        }
    }

    #[test]
    fn line_has_the_bar_where_it_fits() {
        assert_eq!(
            line(&progress(3, 8, 1, 0), 80),
            "[#######-------------]  37% 3/8 certificates valid, 1 in flight"
        );
        assert_eq!(
            line(&progress(3, 8, 2, 4), 80),
            "[#######-------------]  37% 3/8 certificates valid, 2 in flight, 4 failing"
        );
    }

    #[test]
    fn narrow_terminal_drops_the_bar_then_cuts() {
        assert_eq!(
            line(&progress(3, 8, 1, 0), 40),
            "3/8 certificates valid, 1 in flight"
        );
        let cut = line(&progress(3, 8, 1, 4), 30);
        assert_eq!(cut, "3/8 certificates valid, 1 in ");
        assert_eq!(cut.chars().count(), 29, "one column short of the edge");
        assert_eq!(line(&progress(3, 8, 1, 0), 0), "");
    }
}
