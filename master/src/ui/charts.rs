//! Charts drawn on the server as inline SVG: no script, no library, readable without colour (every
//! bar has a title with its numbers).

use std::fmt::Write;

use super::ansi::escape_into;

/// One bar: its height's value, its CSS class, its title and where it links.
pub struct Bar {
    pub value: f64,
    pub class: &'static str,
    pub title: String,
    pub href: Option<String>,
}

/// Vertical bars, oldest left, scaled to the tallest, with the tallest value written on the axis.
pub fn columns(bars: &[Bar], axis_label: &str) -> String {
    const WIDTH: f64 = 600.0;
    const HEIGHT: f64 = 120.0;
    let max = bars.iter().map(|bar| bar.value).fold(0.0_f64, f64::max).max(f64::EPSILON);
    let slot = WIDTH / bars.len().max(1) as f64;
    let mut svg = format!("<svg class=\"chart\" viewBox=\"0 0 {WIDTH} {}\" role=\"img\" aria-label=\"", HEIGHT + 16.0);
    escape_into(&mut svg, axis_label);
    svg.push_str("\">");
    for (index, bar) in bars.iter().enumerate() {
        let height = (bar.value / max * HEIGHT).max(1.0);
        let x = index as f64 * slot + slot * 0.1;
        if let Some(href) = &bar.href {
            svg.push_str("<a href=\"");
            escape_into(&mut svg, href);
            svg.push_str("\">");
        }
        let _ = write!(
            svg,
            "<rect class=\"{}\" x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{height:.1}\"><title>",
            bar.class,
            HEIGHT - height,
            slot * 0.8
        );
        escape_into(&mut svg, &bar.title);
        svg.push_str("</title></rect>");
        if bar.href.is_some() {
            svg.push_str("</a>");
        }
    }
    let _ = write!(svg, "<text class=\"axis\" x=\"0\" y=\"{}\">", HEIGHT + 13.0);
    escape_into(&mut svg, axis_label);
    svg.push_str("</text></svg>");
    svg
}

/// Horizontal bars of shares (0–1), one per label.
pub fn shares(rows: &[(String, f64)]) -> String {
    const ROW: f64 = 22.0;
    let height = ROW * rows.len().max(1) as f64;
    let mut svg = format!("<svg class=\"chart\" viewBox=\"0 0 600 {height}\" role=\"img\" aria-label=\"utilisation\">");
    for (index, (label, share)) in rows.iter().enumerate() {
        let y = index as f64 * ROW;
        let share = share.clamp(0.0, 1.0);
        let _ = write!(
            svg,
            "<rect class=\"track\" x=\"160\" y=\"{:.1}\" width=\"380\" height=\"14\"/>\
             <rect class=\"ok\" x=\"160\" y=\"{:.1}\" width=\"{:.1}\" height=\"14\"><title>",
            y + 3.0,
            y + 3.0,
            380.0 * share
        );
        escape_into(&mut svg, label);
        let _ =
            write!(svg, ": {:.0}%</title></rect><text class=\"axis\" x=\"0\" y=\"{:.1}\">", share * 100.0, y + 15.0);
        escape_into(&mut svg, label);
        let _ = write!(svg, "</text><text class=\"axis\" x=\"548\" y=\"{:.1}\">{:.0}%</text>", y + 15.0, share * 100.0);
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_to_the_tallest_and_escape_their_words() {
        let bars = [
            Bar { value: 10.0, class: "ok", title: "run <1>".into(), href: Some("/ui/x?a=1&b=2".into()) },
            Bar { value: 5.0, class: "bad", title: "run 2".into(), href: None },
        ];
        let svg = columns(&bars, "longest 10s");
        assert!(svg.contains("height=\"120.0\"") && svg.contains("height=\"60.0\""), "{svg}");
        assert!(svg.contains("run &lt;1&gt;") && svg.contains("a=1&amp;b=2"), "{svg}");
        let svg = shares(&[("e2e".into(), 0.5)]);
        assert!(svg.contains("width=\"190.0\"") && svg.contains("50%"), "{svg}");
    }
}
