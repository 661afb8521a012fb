//! Console lines as HTML: every byte a job printed is escaped first, then its ANSI colours
//! (SGR sequences: the 16 colours, bold, dim, italic, underline) become classes of `<span>`s;
//! every other escape sequence is dropped. Each line carries its number as an anchor (`#L12`)
//! and the time the agent stamped it with.

use std::fmt::Write;

/// The SGR state a run of text is shown with.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Style {
    fg: Option<u8>,
    bg: Option<u8>,
    bold: bool,
    dim: bool,
    italic: bool,
    underline: bool,
}

impl Style {
    fn apply(&mut self, params: &str) {
        let codes: Vec<u16> =
            if params.is_empty() { vec![0] } else { params.split(';').map(|code| code.parse().unwrap_or(0)).collect() };
        let mut codes = codes.into_iter();
        while let Some(code) = codes.next() {
            match code {
                0 => *self = Style::default(),
                1 => self.bold = true,
                2 => self.dim = true,
                3 => self.italic = true,
                4 => self.underline = true,
                22 => (self.bold, self.dim) = (false, false),
                23 => self.italic = false,
                24 => self.underline = false,
                30..=37 => self.fg = Some((code - 30) as u8),
                90..=97 => self.fg = Some((code - 90 + 8) as u8),
                39 => self.fg = None,
                40..=47 => self.bg = Some((code - 40) as u8),
                100..=107 => self.bg = Some((code - 100 + 8) as u8),
                49 => self.bg = None,
                // 256-colour and true-colour forms: their arguments are skipped, the text stays.
                38 | 48 => match codes.next() {
                    Some(5) => {
                        codes.next();
                    }
                    Some(2) => {
                        codes.nth(2);
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }

    fn classes(&self) -> String {
        let mut classes = Vec::new();
        if let Some(fg) = self.fg {
            classes.push(format!("a-f{fg}"));
        }
        if let Some(bg) = self.bg {
            classes.push(format!("a-b{bg}"));
        }
        for (on, class) in [(self.bold, "a-bold"), (self.dim, "a-dim"), (self.italic, "a-it"), (self.underline, "a-ul")]
        {
            if on {
                classes.push(class.to_owned());
            }
        }
        classes.join(" ")
    }
}

pub fn escape_into(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters other than tab show as nothing.
            c if c.is_control() && c != '\t' => {}
            c => out.push(c),
        }
    }
}

/// One line of text (no newline) with its colours, escaped.
pub fn to_html(line: &str) -> String {
    let mut out = String::with_capacity(line.len() + 16);
    let mut style = Style::default();
    let mut open = false;
    let mut rest = line;
    loop {
        let (text, after) = match rest.find('\u{1b}') {
            Some(at) => (&rest[..at], Some(&rest[at + 1..])),
            None => (rest, None),
        };
        escape_into(&mut out, text);
        let Some(after) = after else { break };
        rest = match after.strip_prefix('[') {
            Some(csi) => {
                // Parameters and intermediates up to the final byte (@ to ~).
                let end = csi.find(|c: char| ('@'..='~').contains(&c)).unwrap_or(csi.len());
                let (params, final_byte) = (&csi[..end], csi[end..].chars().next());
                if final_byte == Some('m') {
                    style.apply(params);
                    if open {
                        out.push_str("</span>");
                        open = false;
                    }
                    let classes = style.classes();
                    if !classes.is_empty() {
                        let _ = write!(out, "<span class=\"{classes}\">");
                        open = true;
                    }
                }
                &csi[(end + final_byte.map_or(0, char::len_utf8)).min(csi.len())..]
            }
            // Another escape: drop it and the character after it.
            None => after.char_indices().nth(1).map_or("", |(at, _)| &after[at..]),
        };
    }
    if open {
        out.push_str("</span>");
    }
    out
}

/// A console line as the run page shows it: anchored by its number, its timestamp apart.
pub fn console_line(number: u64, line: &str) -> String {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let (stamp, text) = match line.split_once(' ') {
        Some((stamp, text)) if looks_like_stamp(stamp) => (Some(stamp), text),
        _ => (None, line),
    };
    let mut out = format!("<span class=\"line\" id=\"L{number}\"><a class=\"ln\" href=\"#L{number}\">{number}</a>");
    if let Some(stamp) = stamp {
        // `2026-12-03T13:00:00.123456789Z` shows as `13:00:00`, whole on hover.
        let clock = stamp.get(11..19).unwrap_or(stamp);
        let _ = write!(out, "<time class=\"ts\" datetime=\"{stamp}\" title=\"{stamp}\">{clock}</time>");
    }
    let note = text.starts_with("[cimaster] ");
    out.push_str(if note { "<span class=\"tx note\">" } else { "<span class=\"tx\">" });
    out.push_str(&to_html(text));
    out.push_str("</span></span>");
    out
}

fn looks_like_stamp(word: &str) -> bool {
    word.len() >= 20
        && word.ends_with('Z')
        && word.as_bytes().get(10) == Some(&b'T')
        && word.bytes().all(|b| b.is_ascii_digit() || b"-:.TZ".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_before_colours_are_added() {
        assert_eq!(
            to_html("<script>alert('x')</script> & \"y\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;y&quot;"
        );
        assert_eq!(to_html("\u{1b}[31mred\u{1b}[0m plain"), "<span class=\"a-f1\">red</span> plain");
        assert_eq!(
            to_html("\u{1b}[1;92mok\u{1b}[22m still green\u{1b}[m"),
            "<span class=\"a-f10 a-bold\">ok</span><span class=\"a-f10\"> still green</span>"
        );
        // A colour escape cannot smuggle markup in.
        assert_eq!(to_html("\u{1b}[31\"><b>m"), "&gt;m");
    }

    #[test]
    fn other_escapes_are_dropped_and_odd_colours_keep_their_text() {
        assert_eq!(to_html("\u{1b}[2Kcleared\u{1b}]0;title"), "cleared0;title");
        assert_eq!(to_html("\u{1b}[38;5;196mbright\u{1b}[0m"), "bright");
        assert_eq!(to_html("\u{1b}[38;2;255;0;0;4mred-ul"), "<span class=\"a-ul\">red-ul</span>");
        assert_eq!(to_html("dangling \u{1b}"), "dangling ");
        assert_eq!(to_html("dangling \u{1b}[31"), "dangling ");
    }

    #[test]
    fn lines_carry_their_number_and_time() {
        let html = console_line(7, "2026-12-03T13:00:01.123456789Z hello <b>");
        assert!(html.starts_with("<span class=\"line\" id=\"L7\"><a class=\"ln\" href=\"#L7\">7</a>"), "{html}");
        assert!(html.contains(">13:00:01</time>") && html.contains("hello &lt;b&gt;"), "{html}");
        let note = console_line(1, "2026-12-03T13:00:01.1Z [cimaster] pulling");
        assert!(note.contains("tx note"), "{note}");
        assert!(console_line(2, "no stamp here").contains("no stamp here"));
    }
}
