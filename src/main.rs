//! The `concord` command. Subcommands arrive with the node runtime (see ARCHITECTURE.md).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--version") | Some("version") => println!("concord {}", env!("CARGO_PKG_VERSION")),
        _ => {
            eprintln!("usage: concord <dev|start|status|version>");
            std::process::exit(2);
        }
    }
}
