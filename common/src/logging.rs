//! Tracing setup shared by every Ringmaster binary: human-readable lines by default,
//! `--log-format json` for log shippers. `RUST_LOG` overrides the level (default `info`).

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

/// How a binary writes its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// Installs the global subscriber (to stderr). Calling it twice is harmless.
pub fn init(format: LogFormat) {
    init_with_writer(
        format,
        std::io::stderr,
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
    );
}

/// Installs the global subscriber writing to `writer` (`ringctl local` routes its records
/// above its live view), with colour codes when `ansi`. Calling it twice is harmless.
pub fn init_with_writer<W>(format: LogFormat, writer: W, ansi: bool)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        // Colour codes only on a terminal: logs piped to files or CI stay plain text.
        .with_ansi(ansi)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
