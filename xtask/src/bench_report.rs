//! The benchmark's charts: horizontal bar charts as SVG, drawn with `plotters` (its SVG
//! backend writes text as `<text>` elements, so no system font is needed).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::{
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

/// One bar: its label and length.
pub struct Bar {
    pub label: String,
    pub value: f64,
}

/// Writes a horizontal bar chart of `bars` (top to bottom in order) to `path`.
pub fn bars(path: &Path, title: &str, axis: &str, bars: &[Bar]) -> Result<()> {
    let height = 90 + 36 * bars.len() as u32;
    let root = SVGBackend::new(path, (760, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let max = bars
        .iter()
        .map(|b| b.value)
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let n = bars.len() as i32;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(170)
        .build_cartesian_2d(0.0..max * 1.18, (0..n - 1).into_segmented())
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .light_line_style(WHITE)
        .x_label_formatter(&|v| {
            if max >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        })
        .y_labels(bars.len() + 1)
        .y_label_formatter(&|y| {
            // The bar of row r from the top is drawn in segment n - 1 - r.
            let SegmentValue::CenterOf(y) = *y else {
                return String::new();
            };
            usize::try_from(n - 1 - y)
                .ok()
                .and_then(|r| bars.get(r))
                .map(|b| b.label.clone())
                .unwrap_or_default()
        })
        .x_desc(axis)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let palette = [
        RGBColor(90, 90, 90),
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
    ];
    for (row, bar) in bars.iter().enumerate() {
        let y = n - 1 - row as i32;
        let colour = if bar.label.starts_with("gateway") {
            palette[1]
        } else if bar.label.starts_with("nginx") {
            palette[2]
        } else if bar.label.starts_with("HAProxy") {
            palette[3]
        } else {
            palette[0]
        };
        chart
            .draw_series(std::iter::once({
                let mut rect = Rectangle::new(
                    [
                        (0.0, SegmentValue::Exact(y)),
                        (bar.value, SegmentValue::Exact(y + 1)),
                    ],
                    colour.filled(),
                );
                rect.set_margin(5, 5, 0, 0);
                rect
            }))
            .map_err(|e| anyhow!("{e}"))?;
        let text = if bar.value >= 100.0 {
            format!("{:.0}", bar.value)
        } else {
            format!("{:.2}", bar.value)
        };
        chart
            .draw_series(std::iter::once(Text::new(
                text,
                (bar.value + max * 0.01, SegmentValue::CenterOf(y)),
                TextStyle::from(("sans-serif", 14).into_font())
                    .pos(Pos::new(HPos::Left, VPos::Center)),
            )))
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
