//! `vmbeam-bench`: `vmbeam-lab bench`, the paper's experiments (issue 4) run on the lab.
//!
//! - [`model`]: one [`model::RunRecord`] per migration run (experiment, system, settings,
//!   outcome, machine metadata) and its CSV/JSON writers;
//! - [`measure`]: interface byte counters, a time-series sampler, host and per-process CPU
//!   time from `/proc`, all readable from a chosen root so tests use temp dirs and fixtures;
//! - [`memtraffic`]: the memory-traffic model (Fig. 5), the paper's and ours;
//! - [`stats`]: median, min/max, ratios;
//! - [`plot`]: the figures (PNG and SVG) with plotters, text drawn with a TTF file;
//! - [`report`]: the Markdown report;
//! - [`plan`]: the `vmbeam-lab bench` arguments and the experiment plan as pure data;
//! - [`nested`]: `vmbeam-lab nested bench`, zero-copy vs traditional on the nested lab;
//! - [`runner`]: `vmbeam-lab bench` itself: the plan run on a lab it brings up and tears down;
//! - [`webload`]: the web clients of experiment g, in the load-generator namespace.

pub mod measure;
pub mod memtraffic;
pub mod model;
pub mod nested;
pub mod plan;
pub mod plot;
pub mod report;
pub mod runner;
pub mod stats;
pub mod webload;

use std::path::PathBuf;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file (the cause follows in the error chain).
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A system file did not have the expected shape.
    #[error("cannot parse {what}: {detail}")]
    Parse {
        /// Which file or value.
        what: String,
        /// What was wrong.
        detail: String,
    },
    /// JSON (de)serialisation.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The font plots need is missing or unusable.
    #[error(
        "font {path} unusable ({detail}); plots need a TTF font: `apt-get install fonts-dejavu-core` \
         or set VMBEAM_BENCH_FONT to a .ttf file"
    )]
    Font {
        /// The font file tried.
        path: PathBuf,
        /// Why it failed.
        detail: String,
    },
    /// Drawing a plot.
    #[error("plot {name}: {detail}")]
    Plot {
        /// The plot's file stem.
        name: String,
        /// The backend's message.
        detail: String,
    },
    /// The lab could not be brought up, used or torn down.
    #[error(transparent)]
    Lab(#[from] vmbeam_lab::LabError),
    /// A bench run went wrong (a migration failed, a guest's memory check failed...).
    #[error("{0}")]
    Run(String),
    /// Data given to a plot, statistic or report cannot be used.
    #[error("invalid data: {0}")]
    Data(String),
}

/// This crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
