//! Writes tether's man pages and shell completions, generated from its own
//! clap definition ([`tether::cli::command`]) so that they cannot drift from
//! the CLI. Used by `scripts/package.sh`; not shipped. A separate binary so
//! that the daemon carries none of the generators' code (a sidecar's memory).
//!
//! ```text
//! tether-generate man --out DIR
//! tether-generate completions bash|zsh|fish --out DIR
//! ```

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "tether-generate", about = "Write tether's man pages or shell completions")]
struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand, Debug)]
enum What {
    /// tether.1 and one page per subcommand (tether-run.1, ...).
    Man {
        /// Directory to write them into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// The completion script for SHELL, under the name that shell looks for
    /// (bash: tether, zsh: _tether, fish: tether.fish).
    Completions {
        shell: clap_complete::Shell,
        /// Directory to write it into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let what = Args::parse().what;
    let result = match &what {
        What::Man { out } => std::fs::create_dir_all(out).and_then(|()| clap_mangen::generate_to(tether::cli::command(), out)),
        What::Completions { shell, out } => std::fs::create_dir_all(out)
            .and_then(|()| clap_complete::generate_to(*shell, &mut tether::cli::command(), "tether", out).map(drop)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let (What::Man { out } | What::Completions { out, .. }) = &what;
            eprintln!("error: writing into {}: {e}", out.display());
            ExitCode::from(1)
        }
    }
}
