//! The loss curve as an SVG picture: training loss per logged step, evaluation loss per evaluation.

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

pub fn loss_curve(path: &Path, title: &str, train: &[(usize, f64)], eval: &[(usize, f64)]) -> Result<()> {
    let finite = |v: &&(usize, f64)| v.1.is_finite();
    let points: Vec<&(usize, f64)> = train.iter().chain(eval).filter(finite).collect();
    if points.is_empty() {
        return Ok(());
    }
    let max_step = points.iter().map(|p| p.0).max().unwrap_or(1).max(1);
    let lo = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    let err = |e: DrawingAreaErrorKind<_>| anyhow!("drawing {}: {e:?}", path.display());
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0usize..max_step, (lo - pad)..(hi + pad))
        .map_err(err)?;
    chart.configure_mesh().x_desc("optimizer step").y_desc("loss").draw().map_err(err)?;
    let series = [("train loss", train, BLUE), ("eval loss", eval, RED)];
    for (label, data, color) in series {
        let data: Vec<(usize, f64)> = data.iter().filter(finite).copied().collect();
        if data.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        if data.len() < 50 {
            chart.draw_series(data.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(err)?;
        }
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
