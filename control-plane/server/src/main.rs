//! `cellplane`: parses the command line and hands over to [`cellplane::cli::run`].

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = cellplane::cli::Cli::parse();
    let code = cellplane::cli::run(cli).await;
    std::process::exit(code);
}
