//! Draws `mbe-bench --json` output as an SVG: p50 latency of 64 B request/response
//! (c=1) and throughput of 64 KiB streams (×4), one bar per variant.
//! Usage: `mbe-bench-chart BENCH.json OUT.svg`.
use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use serde_json::Value;

/// The `field` of the same-node cell of `variant` matching `workload`, `size`,
/// `concurrency`.
fn figure(
    cells: &[Value],
    variant: &str,
    workload: &str,
    size: u64,
    conc: u64,
    field: &str,
) -> Result<f64> {
    cells
        .iter()
        .find(|c| {
            c["variant"] == variant
                && c["workload"] == workload
                && c["size"] == size
                && c["concurrency"] == conc
                && c.get("conntrack_max").is_none()
                && c["from"].as_str().unwrap_or("pod") == "pod"
        })
        .and_then(|c| c[field].as_f64())
        .with_context(|| format!("no {field} for {variant} {workload} {size} B c={conc}"))
}

fn bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    variants: &[String],
    values: &[f64],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let top = values.iter().cloned().fold(0.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d((0..variants.len() - 1).into_segmented(), 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(variants.len())
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                variants.get(*i).cloned().unwrap_or_default()
            }
            SegmentValue::Last => String::new(),
        })
        .draw()?;
    chart.draw_series(
        Histogram::vertical(&chart)
            .style(BLUE.mix(0.7).filled())
            .margin(12)
            .data(values.iter().enumerate().map(|(i, v)| (i, *v))),
    )?;
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = &args[..] else {
        bail!("usage: mbe-bench-chart BENCH.json OUT.svg");
    };
    let doc: Value = serde_json::from_slice(&std::fs::read(input).with_context(|| input.clone())?)?;
    let cells = doc["cells"].as_array().context("no cells")?;
    // The variants in the order the bench ran them.
    let mut variants: Vec<String> = Vec::new();
    for v in cells.iter().filter_map(|c| c["variant"].as_str()) {
        if !variants.iter().any(|x| x == v) {
            variants.push(v.to_string());
        }
    }
    let latency: Vec<f64> = variants
        .iter()
        .map(|v| figure(cells, v, "rr", 64, 1, "p50_us"))
        .collect::<Result<_>>()?;
    let stream: Vec<f64> = variants
        .iter()
        .map(|v| figure(cells, v, "stream", 65536, 4, "mb_per_s"))
        .collect::<Result<_>>()?;
    let root = SVGBackend::new(output, (1100, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(550);
    bars(
        &left,
        "64 B request/response, c=1: p50 µs (lower is better)",
        &variants,
        &latency,
    )?;
    bars(
        &right,
        "64 KiB streams ×4: MB/s (higher is better)",
        &variants,
        &stream,
    )?;
    root.present()?;
    println!("wrote {output}");
    Ok(())
}
