//! The `dynamix` binary: parse the command line, load the config, set up logging, run.
//! Configuration errors exit with status 2.

use std::process::ExitCode;

use clap::Parser;
use dynamix::cli::{Cli, Command, ModelsCommand};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let serve = match cli.command {
        Some(Command::Models {
            action: ModelsCommand::Pull { packages },
        }) => return dynamix::models_pull(&packages),
        Some(Command::Models {
            action: ModelsCommand::List,
        }) => return dynamix::models_list(),
        Some(Command::Drill(args)) => return dynamix::drill::main(args),
        Some(Command::Gms(args)) => return dynamix::gms::main(args),
        Some(Command::Serve(args)) => args,
        None => cli.serve,
    };
    let (input, overrides) = match serve.resolve() {
        Ok(resolved) => resolved,
        Err(message) => {
            eprintln!("dynamix: {message}");
            return ExitCode::from(2);
        }
    };
    let env = || std::env::vars().collect::<Vec<_>>();
    let config = match dynamix::config::load(serve.config.as_deref(), &env, &overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("dynamix: {e}");
            return ExitCode::from(2);
        }
    };
    dynamix::init_logging(&config.log.filter);
    let system = actix_rt::System::new();
    match system.block_on(dynamix::run(config, input, dynamix::shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dynamix: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
