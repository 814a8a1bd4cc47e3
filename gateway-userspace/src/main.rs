//! The `gateway` binary: parse flags, set up logging, run the chosen command.

use std::io::{IsTerminal, Write};

use anyhow::Context;
use clap::Parser;
use gateway::{
    cli::{Cli, ClientArgs, Command, LogFormat},
    client::{
        self,
        commands::{AdminCommand, Output},
    },
};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    // SAFETY: setting a signal's disposition to ignore, before any other thread exists. With a
    // file-size limit the store's write then fails with EFBIG (and is reported and retried)
    // instead of the signal killing the gateway.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let cli = Cli::parse();
    let filter = match EnvFilter::try_new(&cli.log) {
        Ok(filter) => filter,
        Err(e) => fail(&format!("--log: invalid log filter `{}`: {e}", cli.log), 2),
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }

    let (client, command) = match cli.command {
        Command::Serve(args) => {
            let config = match args.into_config() {
                Ok(config) => config,
                Err(e) => fail(&e.to_string(), 2),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(gateway::serve::run(config, shutdown_signal()))?;
            return Ok(());
        }
        Command::Api(args) => (args.client, AdminCommand::Api(args.action)),
        Command::Plan(args) => (args.client, AdminCommand::Plan(args.action)),
        Command::Key(args) => (args.client, AdminCommand::Key(args.action)),
        Command::Usage(args) => {
            let command = match args.action {
                Some(gateway::cli::UsageAction::Extend(extend)) => {
                    AdminCommand::UsageExtend(extend)
                }
                None => {
                    let today = time::OffsetDateTime::now_utc().date();
                    match args.show(today) {
                        Ok(show) => AdminCommand::Usage(show),
                        Err(e) => fail(&e.to_string(), 2),
                    }
                }
            };
            (args.client, command)
        }
    };
    run_admin(&client, command)
}

/// Runs an admin command and prints its output; a failure is one line on stderr and exit
/// status 1.
fn run_admin(args: &ClientArgs, command: AdminCommand) -> anyhow::Result<()> {
    match client::execute(args.config(), command) {
        Ok(Output { json, text }) => {
            let text = if args.json {
                let pretty = serde_json::to_string_pretty(&json).expect("JSON values serialise");
                format!("{pretty}\n")
            } else {
                text
            };
            let mut stdout = std::io::stdout().lock();
            match stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
            {
                // A reader that stopped early (`| head`) is not a failure of the command.
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    fail(&format!("cannot write the output: {e}"), 1)
                }
                _ => Ok(()),
            }
        }
        Err(e) => fail(&e.to_string(), 1),
    }
}

/// Prints `error: MESSAGE` as one line on stderr and exits with `status`.
fn fail(message: &str, status: i32) -> ! {
    let line = message.replace(['\n', '\r'], " ");
    eprintln!("error: {line}");
    std::process::exit(status)
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
