//! A tiny leveled logger for stderr.
//!
//! Lines are gathered in a buffer and written once per loop turn (see
//! [`flush`]), so logging every connection at `info` costs a `memcpy`, not a
//! system call, on the hot path. Warnings and errors are written at once.

use std::cell::RefCell;
use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
}

impl Level {
    pub fn parse(name: &str) -> Option<Level> {
        Some(match name {
            "error" => Level::Error,
            "warn" => Level::Warn,
            "info" => Level::Info,
            "debug" => Level::Debug,
            _ => return None,
        })
    }

    fn label(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
        }
    }
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);

/// Buffered output is written once it passes this size, even mid-turn.
const FLUSH_AT: usize = 64 * 1024;

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

pub fn set_level(level: Level) {
    LEVEL.store(level as u8, Ordering::Relaxed);
}

pub fn enabled(level: Level) -> bool {
    level as u8 <= LEVEL.load(Ordering::Relaxed)
}

#[doc(hidden)]
pub fn write(level: Level, args: fmt::Arguments<'_>) {
    BUFFER.with(|buffer| {
        let mut buffer = buffer.borrow_mut();
        write_timestamp(&mut buffer);
        let _ = writeln!(buffer, " {} {}", level.label(), args);
        if level <= Level::Warn || buffer.len() >= FLUSH_AT {
            let _ = std::io::stderr().write_all(&buffer);
            buffer.clear();
        }
    });
}

/// Writes buffered lines to stderr; the event loop calls it before it sleeps.
pub fn flush() {
    BUFFER.with(|buffer| {
        let mut buffer = buffer.borrow_mut();
        if !buffer.is_empty() {
            let _ = std::io::stderr().write_all(&buffer);
            buffer.clear();
        }
        if buffer.capacity() > FLUSH_AT * 2 {
            buffer.shrink_to(FLUSH_AT);
        }
    });
}

/// Peer-controlled text (a username) in a log line: in double quotes, with
/// quotes, backslashes, control characters (newlines included) and
/// invisible ones (bidirectional overrides, zero-width spaces) escaped as
/// Rust does (`\n`, `\u{202e}`), so it can neither start a line of its own
/// nor hide or reorder the text around it. Letters of any script stay.
pub fn quoted(text: &str) -> Quoted<'_> {
    Quoted(text)
}

pub struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0, f)
    }
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-27T18:50:01.123Z`.
fn write_timestamp(out: &mut Vec<u8>) {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since_epoch.subsec_millis()
    );
}

/// Days since 1970-01-01 to a Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log_at {
    ($level:expr, $($arg:tt)*) => {
        if $crate::log::enabled($level) {
            $crate::log::write($level, format_args!($($arg)*))
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log_error { ($($arg:tt)*) => { $crate::__log_at!($crate::log::Level::Error, $($arg)*) }; }
#[doc(hidden)]
#[macro_export]
macro_rules! __log_warn { ($($arg:tt)*) => { $crate::__log_at!($crate::log::Level::Warn, $($arg)*) }; }
#[doc(hidden)]
#[macro_export]
macro_rules! __log_info { ($($arg:tt)*) => { $crate::__log_at!($crate::log::Level::Info, $($arg)*) }; }
#[doc(hidden)]
#[macro_export]
macro_rules! __log_debug { ($($arg:tt)*) => { $crate::__log_at!($crate::log::Level::Debug, $($arg)*) }; }

pub use crate::{
    __log_debug as debug, __log_error as error, __log_info as info, __log_warn as warn,
};

#[cfg(test)]
mod tests {
    #[test]
    fn civil_dates() {
        assert_eq!(super::civil_from_days(0), (1970, 1, 1));
        assert_eq!(super::civil_from_days(20_419), (2025, 11, 27));
        assert_eq!(super::civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn quoted_peer_text_stays_on_one_visible_line() {
        let table = [
            ("alice", r#""alice""#),
            ("Zoë_小明", r#""Zoë_小明""#),
            ("a\nINFO fake", r#""a\nINFO fake""#),
            ("a\r\tb", r#""a\r\tb""#),
            ("say \"hi\" \\", r#""say \"hi\" \\""#),
            ("\u{1b}[31mred", r#""\u{1b}[31mred""#),
            ("evil\u{202e}txt", r#""evil\u{202e}txt""#),
            ("zero\u{200b}width", r#""zero\u{200b}width""#),
            ("line\u{2028}sep", r#""line\u{2028}sep""#),
            ("", r#""""#),
        ];
        for (text, want) in table {
            assert_eq!(super::quoted(text).to_string(), want, "{text:?}");
        }
    }
}
