//! The report: a terminal table, `target/bench/report.md`, `report.json` and `report.svg`.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// One row of the report. The JSON keys are stable.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Row {
    pub(crate) name: String,
    pub(crate) messages: u64,
    pub(crate) publish_msgs_per_s: f64,
    pub(crate) e2e_msgs_per_s: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) rss_peak_mib: f64,
    pub(crate) tasks: u64,
    pub(crate) threads: u64,
    pub(crate) order_violations: u64,
    pub(crate) lost: u64,
    pub(crate) duplicates: u64,
    pub(crate) ratio_to_ceiling: f64,
    /// End-to-end msg/s against the `ceiling-bus-wire` row of the run (the broker's limit for
    /// the bus's wire format and default retention); 0 when that row did not run.
    #[serde(default)]
    pub(crate) ratio_to_ceiling_bus_wire: f64,
    /// Messages the broker stored per second end to end (a record batch of many events is one);
    /// 0 when the row does not know.
    #[serde(default)]
    pub(crate) broker_msgs_per_s: f64,
    /// End-to-end events/s against the `ceiling-packed` row of the run (raw async-nats with 128
    /// events packed per message: the limit of the record-batch design); 0 when it did not run.
    #[serde(default)]
    pub(crate) ratio_to_ceiling_packed: f64,
    /// Instructions the row's process (the bus, its publisher loop and the checking sink; not
    /// the broker) executed per event, counted by callgrind (`--instructions`); 0 when not
    /// counted.
    #[serde(default)]
    pub(crate) instructions_per_event: f64,
    /// For a backlog row counted by callgrind: its instructions per event split into publishing
    /// the backlog and draining it (a dump of callgrind's counters between the two).
    #[serde(default)]
    pub(crate) instructions_split: Option<(f64, f64)>,
    /// Where an event's latency goes, for rows whose handlers know when the broker stored the
    /// event and when the fetcher received it (`Delivery::stored_at`, `received_at`).
    #[serde(default)]
    pub(crate) stages: Option<Stages>,
    /// Cores kept busy over the row, on average: by the row's process (the bus, the publishing
    /// loop, the checking sink; `None` for group rows, whose members are other processes) and
    /// by its broker (`None` for a cluster): CPU time over wall time, from when the row's clock
    /// starts (its setup left out) until every event is handled.
    #[serde(default)]
    pub(crate) cores: (Option<f64>, Option<f64>),
}

/// Latency by stage, in milliseconds: publish to stored by the broker, stored to received by
/// the fetcher, received to the handler's start. p50 and p99 of each.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
pub(crate) struct Stages {
    pub(crate) p50_ms: [f64; 3],
    pub(crate) p99_ms: [f64; 3],
}

#[derive(Serialize)]
struct Report<'a> {
    quick: bool,
    nats_server: &'a str,
    machine_cores: usize,
    /// Worker threads of each process's tokio runtime (`--threads`).
    runtime_threads: usize,
    elapsed_s: f64,
    rows: &'a [Row],
    /// With `--runs N` (N > 1): each row's median over the runs (see [`medians`]); empty
    /// otherwise.
    medians: &'a [Row],
    /// With `--runs N` (N > 1): every run's rows, the last being `rows`; empty otherwise.
    runs: &'a [Vec<Row>],
}

fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| row | events | publish events/s | e2e events/s | broker msg/s | ratio | vs wire | vs packed | instr/event | p50 ms | p99 ms | p999 ms | peak RSS MiB | cores bus / broker | tasks | threads | violations | lost | dups |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let shown = |ratio: f64| {
            if ratio > 0.0 {
                format!("{ratio:.2}")
            } else {
                "-".to_owned()
            }
        };
        let vs_wire = shown(r.ratio_to_ceiling_bus_wire);
        let vs_packed = shown(r.ratio_to_ceiling_packed);
        let instructions = match (r.instructions_per_event, r.instructions_split) {
            (total, Some((publish, consume))) if total > 0.0 => {
                format!("{total:.0} (publish {publish:.0}, consume {consume:.0})")
            }
            (total, None) if total > 0.0 => format!("{total:.0}"),
            _ => "-".to_owned(),
        };
        let core = |c: Option<f64>| c.map_or("-".to_owned(), |c| format!("{c:.2}"));
        let cores = format!("{} / {}", core(r.cores.0), core(r.cores.1));
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.0} | {} | {:.2} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {} | {} | {} | {} | {} | {} |",
            r.name,
            r.messages,
            r.publish_msgs_per_s,
            r.e2e_msgs_per_s,
            if r.broker_msgs_per_s > 0.0 {
                format!("{:.0}", r.broker_msgs_per_s)
            } else {
                "-".to_owned()
            },
            r.ratio_to_ceiling,
            vs_wire,
            vs_packed,
            instructions,
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            r.rss_peak_mib,
            cores,
            r.tasks,
            r.threads,
            r.order_violations,
            r.lost,
            r.duplicates
        );
    }
    if rows.iter().any(|r| r.stages.is_some()) {
        let _ = writeln!(
            out,
            "\nWhere the latency goes (p50 / p99 ms): publish to stored by the broker, stored to \
             received by the fetcher, received to the handler's start.\n\n\
             | row | to stored | to received | to handler |\n|---|---:|---:|---:|"
        );
        for r in rows {
            if let Some(s) = r.stages {
                let _ = writeln!(
                    out,
                    "| {} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} / {:.2} |",
                    r.name,
                    s.p50_ms[0],
                    s.p99_ms[0],
                    s.p50_ms[1],
                    s.p99_ms[1],
                    s.p50_ms[2],
                    s.p99_ms[2]
                );
            }
        }
    }
    out
}

fn svg(rows: &[Row]) -> String {
    let bar_h = 22.0;
    let left = 190.0;
    let width = 560.0;
    let height = 70.0 + rows.len() as f64 * bar_h * 2.0;
    let max_rate = rows.iter().map(|r| r.e2e_msgs_per_s).fold(1.0, f64::max);
    let max_p99 = rows.iter().map(|r| r.p99_ms).fold(0.001, f64::max);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="sans-serif" font-size="12">"#,
        left + width + 140.0
    );
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="14">End-to-end msg/s (blue) and p99 latency ms (orange), per row</text>"#
    );
    for (i, r) in rows.iter().enumerate() {
        let y = 40.0 + i as f64 * bar_h * 2.0;
        let w_rate = width * r.e2e_msgs_per_s / max_rate;
        let w_p99 = width * r.p99_ms / max_p99;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            left - 8.0,
            y + bar_h,
            r.name
        );
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="{y}" width="{w_rate:.1}" height="{}" fill="#3b6fb6"/>"##,
            bar_h - 4.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}">{:.0} msg/s ({:.2}x)</text>"#,
            left + w_rate + 4.0,
            y + bar_h - 8.0,
            r.e2e_msgs_per_s,
            r.ratio_to_ceiling
        );
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="{}" width="{w_p99:.1}" height="{}" fill="#e08a2c"/>"##,
            y + bar_h - 2.0,
            bar_h - 8.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}">p99 {:.2} ms</text>"#,
            left + w_p99 + 4.0,
            y + bar_h * 2.0 - 12.0,
            r.p99_ms
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Each row's median over `runs` (every run of the same selection, so the same rows in the same
/// order): every rate, ratio, latency, memory and core figure is the median of that figure over
/// the runs, each taken on its own (the medians of one row may come from different runs), and
/// so is its number of events (a latency row's follows its rate);
/// violations, losses and duplicates are summed over the runs; tasks and threads are the most
/// any run had. A latency row is named for a rate its run measured: where the runs' names
/// differ, the rate in the name stands as `half-capacity`. Instructions are not taken from the
/// runs (they are counted once, after).
pub(crate) fn medians(runs: &[Vec<Row>]) -> Result<Vec<Row>> {
    let first = runs.first().map_or(&[][..], Vec::as_slice);
    if let Some(run) = runs.iter().find(|run| run.len() != first.len()) {
        anyhow::bail!(
            "the runs have different rows ({} and {}): no medians",
            first.len(),
            run.len()
        );
    }
    Ok((0..first.len())
        .map(|i| {
            let rows: Vec<&Row> = runs.iter().map(|run| &run[i]).collect();
            let median_of = |f: &dyn Fn(&Row) -> f64| median(rows.iter().map(|r| f(r)).collect());
            let optional = |f: &dyn Fn(&Row) -> Option<f64>| {
                let values: Vec<f64> = rows.iter().filter_map(|r| f(r)).collect();
                (!values.is_empty()).then(|| median(values))
            };
            let stage = |p99: bool, at: usize| {
                median_of(&|r| {
                    r.stages
                        .map_or(0.0, |s| if p99 { s.p99_ms[at] } else { s.p50_ms[at] })
                })
            };
            Row {
                name: common_name(&rows),
                messages: median_of(&|r| r.messages as f64).round() as u64,
                publish_msgs_per_s: median_of(&|r| r.publish_msgs_per_s),
                e2e_msgs_per_s: median_of(&|r| r.e2e_msgs_per_s),
                p50_ms: median_of(&|r| r.p50_ms),
                p99_ms: median_of(&|r| r.p99_ms),
                p999_ms: median_of(&|r| r.p999_ms),
                rss_peak_mib: median_of(&|r| r.rss_peak_mib),
                tasks: rows.iter().map(|r| r.tasks).max().unwrap_or(0),
                threads: rows.iter().map(|r| r.threads).max().unwrap_or(0),
                order_violations: rows.iter().map(|r| r.order_violations).sum(),
                lost: rows.iter().map(|r| r.lost).sum(),
                duplicates: rows.iter().map(|r| r.duplicates).sum(),
                ratio_to_ceiling: median_of(&|r| r.ratio_to_ceiling),
                ratio_to_ceiling_bus_wire: median_of(&|r| r.ratio_to_ceiling_bus_wire),
                broker_msgs_per_s: median_of(&|r| r.broker_msgs_per_s),
                ratio_to_ceiling_packed: median_of(&|r| r.ratio_to_ceiling_packed),
                instructions_per_event: 0.0,
                instructions_split: None,
                stages: rows.iter().all(|r| r.stages.is_some()).then(|| Stages {
                    p50_ms: [stage(false, 0), stage(false, 1), stage(false, 2)],
                    p99_ms: [stage(true, 0), stage(true, 1), stage(true, 2)],
                }),
                cores: (optional(&|r| r.cores.0), optional(&|r| r.cores.1)),
            }
        })
        .collect())
}

/// The median of `values` (the mean of the middle two of an even count); 0 of none.
fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// The rows' name if they share it; otherwise (latency rows, named for the rate each run
/// measured) what they share up to its last `-`, then `half-capacity`.
fn common_name(rows: &[&Row]) -> String {
    let first = &rows[0].name;
    if rows.iter().all(|r| &r.name == first) {
        return first.clone();
    }
    let shared = rows.iter().fold(first.len(), |len, r| {
        first
            .bytes()
            .zip(r.name.bytes())
            .take(len)
            .take_while(|(a, b)| a == b)
            .count()
    });
    let prefix = &first[..first[..shared].rfind('-').map_or(0, |at| at + 1)];
    format!("{prefix}half-capacity")
}

pub(crate) fn write(
    rows: &[Row],
    medians: &[Row],
    runs: &[Vec<Row>],
    quick: bool,
    threads: usize,
    server: &str,
    elapsed: Duration,
) -> Result<()> {
    let dir = Path::new("target/bench");
    std::fs::create_dir_all(dir)?;
    let mut table = table(rows);
    if !medians.is_empty() {
        table = format!(
            "The last of {} runs:\n\n{table}\nEach row's median over the {} runs (violations, losses and duplicates summed):\n\n{}",
            runs.len(),
            runs.len(),
            self::table(medians)
        );
    }
    println!("\n{table}");
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let md = format!(
        "# Benchmark report\n\nnats-server {server}, {cores} cores, {threads} runtime threads, {} run, {:.0} s.\n\
         Ratios are end-to-end msg/s against the `ceiling` row of this run; \"vs wire\" is against\n\
         `ceiling-bus-wire`, the broker's limit for the bus's wire format and default retention;\n\
         \"vs packed\" against `ceiling-packed`, raw async-nats with 128 events packed per message.\n\n{table}",
        if quick { "quick" } else { "full" },
        elapsed.as_secs_f64()
    );
    std::fs::write(dir.join("report.md"), md)?;
    let json = serde_json::to_string_pretty(&Report {
        quick,
        nats_server: server,
        machine_cores: cores,
        runtime_threads: threads,
        elapsed_s: elapsed.as_secs_f64(),
        rows,
        medians,
        runs,
    })?;
    std::fs::write(dir.join("report.json"), json)?;
    std::fs::write(dir.join("report.svg"), svg(rows))?;
    println!("wrote target/bench/report.md, report.json and report.svg");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, rate: f64, vs_wire: f64) -> Row {
        Row {
            name: name.into(),
            messages: 10,
            publish_msgs_per_s: rate,
            e2e_msgs_per_s: rate,
            p50_ms: 1.0,
            p99_ms: 2.0,
            p999_ms: 3.0,
            rss_peak_mib: 4.0,
            tasks: 5,
            threads: 6,
            order_violations: 0,
            lost: 0,
            duplicates: 0,
            ratio_to_ceiling: 0.5,
            ratio_to_ceiling_bus_wire: vs_wire,
            broker_msgs_per_s: rate / 8.0,
            ratio_to_ceiling_packed: 0.0,
            instructions_per_event: 0.0,
            instructions_split: None,
            stages: None,
            cores: (Some(1.25), None),
        }
    }

    #[test]
    fn rows_keep_their_json_keys() {
        let json = serde_json::to_value(row("default", 100.0, 0.9)).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        for key in [
            "name",
            "publish_msgs_per_s",
            "e2e_msgs_per_s",
            "p50_ms",
            "p99_ms",
            "p999_ms",
            "rss_peak_mib",
            "tasks",
            "threads",
            "order_violations",
            "lost",
            "duplicates",
            "ratio_to_ceiling",
            "ratio_to_ceiling_bus_wire",
            "cores",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
    }

    #[test]
    fn the_table_shows_a_dash_where_the_wire_row_did_not_run() {
        let table = table(&[row("default", 100.0, 0.9), row("seed-single", 10.0, 0.0)]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[2].contains("| 0.50 | 0.90 | - | - |"), "{}", lines[2]);
        assert!(lines[3].contains("| 0.50 | - | - | - |"), "{}", lines[3]);
    }

    #[test]
    fn the_table_shows_the_cores_each_side_kept_busy() {
        let mut cluster_row = row("default-r3-cluster", 100.0, 0.9);
        cluster_row.cores = (Some(0.5), None);
        let mut both = row("default", 100.0, 0.9);
        both.cores = (Some(1.234), Some(0.5));
        let table = table(&[both, cluster_row]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].contains("| cores bus / broker |"), "{}", lines[0]);
        assert!(
            lines[2].contains("| 4.0 | 1.23 / 0.50 | 5 |"),
            "{}",
            lines[2]
        );
        assert!(lines[3].contains("| 4.0 | 0.50 / - | 5 |"), "{}", lines[3]);
    }

    #[test]
    fn medians_take_each_figure_over_the_runs_and_sum_the_failures() {
        let run = |rate: f64, packed: f64, p99: f64, latency: &str, violations: u64| {
            let mut default = row("default", rate, 0.9);
            default.ratio_to_ceiling_packed = packed;
            default.order_violations = violations;
            let mut latency = row(latency, rate / 2.0, 0.0);
            latency.p99_ms = p99;
            latency.messages = rate as u64 * 10;
            vec![row("ceiling", 100.0, 0.0), default, latency]
        };
        let runs = vec![
            run(600.0, 0.41, 4.0, "latency-at-300-msg-s", 0),
            run(500.0, 0.37, 9.0, "latency-at-250-msg-s", 1),
            run(700.0, 0.39, 3.0, "latency-at-350-msg-s", 0),
        ];
        let medians = medians(&runs).unwrap();
        let names: Vec<&str> = medians.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["ceiling", "default", "latency-at-half-capacity"]);
        assert_eq!(medians[1].e2e_msgs_per_s, 600.0);
        assert_eq!(medians[1].ratio_to_ceiling_packed, 0.39);
        assert_eq!(medians[1].order_violations, 1);
        assert_eq!(medians[2].p99_ms, 4.0);
        assert_eq!(medians[2].e2e_msgs_per_s, 300.0);
        assert_eq!(medians[2].messages, 6_000);
    }

    #[test]
    fn an_even_count_of_runs_has_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn runs_of_different_rows_have_no_medians() {
        let runs = vec![
            vec![row("ceiling", 1.0, 0.0)],
            vec![row("ceiling", 1.0, 0.0), row("default", 1.0, 0.0)],
        ];
        let error = medians(&runs).unwrap_err().to_string();
        assert!(error.contains("different rows"), "{error}");
    }

    #[test]
    fn latency_names_keep_what_the_runs_share_up_to_a_dash() {
        // 295 and 291 share a digit: the name is cut back to the dash before it.
        let a = row("latency-lease-at-295000-msg-s", 1.0, 0.0);
        let b = row("latency-lease-at-291000-msg-s", 1.0, 0.0);
        assert_eq!(common_name(&[&a, &b]), "latency-lease-at-half-capacity");
        assert_eq!(common_name(&[&a, &a]), "latency-lease-at-295000-msg-s");
    }
}
