//! `concord-bench`: see the crate doc and `concord-bench kv --help`.

use concord_bench::args::USAGE;
use concord_bench::{parse_kv_args, run_kv};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("kv") => {}
        Some("-h") | Some("--help") | None => {
            println!("{USAGE}");
            return;
        }
        Some(other) => {
            eprintln!("concord-bench: unknown workload {other}\n{USAGE}");
            std::process::exit(2);
        }
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    let kv_args = match parse_kv_args(&args[1..]) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("concord-bench: {e}");
            std::process::exit(2);
        }
    };
    println!(
        "concord-bench kv op={} clients={} conns={} endpoints={} duration={:?} value_size={} keys={}",
        kv_args.op.name(),
        kv_args.clients,
        kv_args.conns,
        kv_args.endpoints.join(","),
        kv_args.duration,
        kv_args.value_size,
        kv_args.keys
    );
    match run_kv(&kv_args).await {
        Ok(report) => {
            println!(
                "  ops={} errors={} elapsed={:.2}s throughput={:.1} ops/s",
                report.ops,
                report.errors,
                report.elapsed.as_secs_f64(),
                report.ops_per_sec()
            );
            println!(
                "  latency p50={:.3}ms p99={:.3}ms p999={:.3}ms max={:.3}ms",
                report.p50_us as f64 / 1000.0,
                report.p99_us as f64 / 1000.0,
                report.p999_us as f64 / 1000.0,
                report.max_us as f64 / 1000.0
            );
            if let Some(e) = &report.first_error {
                println!("  first error: {e}");
            }
            println!("{}", report.result_line());
            if report.ops == 0 {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("concord-bench: {e}");
            std::process::exit(1);
        }
    }
}
