//! Instructions per event: a row run again under valgrind's callgrind, its counters read back,
//! and for a backlog row split between publishing and draining.

use super::*;

/// Set for a backlog row run under callgrind: between publishing the backlog and draining it,
/// the row dumps callgrind's counters, which splits its instructions into the two.
pub(crate) const SPLIT_AT_DRAIN: &str = "BUS_BENCH_CALLGRIND_SPLIT";

/// Asks callgrind (this process runs under it) to write and zero its counters now, and waits
/// until it has.
pub(crate) async fn dump_callgrind_counters() -> Result<()> {
    let pid = std::process::id().to_string();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("callgrind_control")
            .args(["--dump=publishing the backlog", &pid])
            .stdout(std::process::Stdio::null())
            .status()
    })
    .await?
    .context("running callgrind_control")?;
    if !status.success() {
        bail!("callgrind_control --dump failed with {status}");
    }
    Ok(())
}

/// Instructions per event of a row counted under callgrind; for a backlog row, split into
/// publishing and consuming.
pub(crate) struct Instructions {
    pub(crate) per_event: f64,
    pub(crate) split: Option<(f64, f64)>,
}

/// The `totals:` (or `summary:`) line of a callgrind output file.
pub(crate) fn callgrind_total(path: &std::path::Path) -> Result<u64> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .with_context(|| format!("{} has no totals", path.display()))?
        .split_whitespace()
        .next()
        .context("an empty totals line")?
        .parse()
        .context("totals")
}

/// Runs row `name` once more, in a child process under valgrind's callgrind, and returns the
/// instructions that process executed per event. Callgrind counts instructions, not time: the
/// figure repeats for the same binary and inputs, however busy the machine is.
pub(crate) fn count_instructions(name: &str, quick: bool, backlog: bool) -> Result<Instructions> {
    let valgrind = std::process::Command::new("valgrind")
        .arg("--version")
        .output()
        .context("valgrind is not installed (Debian: apt-get install valgrind)")?;
    if !valgrind.status.success() {
        bail!("valgrind --version failed");
    }
    let out = std::env::temp_dir().join(format!("bus-bench-callgrind-{}.out", std::process::id()));
    let mut command = std::process::Command::new("valgrind");
    command
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(std::env::current_exe()?)
        .args(["--row", name])
        .args(crate::row_args());
    if quick {
        command.arg("--quick");
    }
    if backlog {
        command.env(SPLIT_AT_DRAIN, "1");
    }
    let output = command
        .output()
        .with_context(|| format!("running row `{name}` under callgrind"))?;
    // With a dump, callgrind numbers its files: `<out>.1` up to the dump, `<out>.2` after it.
    let dumped = std::path::PathBuf::from(format!("{}.1", out.display()));
    let published = if backlog {
        Some(callgrind_total(&dumped))
    } else {
        None
    };
    for file in [out.clone(), dumped, format!("{}.2", out.display()).into()] {
        let _ = std::fs::remove_file(file);
    }
    if !output.status.success() {
        bail!(
            "row `{name}` under callgrind failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let collected: u64 = stderr
        .lines()
        .find_map(|l| l.split("Collected :").nth(1))
        .context("callgrind printed no instruction count")?
        .trim()
        .parse()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let row: Row = serde_json::from_str(
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("ROW "))
            .with_context(|| format!("row `{name}` printed no result"))?,
    )?;
    let events = row.messages.max(1) as f64;
    let split = match published {
        Some(published) => {
            let published = published?;
            Some((
                published as f64 / events,
                collected.saturating_sub(published) as f64 / events,
            ))
        }
        None => None,
    };
    Ok(Instructions {
        per_event: collected as f64 / events,
        split,
    })
}
