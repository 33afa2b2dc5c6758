//! A small bar chart written as PNG, for `citadel bench`: no font files or plotting stack, a
//! built-in 5×7 font is enough for labels and numbers.

use std::path::Path;

use anyhow::{Context, Result};

/// One bar: its group on the x axis (e.g. "write c=64"), its series (e.g. "etcd"), its value.
pub struct Bar {
    pub group: String,
    pub series: String,
    pub value: f64,
}

pub struct Panel {
    pub title: String,
    pub bars: Vec<Bar>,
}

const WIDTH: usize = 960;
const PANEL_HEIGHT: usize = 300;
const SCALE: usize = 2;
const PALETTE: [[u8; 3]; 4] = [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40]];

struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Canvas {
        Canvas { width, height, pixels: vec![255; width * height * 3] }
    }

    fn rect(&mut self, x: usize, y: usize, w: usize, h: usize, color: [u8; 3]) {
        for yy in y..(y + h).min(self.height) {
            for xx in x..(x + w).min(self.width) {
                let i = (yy * self.width + xx) * 3;
                self.pixels[i..i + 3].copy_from_slice(&color);
            }
        }
    }

    /// Draws `text` with its top-left corner at (x, y).
    fn text(&mut self, x: usize, y: usize, text: &str, color: [u8; 3]) {
        for (n, c) in text.chars().enumerate() {
            let glyph = glyph(c.to_ascii_lowercase());
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0b10000 >> col) != 0 {
                        self.rect(x + n * 6 * SCALE + col * SCALE, y + row * SCALE, SCALE, SCALE, color);
                    }
                }
            }
        }
    }

    fn text_width(text: &str) -> usize {
        text.chars().count() * 6 * SCALE
    }
}

/// Renders `panels` one above the other, grouped bars per panel, and writes a PNG.
pub fn render(title: &str, panels: &[Panel], path: &Path) -> Result<()> {
    let height = 40 + panels.len() * PANEL_HEIGHT;
    let mut canvas = Canvas::new(WIDTH, height);
    canvas.text(20, 12, title, [0, 0, 0]);
    let mut series: Vec<&str> = Vec::new();
    for bar in panels.iter().flat_map(|p| &p.bars) {
        if !series.contains(&bar.series.as_str()) {
            series.push(&bar.series);
        }
    }
    // Legend, top right.
    let mut lx = WIDTH - 20;
    for (i, name) in series.iter().enumerate().rev() {
        lx -= Canvas::text_width(name) + 24;
        canvas.rect(lx, 12, 14, 14, PALETTE[i % PALETTE.len()]);
        canvas.text(lx + 18, 12, name, [0, 0, 0]);
    }
    for (p, panel) in panels.iter().enumerate() {
        draw_panel(&mut canvas, panel, &series, 40 + p * PANEL_HEIGHT);
    }
    let file = std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), WIDTH as u32, height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.write_header()?.write_image_data(&canvas.pixels)?;
    Ok(())
}

fn draw_panel(canvas: &mut Canvas, panel: &Panel, series: &[&str], top: usize) {
    let (left, right) = (60, WIDTH - 20);
    let plot_top = top + 40;
    let plot_bottom = top + PANEL_HEIGHT - 40;
    canvas.text(left, top + 10, &panel.title, [0, 0, 0]);
    canvas.rect(left, plot_bottom, right - left, 2, [0, 0, 0]);
    let mut groups: Vec<&str> = Vec::new();
    for bar in &panel.bars {
        if !groups.contains(&bar.group.as_str()) {
            groups.push(&bar.group);
        }
    }
    let max = panel.bars.iter().map(|b| b.value).fold(0.0_f64, f64::max);
    if groups.is_empty() || max <= 0.0 {
        return;
    }
    let group_width = (right - left) / groups.len();
    let bar_width = (group_width * 3 / 4) / series.len().max(1);
    for (g, group) in groups.iter().enumerate() {
        let gx = left + g * group_width + group_width / 8;
        let in_group: Vec<&Bar> = panel.bars.iter().filter(|b| b.group == *group).collect();
        // Labels wider than their bars would overlap: then only the group's tallest is labelled.
        let fits = in_group.iter().all(|b| Canvas::text_width(&format_value(b.value)) <= bar_width);
        let tallest = in_group.iter().map(|b| b.value).fold(f64::MIN, f64::max);
        let mut labelled = false;
        for (s, name) in series.iter().enumerate() {
            let Some(bar) = in_group.iter().find(|b| b.series == *name) else { continue };
            let h = ((bar.value / max) * (plot_bottom - plot_top) as f64) as usize;
            let x = gx + s * bar_width;
            canvas.rect(x + 2, plot_bottom - h, bar_width.saturating_sub(4), h, PALETTE[s % PALETTE.len()]);
            if !fits && (labelled || bar.value < tallest) {
                continue;
            }
            labelled = true;
            let label = format_value(bar.value);
            let lx = (x + bar_width / 2).saturating_sub(Canvas::text_width(&label) / 2);
            canvas.text(lx, (plot_bottom - h).saturating_sub(18), &label, [40, 40, 40]);
        }
        let gl = (left + g * group_width + group_width / 2).saturating_sub(Canvas::text_width(group) / 2);
        canvas.text(gl, plot_bottom + 10, group, [0, 0, 0]);
    }
}

fn format_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// 5×7 glyphs, one row per byte, the high five bits of the low byte from left to right.
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [0x0e, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0e],
        '1' => [0x04, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x0e],
        '2' => [0x0e, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1f],
        '3' => [0x1f, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0e],
        '4' => [0x02, 0x06, 0x0a, 0x12, 0x1f, 0x02, 0x02],
        '5' => [0x1f, 0x10, 0x1e, 0x01, 0x01, 0x11, 0x0e],
        '6' => [0x06, 0x08, 0x10, 0x1e, 0x11, 0x11, 0x0e],
        '7' => [0x1f, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0e, 0x11, 0x11, 0x0e, 0x11, 0x11, 0x0e],
        '9' => [0x0e, 0x11, 0x11, 0x0f, 0x01, 0x02, 0x0c],
        'a' => [0x00, 0x00, 0x0e, 0x01, 0x0f, 0x11, 0x0f],
        'b' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1e],
        'c' => [0x00, 0x00, 0x0e, 0x10, 0x10, 0x11, 0x0e],
        'd' => [0x01, 0x01, 0x0d, 0x13, 0x11, 0x11, 0x0f],
        'e' => [0x00, 0x00, 0x0e, 0x11, 0x1f, 0x10, 0x0e],
        'f' => [0x06, 0x09, 0x08, 0x1c, 0x08, 0x08, 0x08],
        'g' => [0x00, 0x0f, 0x11, 0x11, 0x0f, 0x01, 0x0e],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'i' => [0x04, 0x00, 0x0c, 0x04, 0x04, 0x04, 0x0e],
        'j' => [0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0c],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
        'l' => [0x0c, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e],
        'm' => [0x00, 0x00, 0x1a, 0x15, 0x15, 0x11, 0x11],
        'n' => [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0x00, 0x00, 0x0e, 0x11, 0x11, 0x11, 0x0e],
        'p' => [0x00, 0x00, 0x1e, 0x11, 0x1e, 0x10, 0x10],
        'q' => [0x00, 0x00, 0x0d, 0x13, 0x0f, 0x01, 0x01],
        'r' => [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0x00, 0x00, 0x0e, 0x10, 0x0e, 0x01, 0x1e],
        't' => [0x08, 0x08, 0x1c, 0x08, 0x08, 0x09, 0x06],
        'u' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0d],
        'v' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x0a, 0x04],
        'w' => [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0a],
        'x' => [0x00, 0x00, 0x11, 0x0a, 0x04, 0x0a, 0x11],
        'y' => [0x00, 0x00, 0x11, 0x11, 0x0f, 0x01, 0x0e],
        'z' => [0x00, 0x00, 0x1f, 0x02, 0x04, 0x08, 0x1f],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0c, 0x0c],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0c, 0x04, 0x08],
        ':' => [0x00, 0x0c, 0x0c, 0x00, 0x0c, 0x0c, 0x00],
        '-' => [0x00, 0x00, 0x00, 0x1f, 0x00, 0x00, 0x00],
        '=' => [0x00, 0x00, 0x1f, 0x00, 0x1f, 0x00, 0x00],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '+' => [0x00, 0x04, 0x04, 0x1f, 0x04, 0x04, 0x00],
        _ => [0; 7],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_a_png_of_the_expected_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.png");
        let bars = vec![
            Bar { group: "write c=1".into(), series: "citadel".into(), value: 900.0 },
            Bar { group: "write c=1".into(), series: "etcd".into(), value: 450.0 },
        ];
        render("bench", &[Panel { title: "ops/s".into(), bars }], &path).unwrap();
        let decoder = png::Decoder::new(std::fs::File::open(&path).unwrap());
        let reader = decoder.read_info().unwrap();
        assert_eq!((reader.info().width, reader.info().height), (WIDTH as u32, 40 + PANEL_HEIGHT as u32));
    }
}
