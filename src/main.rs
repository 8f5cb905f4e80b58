//! The `dynamix` binary: parse the command line, load the config, set up logging, run.
//! Configuration errors exit with status 2.

use std::process::ExitCode;

use clap::Parser;
use dynamix::cli::{BenchCommand, Cli, Command, ModelsCommand};

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
        Some(Command::Bench {
            target: BenchCommand::Http(args),
        }) => return dynamix::bench::main(args),
        Some(Command::Bench {
            target: BenchCommand::Replay(args),
        }) => return dynamix::bench::replay::main(args),
        Some(Command::Bench {
            target: BenchCommand::Trace(args),
        }) => return dynamix::bench::trace::main(args),
        Some(Command::Serve(args)) => (args, dynamix::Role::Standalone),
        Some(Command::Frontend(args)) => (args, dynamix::Role::Frontend),
        Some(Command::Worker(args)) => (args, dynamix::Role::Worker),
        None => (cli.serve, dynamix::Role::Standalone),
    };
    let (serve, role) = serve;
    let (io, overrides) = match serve.resolve() {
        Ok(resolved) => resolved,
        Err(message) => {
            eprintln!("dynamix: {message}");
            return ExitCode::from(2);
        }
    };
    // dynamo-run's forms: `in=dyn://...` is a worker, `out=auto` a frontend.
    let role = match (&role, &io.input, io.discover) {
        (dynamix::Role::Standalone, dynamix::Input::Endpoint { .. }, _) => dynamix::Role::Worker,
        (dynamix::Role::Standalone, _, true) => dynamix::Role::Frontend,
        _ => role,
    };
    let input = io.input;
    let overrides = dynamix::config::Overrides {
        frontend: role == dynamix::Role::Frontend,
        ..overrides
    };
    let env = || std::env::vars().collect::<Vec<_>>();
    let config = match dynamix::config::load(serve.config.as_deref(), &env, &overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("dynamix: {e}");
            return ExitCode::from(2);
        }
    };
    dynamix::init_logging(&config.log);
    let system = actix_rt::System::new();
    let run = async {
        match role {
            dynamix::Role::Standalone => {
                dynamix::run(config, input, dynamix::shutdown_signal()).await
            }
            dynamix::Role::Frontend if !matches!(input, dynamix::Input::Endpoint { .. }) => {
                dynamix::run_frontend(config, input, dynamix::shutdown_signal()).await
            }
            dynamix::Role::Worker
                if matches!(input, dynamix::Input::Http | dynamix::Input::Endpoint { .. }) =>
            {
                dynamix::run_worker(config, dynamix::shutdown_signal()).await
            }
            dynamix::Role::Frontend => Err(dynamix::frontends::FrontendError::Input(
                "a frontend takes requests from in=http, in=text or in=batch:FILE; in=dyn://... makes a worker",
            )
            .into()),
            _ => Err(dynamix::frontends::FrontendError::Input(
                "a worker serves its request plane: use `dynamix worker` or `dynamix in=dyn://ns.comp.ep out=ENGINE`",
            )
            .into()),
        }
    };
    match system.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dynamix: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
