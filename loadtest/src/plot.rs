//! SVG line charts of benchmark results (plotters), for BENCHMARKS.md.

use std::path::Path;

use plotters::coord::ranged1d::ValueFormatter;
use plotters::prelude::*;

/// One line of a chart: a name and its points.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Draws `series` as lines with points into an SVG file; `log_y` puts y on a log scale.
pub fn lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_y: bool,
) -> anyhow::Result<()> {
    let all = || series.iter().flat_map(|s| s.points.iter().copied());
    let x_max = all().map(|p| p.0).fold(0.0, f64::max).max(1e-9) * 1.05;
    let y_max = all().map(|p| p.1).fold(0.0, f64::max).max(1e-9) * 1.2;
    let y_min = all().map(|p| p.1).filter(|y| *y > 0.0).fold(f64::MAX, f64::min).min(y_max) * 0.8;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let mut builder = ChartBuilder::on(&root);
    builder.caption(title, ("sans-serif", 22)).margin(12).x_label_area_size(45).y_label_area_size(70);
    if log_y {
        let chart = builder.build_cartesian_2d(0.0..x_max, (y_min..y_max).log_scale()).map_err(draw_err)?;
        draw(chart, x_label, y_label, series)?;
    } else {
        let chart = builder.build_cartesian_2d(0.0..x_max, 0.0..y_max).map_err(draw_err)?;
        draw(chart, x_label, y_label, series)?;
    }
    root.present().map_err(draw_err)?;
    Ok(())
}

fn draw<'a, Y>(
    mut chart: ChartContext<'a, SVGBackend<'a>, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> anyhow::Result<()>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart.configure_mesh().x_desc(x_label).y_desc(y_label).draw().map_err(draw_err)?;
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), colour.stroke_width(2)))
            .map_err(draw_err)?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
        if s.points.len() <= 50 {
            chart.draw_series(s.points.iter().map(|p| Circle::new(*p, 3, colour.filled()))).map_err(draw_err)?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err)?;
    Ok(())
}

fn draw_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e}")
}
