//! `cgsentry top`: a live view of the running agent (ratatui) — cgroups sorted by
//! pressure with CPU and memory sparklines over the last five minutes, and what the
//! agent holds applied. The agent builds the [`View`] every tick (served on the control
//! socket); this module renders it and runs the terminal loop.
use std::{fmt::Write as _, time::Duration};

use ratatui::{
    Frame,
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Borders, Cell, Paragraph, Row, Table},
};
use serde::{Deserialize, Serialize};

use crate::{collect::Snapshot, control::Active, history::History};

/// One cgroup's line.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TopRow {
    pub cgroup: String,
    /// `pod …/containerd …` when the path says so.
    #[serde(default)]
    pub identity: String,
    /// The sort key: memory + CPU + I/O PSI some avg10, percent, plus reclaim stall.
    pub pressure: f64,
    pub cpu_percent: f64,
    pub memory_bytes: Option<u64>,
    pub trend_mib_per_s: Option<f64>,
    pub memory_some_avg10: Option<f64>,
    pub reclaim_ms_per_s: f64,
    pub pids: Option<u64>,
    /// Findings on it now (`leak`, `runaway`, …).
    pub findings: Vec<String>,
    /// CPU percent and memory bytes over the history, oldest first.
    pub cpu_series: Vec<u64>,
    pub memory_series: Vec<u64>,
}

/// Everything `top` shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct View {
    pub timestamp_ms: u128,
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    pub swap_used_bytes: u64,
    pub memory_some_avg10: Option<f64>,
    pub rows: Vec<TopRow>,
    pub active: Vec<Active>,
    pub dry_run: bool,
}

/// Rows kept in the view.
const ROWS: usize = 40;

fn psi(p: Option<&crate::cgroupfs::Pressure>) -> f64 {
    p.map_or(0.0, |p| p.some.avg10)
}

/// Builds the view of a tick.
#[must_use]
pub fn view(
    snap: &Snapshot,
    j: &crate::report::Judgement,
    history: &History,
    active: Vec<Active>,
    dry_run: bool,
) -> View {
    let mut rows: Vec<TopRow> = snap
        .cgroups
        .iter()
        .filter_map(|c| {
            let path = c.path.as_deref()?;
            let f = &c.files;
            Some(TopRow {
                cgroup: path.to_owned(),
                identity: crate::identity::of(path).short(),
                pressure: psi(f.memory_pressure.as_ref())
                    + psi(f.cpu_pressure.as_ref())
                    + psi(f.io_pressure.as_ref())
                    + c.reclaim_ms_per_s / 10.0,
                cpu_percent: c.cpu_percent,
                memory_bytes: f.memory_current,
                trend_mib_per_s: c.memory_trend_mib_per_s,
                memory_some_avg10: f.memory_pressure.as_ref().map(|p| p.some.avg10),
                reclaim_ms_per_s: c.reclaim_ms_per_s,
                pids: f.pids_current,
                findings: j
                    .findings
                    .iter()
                    .filter(|x| x.finding.cgroup == path)
                    .map(|x| x.finding.kind.to_string())
                    .collect(),
                cpu_series: Vec::new(),
                memory_series: Vec::new(),
            })
        })
        .collect();
    // Findings first, then pressure, then CPU.
    rows.sort_by(|a, b| {
        a.findings
            .is_empty()
            .cmp(&b.findings.is_empty())
            .then(b.pressure.total_cmp(&a.pressure))
            .then(b.cpu_percent.total_cmp(&a.cpu_percent))
    });
    rows.truncate(ROWS);
    for r in &mut rows {
        (r.cpu_series, r.memory_series) = history.series(&r.cgroup);
    }
    let m = &snap.machine;
    View {
        timestamp_ms: snap.timestamp_ms,
        mem_total_bytes: m.mem_total_bytes,
        mem_available_bytes: m.mem_available_bytes,
        swap_used_bytes: m.swap_total_bytes.saturating_sub(m.swap_free_bytes),
        memory_some_avg10: m.memory_pressure.as_ref().map(|p| p.some.avg10),
        rows,
        active,
        dry_run,
    }
}

const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// The last `width` values as a text sparkline, scaled to their own maximum.
#[must_use]
pub fn sparkline(values: &[u64], width: usize) -> String {
    let tail = &values[values.len().saturating_sub(width)..];
    let max = tail.iter().copied().max().unwrap_or(0);
    tail.iter()
        .map(|&v| {
            if max == 0 {
                BARS[0]
            } else {
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "0..=7"
                )]
                let i = ((v as f64 / max as f64) * 7.0).round() as usize;
                BARS[i.min(7)]
            }
        })
        .collect()
}

fn mib(b: Option<u64>) -> String {
    b.map_or_else(|| "-".into(), |b| format!("{}", b >> 20))
}

/// Draws the view.
#[expect(
    clippy::too_many_lines,
    reason = "header, table and footer, laid out in order"
)]
pub fn render(frame: &mut Frame<'_>, v: &View) {
    let [head, table, foot] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Min(5),
        Constraint::Length(u16::try_from(v.active.len().clamp(1, 8)).unwrap_or(8) + 2),
    ])
    .areas(frame.area());
    let pct = if v.mem_total_bytes > 0 {
        100.0 * v.mem_available_bytes as f64 / v.mem_total_bytes as f64
    } else {
        0.0
    };
    let header = format!(
        "available {} MiB of {} MiB ({pct:.0} %)   swap used {} MiB   memory PSI some {}{}   {}   q quits",
        v.mem_available_bytes >> 20,
        v.mem_total_bytes >> 20,
        v.swap_used_bytes >> 20,
        v.memory_some_avg10
            .map_or_else(|| "-".into(), |p| format!("{p:.1} %")),
        if v.dry_run { "   DRY RUN" } else { "" },
        crate::history::hms(v.timestamp_ms),
    );
    frame.render_widget(
        Paragraph::new(header).block(
            Block::default()
                .borders(Borders::ALL)
                .title(" cgsentry top "),
        ),
        head,
    );
    let spark_w = 20;
    let rows = v.rows.iter().map(|r| {
        let name = if r.identity.is_empty() {
            crate::report::printable(&r.cgroup)
        } else {
            format!("{} [{}]", crate::report::printable(&r.cgroup), r.identity)
        };
        let style = if r.findings.is_empty() {
            Style::default()
        } else {
            Style::default().add_modifier(Modifier::BOLD)
        };
        Row::new(vec![
            Cell::from(name),
            Cell::from(format!("{:.1}", r.pressure)),
            Cell::from(format!("{:.0}", r.cpu_percent)),
            Cell::from(sparkline(&r.cpu_series, spark_w)),
            Cell::from(mib(r.memory_bytes)),
            Cell::from(
                r.trend_mib_per_s
                    .map_or_else(|| "-".into(), |t| format!("{t:+.1}")),
            ),
            Cell::from(sparkline(&r.memory_series, spark_w)),
            Cell::from(r.pids.map_or_else(|| "-".into(), |p| p.to_string())),
            Cell::from(r.findings.join(",")),
        ])
        .style(style)
    });
    let widths = [
        Constraint::Min(24),
        Constraint::Length(8),
        Constraint::Length(5),
        Constraint::Length(20),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(20),
        Constraint::Length(6),
        Constraint::Length(14),
    ];
    let table_widget = Table::new(rows, widths)
        .header(
            Row::new([
                "CGROUP",
                "PRESSURE",
                "CPU%",
                "CPU 5 min",
                "MiB",
                "MiB/s",
                "MEMORY 5 min",
                "PIDS",
                "FINDINGS",
            ])
            .style(Style::default().add_modifier(Modifier::REVERSED)),
        )
        .block(
            Block::default()
                .borders(Borders::ALL)
                .title(" cgroups by pressure "),
        );
    frame.render_widget(table_widget, table);
    let lines: Vec<Line<'_>> = if v.active.is_empty() {
        vec![Line::from("nothing applied")]
    } else {
        v.active
            .iter()
            .map(|a| {
                let mut what = format!("{} step(s) of {:?} ({})", a.steps_taken, a.rule, a.finding);
                if let Some(f) = &a.frozen {
                    let _ = write!(what, ", frozen {f}");
                }
                if !a.limits.is_empty() {
                    let _ = write!(what, ", {}", a.limits.join(" "));
                }
                if a.relaxed {
                    what += ", relaxed";
                }
                Line::from(format!("{}: {what}", crate::report::printable(&a.cgroup)))
            })
            .collect()
    };
    frame.render_widget(
        Paragraph::new(lines).block(
            Block::default()
                .borders(Borders::ALL)
                .title(" active actions "),
        ),
        foot,
    );
}

/// The terminal loop: asks the agent every `every`, draws, quits on `q`, Esc or Ctrl-C.
///
/// # Errors
/// The terminal cannot be set up, or the agent stops answering.
pub fn run(socket: &std::path::Path, every: Duration) -> anyhow::Result<()> {
    use crossterm::event::{self, Event, KeyCode, KeyModifiers};
    let fetch = || -> anyhow::Result<View> {
        let data = crate::control::request(socket, &crate::control::Request::Top)
            .map_err(anyhow::Error::msg)?;
        Ok(serde_json::from_value(data)?)
    };
    // Fail before taking the terminal over when no agent answers.
    let mut v = fetch()?;
    let mut terminal = ratatui::init();
    let result = (|| -> anyhow::Result<()> {
        loop {
            terminal.draw(|f| render(f, &v))?;
            if event::poll(every)? {
                if let Event::Key(k) = event::read()? {
                    let ctrl_c =
                        k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if ctrl_c || matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) {
                        return Ok(());
                    }
                }
                continue;
            }
            v = fetch()?;
        }
    })();
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::{Terminal, backend::TestBackend};

    fn row(cgroup: &str, pressure: f64, findings: &[&str]) -> TopRow {
        TopRow {
            cgroup: cgroup.into(),
            pressure,
            cpu_percent: 50.0,
            memory_bytes: Some(300 << 20),
            trend_mib_per_s: Some(10.0),
            findings: findings.iter().map(|s| (*s).to_owned()).collect(),
            cpu_series: vec![0, 10, 50, 100],
            memory_series: vec![1, 2, 3, 4, 5, 6, 7, 8],
            ..TopRow::default()
        }
    }

    #[test]
    fn sparklines_scale_to_their_maximum() {
        assert_eq!(sparkline(&[0, 50, 100], 10), "▁▅█");
        assert_eq!(sparkline(&[0, 0], 10), "▁▁");
        assert_eq!(sparkline(&[1, 2, 3, 4], 2), "▆█");
        assert_eq!(sparkline(&[], 5), "");
    }

    /// Rendered into ratatui's test backend: header figures, rows in the view's order
    /// with their sparklines and findings, the active actions.
    #[test]
    fn renders_the_view() {
        let v = View {
            timestamp_ms: 1_795_435_200_000,
            mem_total_bytes: 1024 << 20,
            mem_available_bytes: 256 << 20,
            swap_used_bytes: 0,
            memory_some_avg10: Some(12.5),
            rows: vec![row("/leaky", 30.0, &["leak"]), row("/calm", 0.0, &[])],
            active: vec![Active {
                cgroup: "/leaky".into(),
                rule: "leak".into(),
                finding: "leak".into(),
                steps_taken: 2,
                frozen: Some("/leaky".into()),
                ..Active::default()
            }],
            dry_run: false,
        };
        let mut t = Terminal::new(TestBackend::new(140, 16)).unwrap();
        t.draw(|f| render(f, &v)).unwrap();
        let buf = t.backend().buffer().clone();
        let lines: Vec<String> = (0..buf.area.height)
            .map(|y| {
                (0..buf.area.width)
                    .map(|x| buf[(x, y)].symbol().to_owned())
                    .collect()
            })
            .collect();
        let screen = lines.join("\n");
        assert!(
            screen.contains("available 256 MiB of 1024 MiB (25 %)"),
            "{screen}"
        );
        assert!(screen.contains("memory PSI some 12.5 %"), "{screen}");
        assert!(screen.contains("12:00:00"), "{screen}");
        let leaky = lines
            .iter()
            .position(|l| l.contains("/leaky "))
            .expect("leaky row");
        let calm = lines
            .iter()
            .position(|l| l.contains("/calm "))
            .expect("calm row");
        assert!(leaky < calm, "{screen}");
        assert!(
            lines[leaky].contains("▁▂▅█") && lines[leaky].contains("▂▃▄▅▅▆▇█"),
            "{}",
            lines[leaky]
        );
        assert!(
            lines[leaky].contains("+10.0") && lines[leaky].contains("leak"),
            "{}",
            lines[leaky]
        );
        assert!(
            screen.contains("/leaky: 2 step(s) of \"leak\" (leak), frozen /leaky"),
            "{screen}"
        );
        // Bold for a cgroup with a finding.
        let byte = lines[leaky].find("/leaky").unwrap();
        let x = u16::try_from(lines[leaky][..byte].chars().count()).unwrap();
        let y = u16::try_from(leaky).unwrap();
        assert!(buf[(x, y)].modifier.contains(Modifier::BOLD));
    }
}
