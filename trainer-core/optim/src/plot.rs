//! The training-loss chart LLaMA-Factory writes at the end of a run (`plot_loss`,
//! `training_loss.png`): the raw loss per logged step as a light line and its exponential
//! moving average as a darker one, drawn with a small software rasterizer (no fonts: axis
//! labels use a built-in 3x5 bitmap font for digits, `.`, `e`, `-` and `+`).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Image width in pixels.
const WIDTH: usize = 640;
/// Image height in pixels.
const HEIGHT: usize = 480;
/// Plot area: left edge (room for the y labels), top, right and bottom edges.
const LEFT: i64 = 84;
const TOP: i64 = 16;
const RIGHT: i64 = WIDTH as i64 - 16;
const BOTTOM: i64 = HEIGHT as i64 - 40;
/// Length of tick marks, outside the frame.
const TICK: i64 = 5;
/// The bitmap font is drawn at this many pixels per font pixel.
const FONT_SCALE: i64 = 2;
/// Horizontal advance of one character: 3 font pixels and 1 of spacing.
const ADVANCE: i64 = 4 * FONT_SCALE;

type Rgb = [u8; 3];
const WHITE: Rgb = [255, 255, 255];
const BLACK: Rgb = [0, 0, 0];
const LABEL: Rgb = [64, 64, 64];
/// Matplotlib's default blue (`#1f77b4`), which LLaMA-Factory uses for both lines.
const SMOOTH: Rgb = [31, 119, 180];
/// The same blue at alpha 0.4 over white, as LLaMA-Factory draws the raw loss.
const RAW: Rgb = [165, 201, 225];

/// Writes a PNG line chart of `points` (step, loss) to `path`: 640x480, white background, a
/// frame with tick marks, the raw loss as a light line and its exponential moving average as a
/// darker line, smoothed as LLaMA-Factory's `smooth()` does (weight
/// `1.8 * (1/(1+exp(-0.05*len)) - 0.5)`).
///
/// Points whose loss is not finite are left out; with fewer than 2 left, the chart is an empty
/// frame (still a valid PNG). The x axis is labelled with the first and last step, the y axis
/// with the lowest and highest loss, in a 3x5 bitmap font; three unlabelled ticks divide each
/// labelled range in four. The PNG is written next to `path` (same name plus `.tmp`), synced,
/// then renamed over `path`.
///
/// # Errors
///
/// I/O errors from writing or renaming the file; `InvalidInput` when `path` has no file name.
pub fn write_loss_png(path: &Path, points: &[(u64, f64)]) -> io::Result<()> {
    let png = encode_png(&render(points))?;
    let tmp = temp_path(path)?;
    let written = fs::File::create(&tmp).and_then(|mut file| {
        file.write_all(&png)?;
        file.sync_all()
    });
    if let Err(err) = written.and_then(|()| fs::rename(&tmp, path)) {
        // Best effort: the original error is the one worth reporting.
        let _ = fs::remove_file(&tmp);
        return Err(err);
    }
    Ok(())
}

/// `path` with `.tmp` appended to its file name.
fn temp_path(path: &Path) -> io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("loss plot path {} has no file name", path.display()),
        )
    })?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".tmp");
    Ok(path.with_file_name(tmp_name))
}

/// LLaMA-Factory's `smooth`: an exponential moving average started at the first value, with a
/// weight that grows with the number of points (about 0 for a handful, 0.9 for hundreds).
fn smooth(values: &[f64]) -> Vec<f64> {
    let Some(&first) = values.first() else {
        return Vec::new();
    };
    let weight = smoothing_weight(values.len());
    let mut last = first;
    values
        .iter()
        .map(|&v| {
            last = last * weight + (1.0 - weight) * v;
            last
        })
        .collect()
}

/// `1.8 * (sigmoid(0.05 * len) - 0.5)`.
fn smoothing_weight(len: usize) -> f64 {
    1.8 * (1.0 / (1.0 + (-0.05 * len as f64).exp()) - 0.5)
}

/// An RGB raster with clipped pixel writes.
struct Canvas {
    pixels: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Canvas {
            pixels: WHITE.repeat(WIDTH * HEIGHT),
        }
    }

    fn set(&mut self, x: i64, y: i64, color: Rgb) {
        if (0..WIDTH as i64).contains(&x) && (0..HEIGHT as i64).contains(&y) {
            let i = (y as usize * WIDTH + x as usize) * 3;
            self.pixels[i..i + 3].copy_from_slice(&color);
        }
    }

    #[cfg(test)]
    fn get(&self, x: i64, y: i64) -> Rgb {
        let i = (y as usize * WIDTH + x as usize) * 3;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }

    fn fill_rect(&mut self, x: i64, y: i64, w: i64, h: i64, color: Rgb) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx, yy, color);
            }
        }
    }

    /// Bresenham's line with a square brush of side `thickness`.
    fn line(&mut self, from: (i64, i64), to: (i64, i64), color: Rgb, thickness: i64) {
        let (mut x, mut y) = from;
        let dx = (to.0 - x).abs();
        let dy = -(to.1 - y).abs();
        let sx = if x < to.0 { 1 } else { -1 };
        let sy = if y < to.1 { 1 } else { -1 };
        let mut err = dx + dy;
        let offset = (thickness - 1) / 2;
        loop {
            self.fill_rect(x - offset, y - offset, thickness, thickness, color);
            if (x, y) == to {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Draws `text` with its top-left corner at (x, y); unknown characters leave a blank.
    fn text(&mut self, x: i64, y: i64, text: &str, color: Rgb) {
        for (i, c) in text.chars().enumerate() {
            let Some(rows) = glyph(c) else { continue };
            let left = x + i as i64 * ADVANCE;
            for (row, bits) in rows.iter().enumerate() {
                for col in 0..3 {
                    if bits & (0b100 >> col) != 0 {
                        self.fill_rect(
                            left + col * FONT_SCALE,
                            y + row as i64 * FONT_SCALE,
                            FONT_SCALE,
                            FONT_SCALE,
                            color,
                        );
                    }
                }
            }
        }
    }
}

/// Width in pixels of `text` drawn by [`Canvas::text`].
fn text_width(text: &str) -> i64 {
    let n = text.chars().count() as i64;
    if n == 0 { 0 } else { n * ADVANCE - FONT_SCALE }
}

/// Height in pixels of a line of text.
const TEXT_HEIGHT: i64 = 5 * FONT_SCALE;

/// The 3x5 glyph of `c`: five rows, the left column in bit 2.
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [0b111, 0b101, 0b101, 0b101, 0b111],
        '1' => [0b010, 0b110, 0b010, 0b010, 0b111],
        '2' => [0b111, 0b001, 0b111, 0b100, 0b111],
        '3' => [0b111, 0b001, 0b111, 0b001, 0b111],
        '4' => [0b101, 0b101, 0b111, 0b001, 0b001],
        '5' => [0b111, 0b100, 0b111, 0b001, 0b111],
        '6' => [0b111, 0b100, 0b111, 0b101, 0b111],
        '7' => [0b111, 0b001, 0b001, 0b001, 0b001],
        '8' => [0b111, 0b101, 0b111, 0b101, 0b111],
        '9' => [0b111, 0b101, 0b111, 0b001, 0b111],
        '.' => [0b000, 0b000, 0b000, 0b000, 0b010],
        '-' => [0b000, 0b000, 0b111, 0b000, 0b000],
        '+' => [0b000, 0b010, 0b111, 0b010, 0b000],
        'e' => [0b000, 0b011, 0b111, 0b100, 0b011],
        _ => return None,
    })
}

/// A short label for an axis value: up to 4 significant digits, scientific notation (Rust's
/// `1.5e-5` form) outside [1e-3, 1e6).
fn format_tick(v: f64) -> String {
    if v == 0.0 {
        return "0".to_owned();
    }
    let magnitude = v.abs();
    if (1e-3..1e6).contains(&magnitude) {
        let decimals = (3 - magnitude.log10().floor() as i64).clamp(0, 6) as usize;
        trim_fraction(&format!("{v:.decimals$}")).to_owned()
    } else {
        let formatted = format!("{v:.3e}");
        match formatted.split_once('e') {
            Some((mantissa, exponent)) => format!("{}e{exponent}", trim_fraction(mantissa)),
            None => formatted,
        }
    }
}

/// Drops trailing zeros of a decimal fraction, and the point if nothing is left after it.
fn trim_fraction(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// Maps data coordinates into the plot area.
struct Axes {
    x_lo: f64,
    x_hi: f64,
    y_lo: f64,
    y_hi: f64,
}

impl Axes {
    /// Limits covering `[x_min, x_max] x [y_min, y_max]` with a 4% margin on every side, as
    /// matplotlib's default margins leave.
    fn new(x_min: f64, x_max: f64, y_min: f64, y_max: f64) -> Self {
        let (x_lo, x_hi) = padded(x_min, x_max);
        let (y_lo, y_hi) = padded(y_min, y_max);
        Axes {
            x_lo,
            x_hi,
            y_lo,
            y_hi,
        }
    }

    fn px(&self, x: f64) -> i64 {
        let frac = (x - self.x_lo) / (self.x_hi - self.x_lo);
        LEFT + (frac * (RIGHT - LEFT) as f64).round() as i64
    }

    fn py(&self, y: f64) -> i64 {
        let frac = (y - self.y_lo) / (self.y_hi - self.y_lo);
        BOTTOM - (frac * (BOTTOM - TOP) as f64).round() as i64
    }
}

fn padded(lo: f64, hi: f64) -> (f64, f64) {
    let span = hi - lo;
    if span > 0.0 {
        (lo - 0.04 * span, hi + 0.04 * span)
    } else {
        let half = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        (lo - half, hi + half)
    }
}

/// Draws the chart; returns the RGB canvas.
fn render(points: &[(u64, f64)]) -> Canvas {
    let mut canvas = Canvas::new();
    let finite: Vec<(u64, f64)> = points
        .iter()
        .copied()
        .filter(|(_, loss)| loss.is_finite())
        .collect();
    if finite.len() >= 2 {
        draw_series(&mut canvas, &finite);
    }
    // The frame last, so that lines at the margins do not cover it.
    for (from, to) in [
        ((LEFT, TOP), (RIGHT, TOP)),
        ((RIGHT, TOP), (RIGHT, BOTTOM)),
        ((RIGHT, BOTTOM), (LEFT, BOTTOM)),
        ((LEFT, BOTTOM), (LEFT, TOP)),
    ] {
        canvas.line(from, to, BLACK, 1);
    }
    canvas
}

fn draw_series(canvas: &mut Canvas, points: &[(u64, f64)]) {
    let losses: Vec<f64> = points.iter().map(|&(_, loss)| loss).collect();
    let smoothed = smooth(&losses);
    let x_min = points.iter().map(|&(s, _)| s).min().unwrap_or(0);
    let x_max = points.iter().map(|&(s, _)| s).max().unwrap_or(0);
    // The moving average stays within the raw range, so the raw extremes bound both lines.
    let y_min = losses.iter().copied().fold(f64::INFINITY, f64::min);
    let y_max = losses.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let axes = Axes::new(x_min as f64, x_max as f64, y_min, y_max);

    for (series, color, thickness) in [(&losses, RAW, 1), (&smoothed, SMOOTH, 2)] {
        let pixels: Vec<(i64, i64)> = points
            .iter()
            .zip(series.iter())
            .map(|(&(step, _), &y)| (axes.px(step as f64), axes.py(y)))
            .collect();
        for pair in pixels.windows(2) {
            canvas.line(pair[0], pair[1], color, thickness);
        }
    }

    // X ticks below the frame, labelled at the first and last step.
    let (x0, x1) = (axes.px(x_min as f64), axes.px(x_max as f64));
    for i in 0..=4 {
        let x = x0 + (x1 - x0) * i / 4;
        canvas.line((x, BOTTOM + 1), (x, BOTTOM + TICK), BLACK, 1);
    }
    let label_y = BOTTOM + TICK + 4;
    let mut x_labels = vec![(x0, x_min.to_string())];
    if x1 != x0 {
        x_labels.push((x1, x_max.to_string()));
    }
    for (x, label) in x_labels {
        let w = text_width(&label);
        let left = (x - w / 2).clamp(0, WIDTH as i64 - w);
        canvas.text(left, label_y, &label, LABEL);
    }

    // Y ticks left of the frame, labelled at the lowest and highest loss.
    let (y0, y1) = (axes.py(y_min), axes.py(y_max));
    for i in 0..=4 {
        let y = y0 + (y1 - y0) * i / 4;
        canvas.line((LEFT - TICK, y), (LEFT - 1, y), BLACK, 1);
    }
    let mut y_labels = vec![(y0, format_tick(y_min))];
    if y1 != y0 {
        y_labels.push((y1, format_tick(y_max)));
    }
    for (y, label) in y_labels {
        let left = (LEFT - TICK - 4 - text_width(&label)).max(0);
        canvas.text(left, y - TEXT_HEIGHT / 2, &label, LABEL);
    }
}

/// Encodes an RGB canvas as an 8-bit PNG in memory.
fn encode_png(canvas: &Canvas) -> io::Result<Vec<u8>> {
    let to_io = |err: png::EncodingError| match err {
        png::EncodingError::IoError(err) => err,
        other => io::Error::other(other),
    };
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, WIDTH as u32, HEIGHT as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(to_io)?;
    writer.write_image_data(&canvas.pixels).map_err(to_io)?;
    writer.finish().map_err(to_io)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path under the system temp dir, unique to this process and test.
    fn temp_file(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("ringmaster-optim-{}-{name}", std::process::id()))
    }

    /// Decodes a PNG file into (width, height, RGB bytes).
    fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
        let file = io::BufReader::new(fs::File::open(path).unwrap());
        let mut reader = png::Decoder::new(file).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn pixel(rgb: &[u8], x: i64, y: i64) -> Rgb {
        let i = (y as usize * WIDTH + x as usize) * 3;
        [rgb[i], rgb[i + 1], rgb[i + 2]]
    }

    fn curve(n: u64) -> Vec<(u64, f64)> {
        (0..n)
            .map(|i| {
                (
                    10 * (i + 1),
                    2.5 * (-(i as f64) / 30.0).exp() + 0.1 * (i % 3) as f64,
                )
            })
            .collect()
    }

    #[test]
    fn writes_a_decodable_chart_with_lines() {
        let path = temp_file("loss.png");
        let points = curve(100);
        write_loss_png(&path, &points).unwrap();
        assert!(
            !temp_path(&path).unwrap().exists(),
            "temp file renamed away"
        );
        let (w, h, rgb) = decode(&path);
        assert_eq!((w, h), (WIDTH as u32, HEIGHT as u32));
        assert_eq!(rgb.len(), WIDTH * HEIGHT * 3);

        // Background outside the frame and inside it away from the curve.
        assert_eq!(pixel(&rgb, 2, 2), WHITE);
        assert_eq!(pixel(&rgb, RIGHT - 10, TOP + 10), WHITE);
        // The frame.
        assert_eq!(pixel(&rgb, LEFT, (TOP + BOTTOM) / 2), BLACK);
        assert_eq!(pixel(&rgb, (LEFT + RIGHT) / 2, BOTTOM), BLACK);

        // The smoothed line passes through its own points (drawn last, on top).
        let losses: Vec<f64> = points.iter().map(|p| p.1).collect();
        let smoothed = smooth(&losses);
        let y_min = losses.iter().copied().fold(f64::INFINITY, f64::min);
        let y_max = losses.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let axes = Axes::new(10.0, 1000.0, y_min, y_max);
        for i in [1, 50, 98] {
            let (x, y) = (axes.px(points[i].0 as f64), axes.py(smoothed[i]));
            assert_eq!(pixel(&rgb, x, y), SMOOTH, "smoothed point {i}");
        }
        // The raw line shows where the smoothed one is not: the first raw point is the
        // highest loss, above the average.
        let (x, y) = (axes.px(10.0), axes.py(losses[0]));
        assert_ne!(pixel(&rgb, x, y), WHITE);
        // Labels: some label-coloured pixels left of the frame and below it.
        let has_label = |xs: std::ops::Range<i64>, ys: std::ops::Range<i64>| {
            ys.clone()
                .any(|y| xs.clone().any(|x| pixel(&rgb, x, y) == LABEL))
        };
        assert!(has_label(0..LEFT - TICK, TOP..BOTTOM + 10));
        assert!(has_label(
            LEFT - 20..RIGHT + 20,
            BOTTOM + TICK..HEIGHT as i64
        ));
        fs::remove_file(&path).unwrap();
    }

    #[test]
    fn too_few_points_give_empty_axes() {
        for points in [
            vec![],
            vec![(1, 2.0)],
            vec![(1, f64::NAN), (2, f64::INFINITY)],
        ] {
            let path = temp_file("empty.png");
            write_loss_png(&path, &points).unwrap();
            let (w, h, rgb) = decode(&path);
            assert_eq!((w, h), (WIDTH as u32, HEIGHT as u32));
            assert_eq!(pixel(&rgb, LEFT, (TOP + BOTTOM) / 2), BLACK);
            assert_eq!(pixel(&rgb, (LEFT + RIGHT) / 2, (TOP + BOTTOM) / 2), WHITE);
            assert!(rgb.chunks(3).all(|p| p == WHITE || p == BLACK));
            fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn flat_and_non_finite_series_still_draw() {
        // A constant loss (zero range) and NaN entries among finite ones.
        let points = vec![(1, 1.5), (2, f64::NAN), (3, 1.5), (4, 1.5)];
        let canvas = render(&points);
        let axes = Axes::new(1.0, 4.0, 1.5, 1.5);
        assert_eq!(canvas.get(axes.px(2.0), axes.py(1.5)), SMOOTH);
    }

    #[test]
    fn overwrites_and_reports_io_errors() {
        let path = temp_file("twice.png");
        write_loss_png(&path, &curve(3)).unwrap();
        write_loss_png(&path, &curve(5)).unwrap();
        assert_eq!(decode(&path).0, WIDTH as u32);
        fs::remove_file(&path).unwrap();

        let missing_dir = temp_file("no-such-dir").join("loss.png");
        assert!(write_loss_png(&missing_dir, &curve(3)).is_err());
        assert!(write_loss_png(Path::new("/"), &curve(3)).is_err());
    }

    #[test]
    fn smoothing_matches_llama_factory() {
        // weight(10) = 1.8 * (sigmoid(0.5) - 0.5).
        let w = smoothing_weight(10);
        assert!((w - 1.8 * (1.0 / (1.0 + (-0.5f64).exp()) - 0.5)).abs() < 1e-15);
        assert!((w - 0.220_426_8).abs() < 1e-6, "{w}");
        let values = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0];
        let s = smooth(&values);
        assert_eq!(s[0], 1.0);
        assert!((s[1] - w).abs() < 1e-15);
        assert!((s[2] - w * w).abs() < 1e-15);
        assert!((s[9] - (w.powi(9) + (1.0 - w) * 2.0)).abs() < 1e-12);
        assert!(smooth(&[]).is_empty());
        // Long runs smooth heavily: the weight tends to 0.9.
        assert!((smoothing_weight(1000) - 0.9).abs() < 1e-12);
    }

    #[test]
    fn tick_labels() {
        assert_eq!(format_tick(0.0), "0");
        assert_eq!(format_tick(2.5), "2.5");
        assert_eq!(format_tick(2.34567), "2.346");
        assert_eq!(format_tick(12.0), "12");
        assert_eq!(format_tick(1234.6), "1235");
        assert_eq!(format_tick(0.012346), "0.01235");
        assert_eq!(format_tick(-0.5), "-0.5");
        assert_eq!(format_tick(1.5e-5), "1.5e-5");
        assert_eq!(format_tick(2e7), "2e7");
        for label in ["0", "2.346", "-0.5", "1.5e-5", "2e7"] {
            assert!(label.chars().all(|c| glyph(c).is_some()), "{label}");
        }
        assert_eq!(text_width("12"), 2 * ADVANCE - FONT_SCALE);
        assert_eq!(text_width(""), 0);
    }
}
