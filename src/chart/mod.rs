//! Small, dependency-free SVG charts and a self-contained HTML page to hold
//! them: what `cport bench` draws its results with, and what a stress report
//! can embed.
//!
//! Every function returns markup as a `String`: an `<svg>` element (with its
//! own `xmlns`, so it also stands alone as a `.svg` file) or a whole HTML
//! document. All text that comes from the caller — titles, labels, series
//! names — is escaped; numbers that are NaN or infinite are left out of the
//! drawing (a chart with nothing finite to draw says "no data"), so no
//! `NaN` ever reaches an attribute. Nothing here reads files or the network,
//! and the output references no external resource.

use std::fmt::Write as _;

/// One line on a [`line_chart`]: a name for the legend and its points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The series' name, shown in the legend.
    pub name: String,
    /// `(x, y)` points, drawn in the order given; a non-finite point breaks
    /// the line there.
    pub points: Vec<(f64, f64)>,
}

/// Distinct colours (Tableau 10, which stays readable for most kinds of
/// colour blindness); series past ten reuse them with a dashed stroke.
const PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// Overall size of every chart, in SVG user units (pixels).
const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 420.0;
/// Plot margins: room for the title (top), tick labels and axis titles
/// (left, bottom) and the legend (right).
const LEFT: f64 = 78.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 62.0;
const RIGHT_LEGEND: f64 = 190.0;
const RIGHT_PLAIN: f64 = 24.0;

/// Escapes text for use in XML/HTML text nodes and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters other than tab/newline are not allowed in
            // XML 1.0 at all, escaped or not.
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' && c != '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The colour of series `i`, and whether it is drawn dashed (after the
/// palette's ten colours are used up).
fn colour(i: usize) -> (&'static str, bool) {
    (PALETTE[i % PALETTE.len()], i >= PALETTE.len())
}

/// A "nice" number near `x` (1, 2, 5 × a power of ten), rounded when
/// `round`, else the ceiling. Heckbert, Graphics Gems (1990).
fn nice_num(x: f64, round: bool) -> f64 {
    let exp = x.log10().floor();
    let base = 10f64.powf(exp);
    let f = x / base;
    let nf = if round {
        if f < 1.5 {
            1.0
        } else if f < 3.0 {
            2.0
        } else if f < 7.0 {
            5.0
        } else {
            10.0
        }
    } else if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nf * base
}

/// An axis: the (widened) data range and the tick values on it.
#[derive(Debug, Clone)]
struct Axis {
    lo: f64,
    hi: f64,
    step: f64,
    ticks: Vec<f64>,
}

impl Axis {
    /// Nice ticks (about `target` of them) covering `[lo, hi]`; both must
    /// be finite. A zero-width range is widened so that it has a middle.
    fn new(mut lo: f64, mut hi: f64, target: usize) -> Axis {
        if hi < lo {
            std::mem::swap(&mut lo, &mut hi);
        }
        if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
            let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
            lo -= pad;
            hi += pad;
        }
        // The step straight from the raw range (not Heckbert's rounded
        // range) gives closer to `target` ticks: 0..213k in 50k steps, not 100k.
        let step = nice_num((hi - lo) / (target.max(2) - 1) as f64, true);
        let nlo = (lo / step).floor() * step;
        let nhi = (hi / step).ceil() * step;
        let n = ((nhi - nlo) / step).round() as usize;
        let ticks = (0..=n.min(100)).map(|i| nlo + step * i as f64).collect();
        Axis {
            lo: nlo,
            hi: nhi,
            step,
            ticks,
        }
    }

    /// Where `v` lands between `from` (at `lo`) and `to` (at `hi`).
    fn map(&self, v: f64, from: f64, to: f64) -> f64 {
        from + (v - self.lo) / (self.hi - self.lo) * (to - from)
    }

    /// Labels for the ticks, all with the same unit suffix and precision.
    fn labels(&self) -> Vec<String> {
        let max = self.ticks.iter().fold(0f64, |m, t| m.max(t.abs()));
        let (scale, suffix) = unit_scale(max);
        let decimals = decimals_for(self.step / scale);
        self.ticks
            .iter()
            .map(|t| {
                // Zero is a plain "0" (not "-0", "0k" or "0.00").
                if t.abs() < self.step * 1e-9 {
                    "0".to_string()
                } else {
                    format!("{:.*}{}", decimals, t / scale, suffix)
                }
            })
            .collect()
    }
}

/// The SI suffix to print values up to `max` with (k, M, G), and its scale.
fn unit_scale(max: f64) -> (f64, &'static str) {
    if max >= 1e10 {
        (1e9, "G")
    } else if max >= 1e7 {
        (1e6, "M")
    } else if max >= 1e4 {
        (1e3, "k")
    } else {
        (1.0, "")
    }
}

/// Decimals needed to tell apart values `step` apart.
fn decimals_for(step: f64) -> usize {
    if !step.is_finite() || step <= 0.0 || step >= 1.0 {
        0
    } else {
        ((-step.log10()).ceil() as usize).min(9)
    }
}

/// A single value for a label: about three significant digits (two
/// decimals for values under 10, so ratios read 0.95, 1.00, 1.05), SI
/// suffix for large magnitudes.
pub fn format_value(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".to_string();
    }
    if v == 0.0 {
        return "0".to_string();
    }
    let (scale, suffix) = unit_scale(v.abs());
    let s = v / scale;
    let a = s.abs();
    let decimals = if a >= 100.0 {
        0
    } else if a >= 10.0 {
        1
    } else if a >= 0.1 {
        2
    } else {
        // Small values: keep three significant digits.
        (decimals_for(a) + 2).min(9)
    };
    format!("{:.*}{}", decimals, s, suffix)
}

/// Coordinates in the output: one decimal is finer than a pixel.
fn c(v: f64) -> String {
    format!("{v:.1}")
}

/// The opening `<svg>` element, background, and title.
fn open_svg(out: &mut String, title: &str) {
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12" role="img" aria-label="{t}">"#,
        w = WIDTH,
        h = HEIGHT,
        t = escape(title)
    );
    let _ = write!(
        out,
        r##"<title>{t}</title><rect x="0" y="0" width="{w}" height="{h}" fill="#ffffff"/><text x="{x}" y="24" text-anchor="middle" font-size="16" font-weight="bold">{t}</text>"##,
        t = escape(title),
        w = WIDTH,
        h = HEIGHT,
        x = c(WIDTH / 2.0)
    );
}

/// The plot area's corners: (left, top, right, bottom).
fn plot_box(legend: bool) -> (f64, f64, f64, f64) {
    let right = if legend { RIGHT_LEGEND } else { RIGHT_PLAIN };
    (LEFT, TOP, WIDTH - right, HEIGHT - BOTTOM)
}

/// "no data" in the middle of the plot area.
fn no_data(out: &mut String, legend: bool) {
    let (l, t, r, b) = plot_box(legend);
    let _ = write!(
        out,
        r##"<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#cccccc"/><text x="{}" y="{}" text-anchor="middle" fill="#888888">no data</text>"##,
        c(l),
        c(t),
        c(r - l),
        c(b - t),
        c((l + r) / 2.0),
        c((t + b) / 2.0)
    );
}

/// Horizontal grid lines and labels for the y axis, the axis lines, and
/// the y axis title.
fn y_axis(out: &mut String, y: &Axis, y_label: &str, legend: bool) {
    let (l, t, r, b) = plot_box(legend);
    for (tick, label) in y.ticks.iter().zip(y.labels()) {
        let py = y.map(*tick, b, t);
        let _ = write!(
            out,
            r##"<line x1="{l}" y1="{py}" x2="{r}" y2="{py}" stroke="#e6e6e6"/><text x="{lx}" y="{ty}" text-anchor="end" fill="#333333">{label}</text>"##,
            l = c(l),
            r = c(r),
            py = c(py),
            lx = c(l - 6.0),
            ty = c(py + 4.0),
            label = escape(&label)
        );
    }
    let _ = write!(
        out,
        r##"<line x1="{l}" y1="{t}" x2="{l}" y2="{b}" stroke="#333333"/><line x1="{l}" y1="{b}" x2="{r}" y2="{b}" stroke="#333333"/>"##,
        l = c(l),
        t = c(t),
        b = c(b),
        r = c(r)
    );
    let (cx, cy) = (18.0, (t + b) / 2.0);
    let _ = write!(
        out,
        r#"<text x="{x}" y="{y}" text-anchor="middle" transform="rotate(-90 {x} {y})">{s}</text>"#,
        x = c(cx),
        y = c(cy),
        s = escape(y_label)
    );
}

/// Tick marks and labels for a numeric x axis, and its title.
fn x_axis(out: &mut String, x: &Axis, x_label: &str, legend: bool) {
    let (l, _t, r, b) = plot_box(legend);
    for (tick, label) in x.ticks.iter().zip(x.labels()) {
        let px = x.map(*tick, l, r);
        let _ = write!(
            out,
            r##"<line x1="{px}" y1="{b}" x2="{px}" y2="{b2}" stroke="#333333"/><text x="{px}" y="{ty}" text-anchor="middle" fill="#333333">{label}</text>"##,
            px = c(px),
            b = c(b),
            b2 = c(b + 5.0),
            ty = c(b + 19.0),
            label = escape(&label)
        );
    }
    x_title(out, x_label, legend);
}

fn x_title(out: &mut String, x_label: &str, legend: bool) {
    let (l, _t, r, _b) = plot_box(legend);
    let _ = write!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        c((l + r) / 2.0),
        c(HEIGHT - 14.0),
        escape(x_label)
    );
}

/// The legend to the right of the plot: a swatch and a name per series.
fn legend(out: &mut String, names: &[&str], bars: bool) {
    let (_l, t, r, _b) = plot_box(true);
    let x = r + 14.0;
    for (i, name) in names.iter().enumerate() {
        let y = t + 8.0 + i as f64 * 20.0;
        if y > HEIGHT - 10.0 {
            // More series than fit: say how many are left out.
            let _ = write!(
                out,
                r##"<text x="{}" y="{}" fill="#555555">… {} more</text>"##,
                c(x),
                c(y),
                names.len() - i
            );
            break;
        }
        let (col, dashed) = colour(i);
        if bars {
            let _ = write!(
                out,
                r#"<rect x="{}" y="{}" width="14" height="10" fill="{col}"/>"#,
                c(x),
                c(y - 9.0)
            );
        } else {
            let dash = if dashed {
                r#" stroke-dasharray="5 3""#
            } else {
                ""
            };
            let _ = write!(
                out,
                r#"<line x1="{}" y1="{y}" x2="{}" y2="{y}" stroke="{col}" stroke-width="2.5"{dash}/>"#,
                c(x),
                c(x + 18.0),
                y = c(y - 4.0)
            );
        }
        // Long names are cut so the legend stays inside the picture; the
        // full name is in the tooltip.
        let shown: String = if name.chars().count() > 24 {
            name.chars().take(23).chain(['…']).collect()
        } else {
            name.to_string()
        };
        let _ = write!(
            out,
            r#"<text x="{}" y="{}"><title>{}</title>{}</text>"#,
            c(x + 24.0),
            c(y),
            escape(name),
            escape(&shown)
        );
    }
}

/// A line chart of `series` over numeric x and y axes, with a legend.
///
/// The y axis starts at zero when all values share a sign (so ratios read
/// honestly); points that are NaN or infinite are skipped and break their
/// line.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let mut out = String::new();
    open_svg(&mut out, title);
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let pts = || series.iter().flat_map(|s| s.points.iter().filter(finite));
    let has_legend = !series.is_empty();
    let Some(first) = pts().next() else {
        no_data(&mut out, has_legend);
        let names: Vec<&str> = series.iter().map(|s| s.name.as_str()).collect();
        legend(&mut out, &names, false);
        out.push_str("</svg>");
        return out;
    };
    let (mut xlo, mut xhi, mut ylo, mut yhi) = (first.0, first.0, first.1, first.1);
    for &(x, y) in pts() {
        xlo = xlo.min(x);
        xhi = xhi.max(x);
        ylo = ylo.min(y);
        yhi = yhi.max(y);
    }
    if ylo > 0.0 {
        ylo = 0.0;
    }
    if yhi < 0.0 {
        yhi = 0.0;
    }
    let xa = Axis::new(xlo, xhi, 8);
    let ya = Axis::new(ylo, yhi, 6);
    y_axis(&mut out, &ya, y_label, has_legend);
    x_axis(&mut out, &xa, x_label, has_legend);
    let (l, t, r, b) = plot_box(has_legend);
    for (i, s) in series.iter().enumerate() {
        let (col, dashed) = colour(i);
        let dash = if dashed {
            r#" stroke-dasharray="5 3""#
        } else {
            ""
        };
        // One polyline per run of finite points.
        let mut run: Vec<(f64, f64)> = Vec::new();
        let flush = |run: &mut Vec<(f64, f64)>, out: &mut String| {
            if run.len() >= 2 {
                let coords: Vec<String> = run
                    .iter()
                    .map(|&(x, y)| format!("{},{}", c(x), c(y)))
                    .collect();
                let _ = write!(
                    out,
                    r#"<polyline points="{}" fill="none" stroke="{col}" stroke-width="2"{dash}/>"#,
                    coords.join(" ")
                );
            }
            run.clear();
        };
        for &(x, y) in &s.points {
            if x.is_finite() && y.is_finite() {
                run.push((xa.map(x, l, r), ya.map(y, b, t)));
            } else {
                flush(&mut run, &mut out);
            }
        }
        flush(&mut run, &mut out);
        for &(x, y) in s.points.iter().filter(|p| finite(p)) {
            let _ = write!(
                out,
                r#"<circle cx="{}" cy="{}" r="3" fill="{col}"><title>{}: ({}, {})</title></circle>"#,
                c(xa.map(x, l, r)),
                c(ya.map(y, b, t)),
                escape(&s.name),
                format_value(x),
                format_value(y)
            );
        }
    }
    let names: Vec<&str> = series.iter().map(|s| s.name.as_str()).collect();
    legend(&mut out, &names, false);
    out.push_str("</svg>");
    out
}

/// A grouped bar chart: one group per entry of `groups` along the x axis,
/// one bar per series inside each group (`series[i].1[g]` is series `i`'s
/// value in group `g`), each bar labelled with its value. A missing or
/// non-finite value leaves a gap labelled "n/a".
pub fn bar_chart(
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[(String, Vec<f64>)],
) -> String {
    let mut out = String::new();
    open_svg(&mut out, title);
    let has_legend = !series.is_empty();
    let vals = || {
        series
            .iter()
            .flat_map(|s| s.1.iter().take(groups.len()))
            .copied()
            .filter(|v| v.is_finite())
    };
    if groups.is_empty() || vals().next().is_none() {
        no_data(&mut out, has_legend);
        let names: Vec<&str> = series.iter().map(|s| s.0.as_str()).collect();
        legend(&mut out, &names, true);
        out.push_str("</svg>");
        return out;
    }
    let (l, t, r, b) = plot_box(has_legend);
    let group_w = (r - l) / groups.len() as f64;
    let nseries = series.len().max(1);
    let bar_w = group_w * 0.8 / nseries as f64;
    // Labels turn sideways when the bars are too narrow for them.
    let sideways = bar_w < 30.0;
    let lo = vals().fold(0f64, f64::min);
    let hi = vals().fold(0f64, f64::max);
    // Headroom above (and below) the longest bars for their labels.
    let room = (hi - lo) * if sideways { 0.12 } else { 0.06 };
    let ya = Axis::new(
        if lo < 0.0 { lo - room } else { lo },
        if hi > 0.0 { hi + room } else { hi },
        6,
    );
    y_axis(&mut out, &ya, y_label, has_legend);
    let zero = ya.map(0.0, b, t);
    let font = if bar_w < 9.0 { 8 } else { 10 };
    for (g, name) in groups.iter().enumerate() {
        let gx = l + group_w * g as f64;
        for (i, (sname, values)) in series.iter().enumerate() {
            let (col, _) = colour(i);
            let x = gx + group_w * 0.1 + bar_w * i as f64;
            let cx = x + bar_w / 2.0;
            let v = values.get(g).copied().unwrap_or(f64::NAN);
            let label = format_value(v);
            let (ly, top_of_bar) = if v.is_finite() {
                let py = ya.map(v, b, t);
                let (y0, h) = if py < zero {
                    (py, zero - py)
                } else {
                    (zero, py - zero)
                };
                let _ = write!(
                    out,
                    r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{col}"><title>{}, {}: {}</title></rect>"#,
                    c(x),
                    c(y0),
                    c(bar_w.max(0.5)),
                    c(h),
                    escape(sname),
                    escape(name),
                    label
                );
                if v >= 0.0 {
                    (py - 4.0, true)
                } else {
                    (py + 12.0, false)
                }
            } else {
                (zero - 4.0, true)
            };
            if sideways {
                let anchor = if top_of_bar { "start" } else { "end" };
                let _ = write!(
                    out,
                    r##"<text x="{x}" y="{y}" font-size="{font}" text-anchor="{anchor}" fill="#333333" transform="rotate(-90 {x} {y})">{label}</text>"##,
                    x = c(cx + 3.0),
                    y = c(ly),
                );
            } else {
                let _ = write!(
                    out,
                    r##"<text x="{}" y="{}" font-size="{font}" text-anchor="middle" fill="#333333">{label}</text>"##,
                    c(cx),
                    c(ly),
                );
            }
        }
        let shown: String = if name.chars().count() > 18 {
            name.chars().take(17).chain(['…']).collect()
        } else {
            name.clone()
        };
        let _ = write!(
            out,
            r##"<text x="{}" y="{}" text-anchor="middle" fill="#333333"><title>{}</title>{}</text>"##,
            c(gx + group_w / 2.0),
            c(b + 18.0),
            escape(name),
            escape(&shown)
        );
    }
    let names: Vec<&str> = series.iter().map(|s| s.0.as_str()).collect();
    legend(&mut out, &names, true);
    out.push_str("</svg>");
    out
}

/// A histogram of `(low, high, count)` buckets over a numeric x axis; each
/// bar spans its bucket. Buckets with non-finite or reversed bounds are
/// skipped.
pub fn histogram(title: &str, x_label: &str, buckets: &[(f64, f64, u64)]) -> String {
    let mut out = String::new();
    open_svg(&mut out, title);
    let ok: Vec<(f64, f64, u64)> = buckets
        .iter()
        .copied()
        .filter(|(lo, hi, _)| lo.is_finite() && hi.is_finite() && hi >= lo)
        .collect();
    if ok.is_empty() {
        no_data(&mut out, false);
        out.push_str("</svg>");
        return out;
    }
    let xlo = ok.iter().map(|b| b.0).fold(f64::INFINITY, f64::min);
    let xhi = ok.iter().map(|b| b.1).fold(f64::NEG_INFINITY, f64::max);
    let ymax = ok.iter().map(|b| b.2).max().unwrap_or(0) as f64;
    let xa = Axis::new(xlo, xhi, 8);
    let ya = Axis::new(0.0, ymax, 6);
    y_axis(&mut out, &ya, "count", false);
    x_axis(&mut out, &xa, x_label, false);
    let (l, t, r, b) = plot_box(false);
    let (col, _) = colour(0);
    for (lo, hi, n) in ok {
        let x0 = xa.map(lo, l, r);
        let x1 = xa.map(hi, l, r);
        let y = ya.map(n as f64, b, t);
        let _ = write!(
            out,
            r##"<rect x="{}" y="{}" width="{}" height="{}" fill="{col}" stroke="#ffffff" stroke-width="0.5"><title>{} – {}: {}</title></rect>"##,
            c(x0),
            c(y),
            c((x1 - x0).max(0.5)),
            c(b - y),
            format_value(lo),
            format_value(hi),
            n
        );
    }
    out.push_str("</svg>");
    out
}

/// Charts from this module stacked top to bottom in one `<svg>` (one file
/// holding several charts). Each input must be a whole `<svg>` element as
/// these functions return; an empty list gives an empty picture.
pub fn stack(charts: &[String]) -> String {
    let h = HEIGHT * charts.len() as f64;
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">"#,
        w = WIDTH,
        h = h
    );
    for (i, svg) in charts.iter().enumerate() {
        // Nested <svg> elements are placed by their x/y attributes.
        let placed = svg.replacen(
            "<svg ",
            &format!(r#"<svg x="0" y="{}" "#, c(HEIGHT * i as f64)),
            1,
        );
        out.push_str(&placed);
    }
    out.push_str("</svg>");
    out
}

/// A self-contained HTML page: `title` as its heading, then one section per
/// `(heading, content)`. Headings are text (escaped); contents are markup —
/// the SVG from this module or HTML the caller built (and escaped) itself —
/// and are inserted as they are. The page loads nothing from elsewhere.
pub fn html_page(title: &str, sections: &[(String, String)]) -> String {
    let mut out = String::new();
    let t = escape(title);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{t}</title>\n<style>\n\
         body {{ font-family: sans-serif; margin: 2em auto; max-width: 64em; padding: 0 1em; color: #222; }}\n\
         h1 {{ font-size: 1.6em; }} h2 {{ font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }}\n\
         table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}\n\
         th:first-child, td:first-child {{ text-align: left; }}\n\
         svg {{ max-width: 100%; height: auto; }}\n\
         </style>\n</head>\n<body>\n<h1>{t}</h1>\n"
    );
    for (heading, content) in sections {
        let _ = write!(
            out,
            "<section>\n<h2>{}</h2>\n{}\n</section>\n",
            escape(heading),
            content
        );
    }
    out.push_str("</body>\n</html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks that `s` is well-formed enough for a browser and an XML
    /// parser: tags balance, attribute values are quoted, every `&` starts
    /// an entity, and no bare `<` or `>` stands in text.
    fn assert_well_formed(s: &str) {
        let mut stack: Vec<String> = Vec::new();
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'<' => {
                    let end = s[i..].find('>').map(|e| i + e).expect("unclosed tag");
                    let tag = &s[i + 1..end];
                    assert!(!tag.contains('<'), "'<' inside tag: {tag}");
                    if tag.starts_with('!') {
                        // <!DOCTYPE html>
                    } else if let Some(name) = tag.strip_prefix('/') {
                        let open = stack.pop().unwrap_or_else(|| panic!("stray </{name}>"));
                        assert_eq!(open, name, "</{name}> closes <{open}>");
                    } else {
                        let name: String = tag
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric())
                            .collect();
                        assert!(!name.is_empty(), "empty tag name in <{tag}>");
                        assert_eq!(tag.matches('"').count() % 2, 0, "unbalanced quotes: {tag}");
                        let void = ["meta", "br", "hr", "img", "link", "input"];
                        if !tag.ends_with('/') && !void.contains(&name.as_str()) {
                            stack.push(name);
                        }
                    }
                    i = end + 1;
                }
                b'>' => panic!("bare '>' at {i}: {}", &s[i.saturating_sub(40)..i + 1]),
                b'&' => {
                    let rest = &s[i..];
                    let semi = rest.find(';').expect("'&' with no ';'");
                    let ent = &rest[1..semi];
                    assert!(
                        ["amp", "lt", "gt", "quot", "#39"].contains(&ent),
                        "bad entity &{ent};"
                    );
                    i += semi + 1;
                }
                _ => i += 1,
            }
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
    }

    /// No NaN, inf or empty numbers in any attribute.
    fn assert_numbers_finite(s: &str) {
        for bad in ["NaN", "inf", "=\"\"", "=\"-\""] {
            assert!(!s.contains(bad), "output contains {bad}: {s}");
        }
    }

    fn sample() -> Vec<Series> {
        vec![
            Series {
                name: "tokio".into(),
                points: vec![(100.0, 213_000.0), (1000.0, 190_000.0), (5000.0, 170_000.0)],
            },
            Series {
                name: "cport".into(),
                points: vec![(100.0, 230_000.0), (1000.0, 225_000.0), (5000.0, 220_000.0)],
            },
        ]
    }

    #[test]
    fn line_chart_is_well_formed_with_legend_and_colours() {
        let svg = line_chart("req/s", "connections", "requests/s", &sample());
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.ends_with("</svg>"));
        assert_well_formed(&svg);
        assert_numbers_finite(&svg);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains(PALETTE[0]) && svg.contains(PALETTE[1]));
        assert!(svg.contains(">tokio</text>") && svg.contains(">cport</text>"));
        // Nice ticks: y from 0 to 250k in 50k steps.
        assert!(svg.contains(">0</text>"));
        assert!(svg.contains(">250k</text>"), "{svg}");
    }

    #[test]
    fn nice_ticks() {
        let a = Axis::new(0.0, 213_000.0, 6);
        assert_eq!(a.step, 50_000.0);
        assert_eq!(a.lo, 0.0);
        assert_eq!(a.hi, 250_000.0);
        assert_eq!(a.labels(), ["0", "50k", "100k", "150k", "200k", "250k"]);
        let a = Axis::new(0.013, 0.087, 6);
        assert_eq!(a.step, 0.01);
        assert_eq!(a.labels()[..2], ["0.01", "0.02"]);
        let a = Axis::new(0.0, 0.087, 6);
        assert_eq!(a.labels()[..2], ["0", "0.02"]);
        let a = Axis::new(5.0, 5.0, 6);
        assert!(a.lo < 5.0 && a.hi > 5.0);
        let a = Axis::new(-3.0, 7.0, 6);
        assert!(a.ticks.contains(&0.0));
        assert!(a.labels().iter().all(|l| l != "-0"));
    }

    #[test]
    fn text_is_escaped_everywhere() {
        let evil = "<script>alert('x')</script> & \"q\"";
        let series = vec![Series {
            name: evil.into(),
            points: vec![(1.0, 1.0), (2.0, 3.0)],
        }];
        let svg = line_chart(evil, evil, evil, &series);
        assert!(!svg.contains("<script>"));
        assert!(
            svg.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;")
        );
        assert_well_formed(&svg);
        let bars = bar_chart(
            evil,
            evil,
            &[evil.to_string()],
            &[(evil.to_string(), vec![1.0])],
        );
        assert!(!bars.contains("<script>"));
        assert_well_formed(&bars);
        let hist = histogram(evil, evil, &[(0.0, 1.0, 3)]);
        assert!(!hist.contains("<script>"));
        assert_well_formed(&hist);
        let page = html_page(evil, &[(evil.to_string(), svg)]);
        assert!(!page.contains("<script>"));
        assert_well_formed(&page);
        assert_eq!(escape("a\u{1}b"), "a b");
    }

    #[test]
    fn empty_inputs_say_no_data() {
        for svg in [
            line_chart("t", "x", "y", &[]),
            line_chart(
                "t",
                "x",
                "y",
                &[Series {
                    name: "s".into(),
                    points: vec![],
                }],
            ),
            bar_chart("t", "y", &[], &[]),
            bar_chart("t", "y", &["g".into()], &[("s".into(), vec![])]),
            histogram("t", "x", &[]),
        ] {
            assert_well_formed(&svg);
            assert_numbers_finite(&svg);
            assert!(svg.contains("no data"), "{svg}");
        }
        let page = html_page("empty", &[]);
        assert_well_formed(&page);
        assert!(page.starts_with("<!DOCTYPE html>"));
    }

    #[test]
    fn non_finite_values_are_skipped() {
        let series = vec![Series {
            name: "s".into(),
            points: vec![
                (1.0, 1.0),
                (2.0, f64::NAN),
                (3.0, 2.0),
                (4.0, 4.0),
                (f64::INFINITY, 1.0),
                (5.0, f64::NEG_INFINITY),
            ],
        }];
        let svg = line_chart("t", "x", "y", &series);
        assert_well_formed(&svg);
        assert_numbers_finite(&svg);
        // (1,1) alone before the NaN draws no line; (3,2)-(4,4) does.
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert_eq!(svg.matches("<circle").count(), 3);

        let only_nan = vec![Series {
            name: "s".into(),
            points: vec![(f64::NAN, f64::NAN)],
        }];
        assert!(line_chart("t", "x", "y", &only_nan).contains("no data"));

        let bars = bar_chart(
            "t",
            "y",
            &["a".into(), "b".into(), "c".into()],
            &[
                ("s".into(), vec![1.0, f64::NAN]),
                ("u".into(), vec![f64::INFINITY, 2.0, 3.0]),
            ],
        );
        assert_well_formed(&bars);
        assert_numbers_finite(&bars);
        assert_eq!(bars.matches("<rect x=").count(), 1 + 3 + 2, "{bars}");
        assert!(bars.contains(">n/a</text>"));

        let hist = histogram(
            "t",
            "µs",
            &[
                (0.0, 10.0, 5),
                (10.0, f64::NAN, 3),
                (20.0, 10.0, 1),
                (10.0, 20.0, 9),
            ],
        );
        assert_well_formed(&hist);
        assert_numbers_finite(&hist);
        assert_eq!(hist.matches("<rect x=").count(), 1 + 2);
    }

    #[test]
    fn bar_chart_labels_values_and_handles_negatives() {
        let groups = vec!["pingpong".to_string(), "flood".to_string()];
        let series = vec![
            ("tokio".to_string(), vec![213_000.0, 1_200.0]),
            ("cport".to_string(), vec![-5.0, 0.5]),
        ];
        let svg = bar_chart("mixed", "value", &groups, &series);
        assert_well_formed(&svg);
        assert_numbers_finite(&svg);
        assert!(svg.contains(">213k</text>"), "{svg}");
        assert!(svg.contains(">1200</text>"));
        assert!(svg.contains(">-5.00</text>"));
        assert!(svg.contains(">0.50</text>"));
        assert!(svg.contains(">pingpong</text>"));
    }

    #[test]
    fn many_series_reuse_colours_dashed_and_legend_fits() {
        let series: Vec<Series> = (0..30)
            .map(|i| Series {
                name: format!("series number {i} with a rather long name"),
                points: vec![(0.0, i as f64), (1.0, i as f64 * 2.0)],
            })
            .collect();
        let svg = line_chart("many", "x", "y", &series);
        assert_well_formed(&svg);
        assert!(svg.contains("stroke-dasharray"));
        assert!(svg.contains("more</text>"));
    }

    #[test]
    fn stacked_charts_are_one_svg() {
        let a = line_chart("a", "x", "y", &sample());
        let b = histogram("b", "x", &[(0.0, 1.0, 1)]);
        let s = stack(&[a, b]);
        assert_well_formed(&s);
        assert_eq!(s.matches("<svg").count(), 3);
        assert!(s.contains(r#"<svg x="0" y="420.0" "#), "{s}");
        assert!(s.contains(&format!(r#"height="{}""#, HEIGHT * 2.0)));
        assert_well_formed(&stack(&[]));
    }

    #[test]
    fn format_value_is_short() {
        assert_eq!(format_value(213_456.0), "213k");
        assert_eq!(format_value(1_234_567.0), "1235k");
        assert_eq!(format_value(12_345_678.0), "12.3M");
        assert_eq!(format_value(4.5), "4.50");
        assert_eq!(format_value(1.0), "1.00");
        assert_eq!(format_value(0.95), "0.95");
        assert_eq!(format_value(0.0), "0");
        assert_eq!(format_value(-5.0), "-5.00");
        assert_eq!(format_value(104.0), "104");
        assert_eq!(format_value(0.0123), "0.0123");
        assert_eq!(format_value(f64::NAN), "n/a");
    }
}
