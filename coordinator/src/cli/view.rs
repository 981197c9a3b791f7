//! The live terminal view of `ringctl watch`, `ringctl top` and `ringctl local`: a block that
//! redraws in place below the command line (ratatui's inline viewport), with worker lines
//! (`ringctl local`) scrolling above it.
//!
//! Layout:
//! - [`JobView`] — what one job's view shows, built from the status updates (a loss history
//!   for the sparkline, the step rate for the ETA) and drawn into any ratatui frame, so that
//!   tests render it into a `TestBackend`.
//! - [`TopView`] — the table of every job that has not ended (`ringctl top`).
//! - [`Live`] — the terminal: created when stdout is a terminal (and `TERM` is not `dumb`),
//!   redrawn on each update and every [`TICK`], left in the scrollback at the end.
//!
//! No raw mode: Ctrl-C stays a signal (the commands catch it), keys are not read.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use ratatui::backend::{Backend, CrosstermBackend};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, LineGauge, Paragraph, Row, Sparkline, Table};
use ratatui::{Frame, Terminal, TerminalOptions, Viewport};
use ringmaster_proto as pb;

use super::Output;

/// How often the live view redraws without news (elapsed time, ETA).
pub const TICK: Duration = Duration::from_millis(250);
/// Losses the sparkline shows (one per step seen, newest last).
const LOSS_HISTORY: usize = 120;
/// The step rate behind the ETA is taken over this long.
const RATE_WINDOW: Duration = Duration::from_secs(60);
/// Rank rows shown at most; the rest are summed up in one line.
const MAX_RANK_ROWS: usize = 16;
/// Events shown (the status carries the newest 5).
const EVENT_ROWS: usize = 5;
/// Rows one worker line may take above the view (longer ones are cut).
const MAX_WRAPPED_ROWS: usize = 8;
/// Job rows `ringctl top` shows at most.
const MAX_JOB_ROWS: usize = 30;

/// How a command shows a job that it follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The redrawn view (stdout is a terminal).
    Live,
    /// Plain lines (stdout is a pipe or a file, or `TERM=dumb`).
    Plain,
    /// One JSON object per update.
    Json,
}

/// The mode for `output` and where stdout goes.
pub fn mode(output: Output) -> Mode {
    if output == Output::Json {
        return Mode::Json;
    }
    let dumb = std::env::var("TERM").map_or(true, |t| t.is_empty() || t == "dumb");
    // SAFETY: both calls only read the process's and the terminal's process groups.
    let foreground = unsafe { libc::tcgetpgrp(libc::STDOUT_FILENO) == libc::getpgrp() };
    // In the background (`ringctl watch j &`) the view's terminal query would stop the
    // process (SIGTTOU): lines instead.
    if std::io::stdout().is_terminal() && !dumb && foreground {
        Mode::Live
    } else {
        Mode::Plain
    }
}

/// One job as the live view shows it.
#[derive(Default)]
pub struct JobView {
    status: Option<pb::JobStatus>,
    losses: VecDeque<f64>,
    last_step: Option<u64>,
    /// (when, step) samples for the step rate.
    rate: VecDeque<(Instant, u64)>,
}

impl JobView {
    /// Takes a new status.
    pub fn update(&mut self, st: pb::JobStatus, now: Instant) {
        let p = st.progress.unwrap_or_default();
        if let Some(step) = p.step
            && self.last_step != Some(step)
        {
            if self.last_step.is_some_and(|s| step < s) {
                // A restart from an earlier checkpoint: the rate starts over.
                self.rate.clear();
            }
            if let Some(l) = p.loss.filter(|l| l.is_finite()) {
                self.losses.push_back(l);
                if self.losses.len() > LOSS_HISTORY {
                    self.losses.pop_front();
                }
            }
            self.rate.push_back((now, step));
            while self
                .rate
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
                && self.rate.len() > 2
            {
                self.rate.pop_front();
            }
            self.last_step = Some(step);
        }
        self.status = Some(st);
    }

    /// The status shown, if any came.
    pub fn status(&self) -> Option<&pb::JobStatus> {
        self.status.as_ref()
    }

    /// Steps per second over the last minute, once two steps were seen.
    fn steps_per_second(&self) -> Option<f64> {
        let (t0, s0) = self.rate.front()?;
        let (t1, s1) = self.rate.back()?;
        let secs = t1.duration_since(*t0).as_secs_f64();
        (s1 > s0 && secs > 0.0).then(|| (s1 - s0) as f64 / secs)
    }

    /// Rows the view needs for a job of `world` ranks.
    pub fn height(world: usize) -> u16 {
        let ranks = world.min(MAX_RANK_ROWS) + usize::from(world > MAX_RANK_ROWS);
        // title, gauge, figures, sparkline, message, table header, ranks, events title,
        // events.
        (5 + 1 + ranks + 1 + EVENT_ROWS) as u16
    }

    /// Draws the view into `area`.
    pub fn draw(&self, frame: &mut Frame, area: Rect) {
        let Some(st) = &self.status else {
            frame.render_widget(Paragraph::new("waiting for the job's status..."), area);
            return;
        };
        let p = st.progress.unwrap_or_default();
        let shown_ranks = rank_order(st);
        let more = st.ranks.len().saturating_sub(MAX_RANK_ROWS);
        let rank_rows = shown_ranks.len().min(MAX_RANK_ROWS) + usize::from(more > 0);
        let [title, gauge, figures, spark, message, table, events] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(1),
            Constraint::Length(1),
            Constraint::Length(1),
            Constraint::Length(1),
            Constraint::Length(1 + rank_rows as u16),
            Constraint::Min(0),
        ])
        .areas(area);

        frame.render_widget(Paragraph::new(title_line(st)), title);

        let (ratio, label) = match (p.step, p.total_steps) {
            (Some(s), Some(t)) if t > 0 => {
                let eta = self
                    .steps_per_second()
                    .filter(|_| st.state == "RUNNING" && s < t)
                    .map(|r| format!("  ETA {}", short_duration((t - s) as f64 / r)))
                    .unwrap_or_default();
                (
                    (s as f64 / t as f64).clamp(0.0, 1.0),
                    format!("step {s}/{t} ({:.0}%){eta}", 100.0 * s as f64 / t as f64),
                )
            }
            (Some(s), _) => (0.0, format!("step {s}")),
            _ => (0.0, "no step yet".to_owned()),
        };
        let [bar] = Layout::horizontal([Constraint::Max(100)]).areas(gauge);
        frame.render_widget(
            LineGauge::default()
                .ratio(ratio)
                .label(format!("{label}  "))
                .filled_symbol("█")
                .unfilled_symbol("░")
                .filled_style(Style::default().fg(state_color(&st.state)))
                .unfilled_style(Style::default().fg(Color::DarkGray)),
            bar,
        );

        let mut figs = vec![format!("loss {}", fixed(p.loss, 4))];
        if let Some(g) = p.grad_norm {
            figs.push(format!("grad norm {g:.3}"));
        }
        figs.push(format!(
            "tokens/s {}",
            p.tokens_per_second
                .map_or_else(|| "-".into(), |t| format!("{t:.0}"))
        ));
        if let Some(m) = p.mfu {
            figs.push(format!("MFU {:.1}%", 100.0 * m));
        }
        if let Some(c) = &st.last_checkpoint {
            figs.push(format!("checkpoint step {}", c.step));
        }
        frame.render_widget(Paragraph::new(figs.join("   ")), figures);

        let [spark_label, spark_area] =
            Layout::horizontal([Constraint::Length(11), Constraint::Min(0)]).areas(spark);
        frame.render_widget(Paragraph::new("loss trend"), spark_label);
        let tail = self
            .losses
            .iter()
            .skip(self.losses.len().saturating_sub(spark_area.width as usize));
        frame.render_widget(
            Sparkline::default()
                .data(scaled(tail.copied().collect()))
                .max(100)
                .style(Style::default().fg(Color::Cyan)),
            spark_area,
        );

        frame.render_widget(Paragraph::new(message_line(st)), message);
        draw_ranks(frame, table, st, &shown_ranks, more);

        let mut lines = vec![Line::styled("events", Style::default().fg(Color::DarkGray))];
        let newest = st.recent_events.len().saturating_sub(EVENT_ROWS);
        for e in &st.recent_events[newest..] {
            lines.push(event_line(e));
        }
        frame.render_widget(Paragraph::new(lines), events);
    }
}

fn title_line(st: &pb::JobStatus) -> Line<'static> {
    let elapsed = now_ms().saturating_sub(st.created_unix_ms);
    let name = if st.name.is_empty() || st.name == st.id {
        String::new()
    } else {
        format!(" ({})", st.name)
    };
    Line::from(vec![
        Span::styled(
            format!("{}{name}  ", st.id),
            Style::default().add_modifier(Modifier::BOLD),
        ),
        Span::styled(
            st.state.clone(),
            Style::default()
                .fg(state_color(&st.state))
                .add_modifier(Modifier::BOLD),
        ),
        Span::raw(format!(
            "  generation {}  restarts {}/{}  world {}  elapsed {}",
            st.generation,
            st.restart_count,
            st.max_restarts,
            st.world_size,
            short_duration(elapsed as f64 / 1000.0)
        )),
    ])
}

/// Why the job waits or what went wrong, else its stragglers, else nothing.
fn message_line(st: &pb::JobStatus) -> Line<'static> {
    if let Some(r) = &st.pending_reason {
        return Line::styled(format!("pending: {r}"), Style::default().fg(Color::Yellow));
    }
    if let Some(f) = st
        .failure
        .as_ref()
        .filter(|f| f.generation == st.generation)
        && matches!(st.state.as_str(), "RESTARTING" | "FAILED")
    {
        let reason = if f.reason.is_empty() {
            String::new()
        } else {
            format!("{}: ", f.reason)
        };
        return Line::styled(
            format!("{reason}{}", f.message),
            Style::default().fg(Color::Red),
        );
    }
    if !st.stragglers.is_empty() {
        let names: Vec<String> = st
            .stragglers
            .iter()
            .map(|s| format!("rank {} +{:.0}%", s.rank, (s.slowdown - 1.0) * 100.0))
            .collect();
        return Line::styled(
            format!("stragglers: {}", names.join(", ")),
            Style::default().fg(Color::Yellow),
        );
    }
    Line::default()
}

/// The ranks in the order the table shows them: failed, flagged and lagging ranks first, then
/// by rank number.
fn rank_order(st: &pb::JobStatus) -> Vec<&pb::RankStatus> {
    let mut ranks: Vec<&pb::RankStatus> = st.ranks.iter().collect();
    let notable = |r: &pb::RankStatus| {
        matches!(r.state.as_str(), "FAILED" | "LOST")
            || st.stragglers.iter().any(|s| s.rank == r.rank)
            || st.lagging_rank == Some(r.rank)
    };
    ranks.sort_by_key(|r| (!notable(r), r.rank));
    ranks
}

fn draw_ranks(
    frame: &mut Frame,
    area: Rect,
    st: &pb::JobStatus,
    ranks: &[&pb::RankStatus],
    more: usize,
) {
    let header = Row::new([
        "RANK",
        "NODE",
        "DEVICE",
        "STATE",
        "STEP",
        "STEP TIME",
        "COMM WAIT",
        "MEMORY",
        "FLAGS",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    let rows: Vec<Row> = ranks
        .iter()
        .take(MAX_RANK_ROWS)
        .map(|r| {
            let mut flags = Vec::new();
            if let Some(s) = st.stragglers.iter().find(|s| s.rank == r.rank) {
                flags.push(format!("SLOW +{:.0}%", (s.slowdown - 1.0) * 100.0));
            }
            if st.lagging_rank == Some(r.rank) {
                flags.push("LAGGING".to_owned());
            }
            match (r.exit_code, r.signal) {
                (_, Some(sig)) => flags.push(format!("signal {sig}")),
                (Some(c), None) if c != 0 => flags.push(format!("exit {c}")),
                _ => {}
            }
            Row::new([
                Cell::from(r.rank.to_string()),
                Cell::from(r.node.clone()),
                Cell::from(r.device.clone().unwrap_or_else(|| "-".into())),
                Cell::from(r.state.clone()).style(Style::default().fg(state_color(&r.state))),
                Cell::from(r.step.map_or_else(|| "-".into(), |s| s.to_string())),
                Cell::from(r.step_seconds.map_or_else(|| "-".into(), seconds)),
                Cell::from(
                    r.collective_wait_seconds
                        .map_or_else(|| "-".into(), seconds),
                ),
                Cell::from(r.memory_bytes.map_or_else(|| "-".into(), bytes)),
                Cell::from(flags.join(" ")).style(Style::default().fg(Color::Yellow)),
            ])
        })
        .collect();
    let [table_area, more_area] = Layout::vertical([
        Constraint::Length(1 + rows.len() as u16),
        Constraint::Min(0),
    ])
    .areas(area);
    if more > 0 {
        frame.render_widget(Paragraph::new(format!("... {more} more ranks")), more_area);
    }
    let widths = [
        Constraint::Length(6),
        Constraint::Length(14),
        Constraint::Length(14),
        Constraint::Length(9),
        Constraint::Length(8),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Min(8),
    ];
    frame.render_widget(Table::new(rows, widths).header(header), table_area);
}

fn event_line(e: &pb::JobEvent) -> Line<'static> {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(e.unix_ms);
    let time = humantime::format_rfc3339_seconds(at).to_string();
    // "2026-12-07T09:21:34Z" → "09:21:34".
    let time = time.get(11..19).unwrap_or(&time).to_owned();
    let style = if e.warning {
        Style::default().fg(Color::Yellow)
    } else {
        Style::default()
    };
    Line::from(vec![
        Span::raw(format!("  {time}  ")),
        Span::styled(format!("{:<20} ", e.kind), style),
        Span::raw(e.message.clone()),
    ])
}

/// `ringctl top`: every job that has not ended.
#[derive(Default)]
pub struct TopView {
    jobs: Vec<pb::JobStatus>,
    at: Option<std::time::SystemTime>,
}

impl TopView {
    /// Takes a List reply (every job); keeps those that have not ended.
    pub fn update(&mut self, jobs: Vec<pb::JobStatus>) {
        self.jobs = jobs
            .into_iter()
            .filter(|j| !super::is_final(&j.state))
            .collect();
        self.at = Some(std::time::SystemTime::now());
    }

    /// The jobs shown.
    pub fn jobs(&self) -> &[pb::JobStatus] {
        &self.jobs
    }

    /// Rows the view needs.
    pub fn height() -> u16 {
        (2 + MAX_JOB_ROWS + 1) as u16
    }

    /// The table as text (plain mode prints it when it changes).
    pub fn rows(&self) -> Vec<[String; 10]> {
        self.jobs
            .iter()
            .map(|j| {
                let p = j.progress.unwrap_or_default();
                [
                    j.id.clone(),
                    j.name.clone(),
                    j.state.clone(),
                    match (p.step, p.total_steps) {
                        (Some(s), Some(t)) => format!("{s}/{t}"),
                        (Some(s), None) => s.to_string(),
                        _ => "-".into(),
                    },
                    fixed(p.loss, 4),
                    p.tokens_per_second
                        .map_or_else(|| "-".into(), |t| format!("{t:.0}")),
                    format!("{}/{}", j.restart_count, j.max_restarts),
                    j.world_size.to_string(),
                    j.stragglers
                        .iter()
                        .map(|s| format!("{}(+{:.0}%)", s.rank, (s.slowdown - 1.0) * 100.0))
                        .collect::<Vec<_>>()
                        .join(","),
                    short_duration(now_ms().saturating_sub(j.created_unix_ms) as f64 / 1000.0),
                ]
            })
            .collect()
    }

    /// The column names of [`TopView::rows`].
    pub const HEADER: [&'static str; 10] = [
        "ID",
        "NAME",
        "STATE",
        "STEP",
        "LOSS",
        "TOKENS/S",
        "RESTARTS",
        "WORLD",
        "STRAGGLERS",
        "AGE",
    ];

    /// Draws the table into `area`.
    pub fn draw(&self, frame: &mut Frame, area: Rect) {
        let [title, table] =
            Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(area);
        let at = self
            .at
            .map(|t| humantime::format_rfc3339_seconds(t).to_string())
            .unwrap_or_default();
        frame.render_widget(
            Paragraph::new(format!(
                "{} job(s) not ended   (updated {at}; Ctrl-C to quit)",
                self.jobs.len()
            )),
            title,
        );
        let all = self.rows();
        let more = all.len().saturating_sub(MAX_JOB_ROWS);
        let rows: Vec<Row> = all
            .into_iter()
            .take(MAX_JOB_ROWS)
            .map(|r| {
                let color = state_color(&r[2]);
                Row::new(r.map(Cell::from)).style(Style::default().fg(color))
            })
            .collect();
        let [table, more_area] = Layout::vertical([
            Constraint::Length(1 + rows.len() as u16),
            Constraint::Min(0),
        ])
        .areas(table);
        if more > 0 {
            frame.render_widget(Paragraph::new(format!("... {more} more jobs")), more_area);
        }
        let widths = [
            Constraint::Length(14),
            Constraint::Length(16),
            Constraint::Length(11),
            Constraint::Length(11),
            Constraint::Length(8),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Length(6),
            Constraint::Length(14),
            Constraint::Min(6),
        ];
        let header = Row::new(Self::HEADER).style(Style::default().add_modifier(Modifier::BOLD));
        frame.render_widget(Table::new(rows, widths).header(header), table);
    }
}

/// The terminal a live view draws on: an inline viewport at the cursor, which stays in the
/// scrollback when the view ends.
pub struct Live<B: Backend = CrosstermBackend<std::io::Stdout>> {
    terminal: Terminal<B>,
    height: u16,
    /// The cursor is below the view and shown (or the view was cleared to be replaced).
    released: bool,
}

impl Live {
    /// A view `height` rows high (fewer if the terminal is smaller) on stdout.
    ///
    /// # Errors
    /// When the terminal does not answer (the cursor position query), or stdout fails.
    pub fn on_stdout(height: u16) -> std::io::Result<Live> {
        let backend = CrosstermBackend::new(std::io::stdout());
        Live::new(backend, height)
    }
}

impl<B: Backend> Drop for Live<B> {
    /// A view dropped on an error path still leaves the cursor below it, visible.
    fn drop(&mut self) {
        self.release();
    }
}

impl Live {
    /// The view, `height` rows high now (the job's ranks became known): cleared and drawn
    /// again from the same row.
    ///
    /// # Errors
    /// As [`Live::on_stdout`].
    pub fn regrow(mut self, height: u16) -> std::io::Result<Live> {
        self.clear_for_replacement()?;
        drop(self);
        Live::on_stdout(height)
    }
}

/// `line` as text a terminal cell can hold: what a carriage return overwrote dropped (a
/// progress bar's last state stays), escape sequences (colours, cursor moves) removed, tabs
/// expanded to 8 columns, other control characters left out.
fn plain_text(line: &str) -> String {
    let line = line.trim_end_matches(['\r', '\n']);
    let line = line.rsplit('\r').next().unwrap_or(line);
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    let mut col = 0;
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => match chars.next() {
                // CSI: parameters and intermediates, then a final byte in @..~.
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: up to BEL or ESC \.
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\x07' {
                            break;
                        }
                        if c == '\x1b' {
                            chars.next_if_eq(&'\\');
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\t' => {
                let n = 8 - col % 8;
                out.extend(std::iter::repeat_n(' ', n));
                col += n;
            }
            c if c.is_control() => {}
            c => {
                out.push(c);
                col += 1;
            }
        }
    }
    out
}

/// A backend's error as an I/O error.
fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl<B: Backend> Live<B> {
    /// A view on `backend`.
    ///
    /// # Errors
    /// As [`Live::on_stdout`].
    pub fn new(backend: B, height: u16) -> std::io::Result<Live<B>> {
        let rows = backend.size().map_err(io_err)?.height;
        let height = height.min(rows.saturating_sub(1)).max(3);
        let terminal = Terminal::with_options(
            backend,
            TerminalOptions {
                viewport: Viewport::Inline(height),
            },
        )
        .map_err(io_err)?;
        Ok(Live {
            terminal,
            height,
            released: false,
        })
    }

    /// Rows the view has.
    pub fn height(&self) -> u16 {
        self.height
    }

    /// Redraws the view with `draw`.
    ///
    /// # Errors
    /// When the terminal cannot be written.
    pub fn draw(&mut self, draw: impl FnOnce(&mut Frame, Rect)) -> std::io::Result<()> {
        self.terminal
            .draw(|f| {
                let area = f.area();
                draw(f, area);
            })
            .map(|_| ())
            .map_err(io_err)
    }

    /// Prints `lines` above the view (they scroll up with the terminal's history); a line
    /// wider than the terminal wraps, up to [`MAX_WRAPPED_ROWS`] rows.
    ///
    /// # Errors
    /// When the terminal cannot be written.
    pub fn print_above(&mut self, lines: &[String]) -> std::io::Result<()> {
        // A terminal resized since the last frame: the view's geometry first.
        self.terminal.autoresize().map_err(io_err)?;
        let width = self.terminal.size().map_err(io_err)?.width.max(1) as usize;
        let mut text: Vec<Line> = Vec::new();
        for line in lines {
            let chars: Vec<char> = plain_text(line).chars().collect();
            if chars.is_empty() {
                text.push(Line::default());
            }
            let rows = chars.len().div_ceil(width);
            for (i, row) in chars.chunks(width).take(MAX_WRAPPED_ROWS).enumerate() {
                let mut row: String = row.iter().collect();
                if i + 1 == MAX_WRAPPED_ROWS && rows > MAX_WRAPPED_ROWS {
                    row.pop();
                    row.push('…');
                }
                text.push(Line::raw(row));
            }
        }
        let height = text.len() as u16;
        self.terminal
            .insert_before(height, |buf| {
                use ratatui::widgets::Widget;
                Paragraph::new(text).render(buf.area, buf);
            })
            .map_err(io_err)
    }

    /// Puts the cursor on the line below the view and shows it (once).
    fn release(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        let area = self.terminal.get_frame().area();
        let _ = self.terminal.set_cursor_position((0, area.bottom()));
        let _ = self.terminal.show_cursor();
        let _ = Backend::flush(self.terminal.backend_mut());
    }

    /// Leaves the last frame in place and puts the cursor on the line below it.
    pub fn finish(mut self) {
        self.release();
        drop(self);
        println!();
    }

    /// Clears the view and leaves the cursor where it began (for a taller view there).
    fn clear_for_replacement(&mut self) -> std::io::Result<()> {
        let area = self.terminal.get_frame().area();
        self.terminal.clear().map_err(io_err)?;
        self.terminal
            .set_cursor_position((0, area.y))
            .map_err(io_err)?;
        self.released = true;
        Ok(())
    }

    /// The backend (tests read the screen from a `TestBackend`).
    pub fn backend(&self) -> &B {
        self.terminal.backend()
    }
}

/// Where ringctl's own log records go while a live view is on the terminal: into the view's
/// line channel (shown above it), else to stderr as usual.
static LOG_LINES: std::sync::Mutex<Option<tokio::sync::mpsc::Sender<String>>> =
    std::sync::Mutex::new(None);

/// Sends ringctl's log records to `lines` from now on (`None`: to stderr again).
pub fn route_logs(lines: Option<tokio::sync::mpsc::Sender<String>>) {
    if let Ok(mut l) = LOG_LINES.lock() {
        *l = lines;
    }
}

/// The writer of ringctl's log records (`tracing_subscriber`'s `MakeWriter`): one record per
/// writer, sent where [`route_logs`] says when it is dropped.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWriter;

/// One record being written.
pub struct LogRecord(Vec<u8>);

impl std::io::Write for LogRecord {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogRecord {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let sink = LOG_LINES.lock().ok().and_then(|l| l.clone());
        let text = String::from_utf8_lossy(&self.0);
        match sink {
            Some(tx) => {
                for line in text.lines() {
                    // A full channel (the terminal is not keeping up) or a closed one: the
                    // record is not lost, it goes to stderr.
                    if tx.try_send(line.to_owned()).is_err() {
                        eprintln!("{line}");
                    }
                }
            }
            None => {
                use std::io::Write;
                let _ = std::io::stderr().write_all(&self.0);
            }
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogRecord;
    fn make_writer(&'a self) -> LogRecord {
        LogRecord(Vec::new())
    }
}

fn state_color(state: &str) -> Color {
    match state {
        "RUNNING" | "SUCCEEDED" => Color::Green,
        "FAILED" | "LOST" => Color::Red,
        "RESTARTING" | "CANCELLED" | "STOPPED" | "PENDING" | "STARTING" => Color::Yellow,
        _ => Color::Reset,
    }
}

/// Losses mapped onto 1..=100 between their minimum and maximum (a flat series sits in the
/// middle).
fn scaled(losses: Vec<f64>) -> Vec<u64> {
    let lo = losses.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = losses.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    losses
        .iter()
        .map(|l| {
            if hi - lo < 1e-12 {
                50
            } else {
                1 + ((l - lo) / (hi - lo) * 99.0).round() as u64
            }
        })
        .collect()
}

fn fixed(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

/// `1h02m`, `3m05s`, `42s`.
pub fn short_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".into();
    }
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// `850 ms`, `1.25 s`.
fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else {
        format!("{s:.2} s")
    }
}

/// `512 MiB`, `1.5 GiB`.
fn bytes(b: u64) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    let mib = b as f64 / MIB;
    if mib >= 1024.0 {
        format!("{:.1} GiB", mib / 1024.0)
    } else {
        format!("{mib:.0} MiB")
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use ratatui::backend::TestBackend;

    use super::*;

    fn job(world: u32, state: &str) -> pb::JobStatus {
        pb::JobStatus {
            id: "j-7f3a".into(),
            name: "quickstart".into(),
            state: state.into(),
            generation: 1,
            restart_count: 1,
            max_restarts: 3,
            world_size: world,
            created_unix_ms: now_ms() - 65_000,
            ranks: (0..world)
                .map(|r| pb::RankStatus {
                    rank: r,
                    node: format!("node-{}", r / 2),
                    local_rank: r % 2,
                    state: "RUNNING".into(),
                    step: Some(120),
                    step_seconds: Some(0.25),
                    collective_wait_seconds: Some(0.05),
                    memory_bytes: Some(3 << 29),
                    device: Some("cpu".into()),
                    ..Default::default()
                })
                .collect(),
            progress: Some(pb::JobProgress {
                step: Some(120),
                total_steps: Some(200),
                loss: Some(2.3456),
                tokens_per_second: Some(4321.0),
                grad_norm: Some(1.234),
                mfu: Some(0.123),
            }),
            stragglers: vec![pb::Straggler {
                rank: 2,
                node: "node-1".into(),
                slowdown: 1.34,
                since_step: 100,
            }],
            recent_events: vec![pb::JobEvent {
                seq: 9,
                unix_ms: 1_800_000_000_000,
                kind: "StragglerDetected".into(),
                message: "rank 2 on node-1: compute time per step 34% above".into(),
                warning: true,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn screen(b: &TestBackend) -> Vec<String> {
        let buf = b.buffer();
        (0..buf.area.height)
            .map(|y| {
                (0..buf.area.width)
                    .map(|x| buf[(x, y)].symbol())
                    .collect::<String>()
                    .trim_end()
                    .to_owned()
            })
            .collect()
    }

    fn render(view: &JobView, width: u16, world: usize) -> Vec<String> {
        let height = JobView::height(world);
        let mut live = Live::new(TestBackend::new(width, height + 1), height).unwrap();
        live.draw(|f, a| view.draw(f, a)).unwrap();
        screen(live.backend())
    }

    #[test]
    fn a_running_job_shows_progress_figures_ranks_and_events() {
        let mut view = JobView::default();
        let t0 = Instant::now();
        let mut st = job(4, "RUNNING");
        view.update(st.clone(), t0);
        st.progress.as_mut().unwrap().step = Some(130);
        view.update(st, t0 + Duration::from_secs(10));
        let lines = render(&view, 110, 4);
        let all = lines.join("\n");
        assert!(
            lines[0].starts_with(
                "j-7f3a (quickstart)  RUNNING  generation 1  restarts 1/3  world 4  elapsed 1m0"
            ),
            "{all}"
        );
        // 10 steps in 10 s, 70 to go.
        assert!(
            lines[1].starts_with("step 130/200 (65%)  ETA 1m10s"),
            "{all}"
        );
        assert!(lines[1].contains(" ███"), "{all}");
        assert!(lines[1].ends_with("░"), "{all}");
        assert!(
            lines[2].contains("loss 2.3456   grad norm 1.234   tokens/s 4321   MFU 12.3%"),
            "{all}"
        );
        assert!(lines[3].starts_with("loss trend"), "{all}");
        assert!(lines[4].contains("stragglers: rank 2 +34%"), "{all}");
        let words = |l: &str| l.split_whitespace().collect::<Vec<_>>().join(" ");
        assert_eq!(
            words(&lines[5]),
            "RANK NODE DEVICE STATE STEP STEP TIME COMM WAIT MEMORY FLAGS"
        );
        // The flagged rank comes first.
        assert_eq!(
            words(&lines[6]),
            "2 node-1 cpu RUNNING 120 250 ms 50 ms 1.5 GiB SLOW +34%"
        );
        assert!(words(&lines[7]).starts_with("0 node-0 cpu"), "{all}");
        assert!(all.contains("StragglerDetected"), "{all}");
    }

    #[test]
    fn a_large_job_shows_sixteen_ranks_and_counts_the_rest() {
        let mut view = JobView::default();
        view.update(job(300, "RUNNING"), Instant::now());
        let lines = render(&view, 110, 300);
        let all = lines.join("\n");
        assert!(all.contains("... 284 more ranks"), "{all}");
        // 5 lines of figures, the table's header, 16 ranks and the count, 6 of events.
        assert_eq!(JobView::height(300), 29);
    }

    #[test]
    fn a_restarting_job_shows_its_failure() {
        let mut st = job(2, "RESTARTING");
        st.failure = Some(pb::Failure {
            generation: 1,
            reason: "WorkerExited".into(),
            message: "rank 1 on node-0 exited with code 1".into(),
            ..Default::default()
        });
        st.ranks[1].exit_code = Some(1);
        st.ranks[1].state = "FAILED".into();
        let mut view = JobView::default();
        view.update(st, Instant::now());
        let all = render(&view, 110, 2).join("\n");
        assert!(
            all.contains("WorkerExited: rank 1 on node-0 exited with code 1"),
            "{all}"
        );
        assert!(all.contains("exit 1"), "{all}");
        assert!(!all.contains("ETA"), "{all}");
    }

    #[test]
    fn top_lists_the_jobs_that_have_not_ended() {
        let mut top = TopView::default();
        top.update(vec![
            job(4, "RUNNING"),
            job(2, "SUCCEEDED"),
            job(8, "PENDING"),
        ]);
        assert_eq!(top.jobs().len(), 2);
        let mut live = Live::new(TestBackend::new(120, 10), 9).unwrap();
        live.draw(|f, a| top.draw(f, a)).unwrap();
        let lines = screen(live.backend());
        let all = lines.join("\n");
        assert!(lines[0].starts_with("2 job(s) not ended"), "{all}");
        assert!(lines[1].starts_with("ID"), "{all}");
        assert!(
            lines[2].contains("RUNNING") && lines[2].contains("120/200"),
            "{all}"
        );
        assert!(lines[2].contains("2(+34%)"), "{all}");
        assert!(lines[3].contains("PENDING"), "{all}");
    }

    #[test]
    fn lines_printed_above_scroll_over_the_view() {
        let mut view = JobView::default();
        view.update(job(2, "RUNNING"), Instant::now());
        let h = JobView::height(2);
        let mut backend = TestBackend::new(100, h + 4);
        backend
            .set_cursor_position(ratatui::layout::Position::new(0, 0))
            .unwrap();
        let mut live = Live::new(backend, h).unwrap();
        live.draw(|f, a| view.draw(f, a)).unwrap();
        live.print_above(&["[rank 1] hello".into()]).unwrap();
        live.draw(|f, a| view.draw(f, a)).unwrap();
        let lines = screen(live.backend());
        assert_eq!(lines[0], "[rank 1] hello", "{lines:#?}");
        assert!(lines[1].starts_with("j-7f3a"), "{lines:#?}");
    }

    #[test]
    fn log_records_go_above_the_view_while_it_is_on() {
        use std::io::Write;
        use tracing_subscriber::fmt::MakeWriter;
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        route_logs(Some(tx));
        let mut w = LogWriter.make_writer();
        w.write_all(b"WARN straggler rank=2\n").unwrap();
        drop(w);
        route_logs(None);
        assert_eq!(rx.try_recv().unwrap(), "WARN straggler rank=2");
        // Routed back to stderr: the channel gets nothing more.
        drop(LogWriter.make_writer());
        let mut w = LogWriter.make_writer();
        w.write_all(b"to stderr\n").unwrap();
        drop(w);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn worker_lines_lose_escapes_and_carriage_returns_and_keep_their_columns() {
        assert_eq!(
            plain_text("\x1b[2m2026\x1b[0m \x1b[33mWARN\x1b[0m x"),
            "2026 WARN x"
        );
        assert_eq!(plain_text("10%\r50%\r100% done\n"), "100% done");
        assert_eq!(plain_text("a\tb\tc"), "a       b       c");
        assert_eq!(
            plain_text("\x1b]0;title\x07text\x1b]8;;x\x1b\\link"),
            "textlink"
        );
        assert_eq!(plain_text("bell\x07"), "bell");
    }

    #[test]
    fn a_long_line_wraps_and_is_cut_with_a_mark() {
        let mut backend = TestBackend::new(10, 14);
        backend
            .set_cursor_position(ratatui::layout::Position::new(0, 0))
            .unwrap();
        let mut live = Live::new(backend, 3).unwrap();
        live.print_above(&["x".repeat(200)]).unwrap();
        let lines = screen(live.backend());
        assert_eq!(lines[0], "xxxxxxxxxx");
        assert_eq!(lines[7], "xxxxxxxxx…", "{lines:#?}");
        assert_eq!(lines[8], "", "{lines:#?}");
    }

    #[test]
    fn durations_sizes_and_scaling() {
        assert_eq!(short_duration(42.4), "42s");
        assert_eq!(short_duration(185.0), "3m05s");
        assert_eq!(short_duration(3720.0), "1h02m");
        assert_eq!(short_duration(f64::INFINITY), "-");
        assert_eq!(seconds(0.25), "250 ms");
        assert_eq!(seconds(1.254), "1.25 s");
        assert_eq!(bytes(3 << 29), "1.5 GiB");
        assert_eq!(bytes(512 << 20), "512 MiB");
        assert_eq!(scaled(vec![1.0, 2.0, 3.0]), vec![1, 51, 100]);
        assert_eq!(scaled(vec![2.0, 2.0]), vec![50, 50]);
    }
}
