//! Printing: `-o json` is the API's JSON as it came (for `jq`), `-o table` is for people. Colours
//! only on a terminal, and never with `NO_COLOR`.

use std::io::IsTerminal;

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// `-o table|json`, on every command that reads.
#[derive(Debug, Clone, clap::Args)]
pub struct Output {
    /// How to print: a table for people, or the API's JSON as it is.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub format: Format,
}

impl Output {
    /// Prints the API's answer as JSON, or calls `table` to print it for people.
    pub fn print(&self, value: &Value, table: impl FnOnce(&Value)) {
        match self.format {
            Format::Json => println!("{}", serde_json::to_string_pretty(value).unwrap_or_default()),
            Format::Table => table(value),
        }
    }
}

/// Rows under headers, each column as wide as its widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|header| header.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(visible_len(cell));
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            text.push_str(cell);
            if i < last {
                text.push_str(&" ".repeat(width - visible_len(cell) + 2));
            }
        }
        println!("{}", text.trim_end());
    };
    line(headers.iter().map(|header| paint(Style::Bold, header)).collect());
    for row in rows {
        line(row.clone());
    }
}

/// A field of a JSON object as text ("" when absent or null).
pub fn text(value: &Value, field: &str) -> String {
    match value.get(field) {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    }
}

#[derive(Clone, Copy)]
pub enum Style {
    Bold,
    Green,
    Red,
    Yellow,
    Dim,
}

fn colours() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty()) && std::io::stdout().is_terminal()
}

pub fn paint(style: Style, text: &str) -> String {
    if !colours() {
        return text.to_owned();
    }
    let code = match style {
        Style::Bold => "1",
        Style::Green => "32",
        Style::Red => "31",
        Style::Yellow => "33",
        Style::Dim => "2",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

/// A run status as a word, coloured on a terminal (the word says it without the colour).
pub fn status(status: &str) -> String {
    let style = match status {
        "succeeded" => Style::Green,
        "failed" | "error" | "timed_out" => Style::Red,
        "aborted" => Style::Yellow,
        _ => Style::Dim,
    };
    paint(style, status)
}

fn visible_len(text: &str) -> usize {
    let mut len = 0;
    let mut escape = false;
    for c in text.chars() {
        match (escape, c) {
            (false, '\x1b') => escape = true,
            (true, 'm') => escape = false,
            (true, _) => {}
            (false, _) => len += 1,
        }
    }
    len
}

/// Seconds between two RFC 3339 times, as `1m 05s`.
pub fn duration(from: &str, to: &str) -> String {
    let (Ok(from), Ok(to)) = (chrono::DateTime::parse_from_rfc3339(from), chrono::DateTime::parse_from_rfc3339(to))
    else {
        return String::new();
    };
    human((to - from).num_milliseconds().max(0) as f64 / 1000.0)
}

pub fn human(seconds: f64) -> String {
    if seconds < 60.0 {
        format!("{seconds:.1}s")
    } else if seconds < 3600.0 {
        format!("{}m {:02}s", (seconds / 60.0) as u64, (seconds % 60.0) as u64)
    } else {
        format!("{}h {:02}m", (seconds / 3600.0) as u64, ((seconds % 3600.0) / 60.0) as u64)
    }
}

/// How long ago an RFC 3339 time was, as `3m ago`.
pub fn ago(time: &str) -> String {
    let Ok(time) = chrono::DateTime::parse_from_rfc3339(time) else { return String::new() };
    let seconds = (chrono::Utc::now() - time.with_timezone(&chrono::Utc)).num_seconds().max(0);
    match seconds {
        0..=59 => format!("{seconds}s ago"),
        60..=3599 => format!("{}m ago", seconds / 60),
        3600..=86399 => format!("{}h ago", seconds / 3600),
        _ => format!("{}d ago", seconds / 86400),
    }
}
