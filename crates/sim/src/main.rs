//! `concord-sim`: runs seeds of the deterministic simulator; see `docs/simulation.md`.

use concord_sim::runner::{parse_args, replay_command, Command, USAGE};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cmd = match parse_args(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("concord-sim: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match cmd {
        Command::Help => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Command::ListBugs { engine } => match concord_sim::known_bugs(&engine) {
            Ok(bugs) => {
                for b in bugs {
                    println!("{b}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("concord-sim: {e}");
                ExitCode::from(2)
            }
        },
        Command::Sweep(o) => {
            let verbose = o.verbose;
            let result = concord_sim::sweep(&o, |r| {
                if verbose {
                    for line in &r.trace {
                        println!("seed {}: {line}", r.seed);
                    }
                    println!(
                        "seed {}: nodes={} ops={} indeterminate={} ticks={} messages={} {}",
                        r.seed,
                        r.nodes,
                        r.ops_checked,
                        r.indeterminate,
                        r.ticks,
                        r.messages,
                        if r.violation.is_some() { "FAIL" } else { "ok" }
                    );
                }
            });
            let summary = match result {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("concord-sim: {e}");
                    return ExitCode::from(2);
                }
            };
            for (seed, what) in &summary.violations {
                println!("FAIL seed {seed}: {what}");
                println!("  replay: {}", replay_command(&o, *seed));
            }
            if o.stats {
                println!("{}", summary.stats());
            }
            println!("{}", summary.line());
            if summary.violations.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
