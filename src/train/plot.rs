//! Pictures as SVG: the loss curve (training loss per logged step, evaluation loss per
//! evaluation), and line charts of any measured series (`wick prune`'s sparsity sweep).

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

pub fn loss_curve(path: &Path, title: &str, train: &[(usize, f64)], eval: &[(usize, f64)]) -> Result<()> {
    let as_f64 = |v: &[(usize, f64)]| v.iter().map(|&(x, y)| (x as f64, y)).collect::<Vec<_>>();
    line_chart(path, title, ("optimizer step", "loss"), &[("train loss".into(), as_f64(train)), ("eval loss".into(), as_f64(eval))])
}

/// Up to four named series of (x, y) points as lines (with dots when there are few points), on
/// axes fitted to the finite points; nothing is drawn when there are none.
pub fn line_chart(path: &Path, title: &str, (x_desc, y_desc): (&str, &str), series: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let points: Vec<&(f64, f64)> = series.iter().flat_map(|(_, data)| data.iter().filter(finite)).collect();
    if points.is_empty() {
        return Ok(());
    }
    let range = |values: Vec<f64>| {
        let (lo, hi) = values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let pad = ((hi - lo) * 0.05).max(1e-3);
        (lo - pad)..(hi + pad)
    };
    let x_range = range(points.iter().map(|p| p.0).collect());
    let y_range = range(points.iter().map(|p| p.1).collect());
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    let err = |e: DrawingAreaErrorKind<_>| anyhow!("drawing {}: {e:?}", path.display());
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range, y_range)
        .map_err(err)?;
    chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).draw().map_err(err)?;
    for ((label, data), color) in series.iter().zip([BLUE, RED, GREEN, MAGENTA]) {
        let data: Vec<(f64, f64)> = data.iter().filter(finite).copied().collect();
        if data.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        if data.len() < 50 {
            chart.draw_series(data.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(err)?;
        }
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
