//! The `wsrouter` command line: run, check a config, or run a local demo.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use wsrouter::config::LogFormat;
use wsrouter::echo::EchoReplica;
use wsrouter::{Config, Drain, Router};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("WSROUTER_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "wsrouter",
    version = VERSION,
    about = "WebSocket load balancer and reverse proxy"
)]
struct Cli {
    /// Config file to run with.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file: exit 0 if it is valid, 2 with the reason if not.
    Check,
    /// Run the router on 127.0.0.1 in front of two in-process echo replicas.
    Demo {
        /// Port for the router.
        #[arg(long, default_value_t = 9000)]
        port: u16,
    },
}

/// How often the config file is checked for changes (SIGHUP reloads at once).
const CONFIG_POLL: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Worker 0's event loop; the router starts the other workers' threads itself.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match cli.command {
        Some(Command::Check) => check(cli.config, &runtime),
        Some(Command::Demo { port }) => {
            wsrouter::log::init(LogFormat::Text);
            runtime.block_on(demo(port))
        }
        None => {
            let Some(path) = cli.config else {
                eprintln!("wsrouter: --config FILE is required (or try `wsrouter demo`)");
                return ExitCode::from(2);
            };
            let config = match Config::load(&path) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("{}: {e}", path.display());
                    return ExitCode::from(2);
                }
            };
            wsrouter::log::init(config.log.format);
            runtime.block_on(run(config, path))
        }
    }
}

/// Validate the config; replica groups are looked up once, and one that finds nothing fails.
fn check(path: Option<PathBuf>, runtime: &tokio::runtime::Runtime) -> ExitCode {
    let Some(path) = path else {
        eprintln!("wsrouter check: --config FILE is required");
        return ExitCode::from(2);
    };
    match Config::load(&path) {
        Ok(config) => match runtime.block_on(wsrouter::discovery::check_groups(&config)) {
            Ok(groups) => {
                let groups: String = groups
                    .iter()
                    .map(|(name, n)| format!(", group {name}: {n} found"))
                    .collect();
                println!(
                    "{}: valid ({} replicas{groups})",
                    path.display(),
                    config.replicas.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                ExitCode::from(2)
            }
        },
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            ExitCode::from(2)
        }
    }
}

async fn bind(config: Config) -> Option<Router> {
    match Router::bind(config).await {
        Ok(router) => Some(router),
        Err(e) => {
            eprintln!("wsrouter: {e}");
            None
        }
    }
}

async fn run(config: Config, path: PathBuf) -> ExitCode {
    // The SIGHUP handler is installed before the router answers its first request.
    let Some(router) = bind(config).await else {
        return ExitCode::from(1);
    };
    tokio::spawn(router.reloader().watch(path, CONFIG_POLL));
    serve(router).await
}

async fn serve(router: Router) -> ExitCode {
    let (max_connections, max_sessions) = router.limits();
    tracing::info!(
        addr = %router.local_addr(),
        admin = %router.admin_addr().map_or("-".to_string(), |a| a.to_string()),
        workers = router.workers(),
        max_connections,
        max_sessions,
        version = VERSION,
        "wsrouter listening"
    );
    match router.serve(shutdown_signal()).await {
        Drain::Complete => ExitCode::SUCCESS,
        Drain::TimedOut { sessions_left } => {
            tracing::warn!(
                sessions_left,
                "drain timeout passed; exiting with sessions open"
            );
            ExitCode::SUCCESS
        }
    }
}

async fn demo(port: u16) -> ExitCode {
    let (primary, secondary) = match (EchoReplica::start().await, EchoReplica::start().await) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("wsrouter demo: cannot start echo replicas: {e}");
            return ExitCode::from(1);
        }
    };
    let text = format!(
        "[listen]\nhost = \"127.0.0.1\"\nport = {port}\n\n[health_check]\ninterval_seconds = 1.0\ntimeout_seconds = 0.5\n\n\
         [[replicas]]\nname = \"echo-primary\"\nurl = \"{}\"\nprimary = true\n\n[[replicas]]\nname = \"echo-secondary\"\nurl = \"{}\"\n",
        primary.url(),
        secondary.url()
    );
    let config = Config::parse(&text).expect("demo config is valid");
    let Some(router) = bind(config).await else {
        return ExitCode::from(1);
    };
    println!(
        "wsrouter demo: two echo replicas at {} (primary) and {}",
        primary.url(),
        secondary.url()
    );
    println!("  WebSocket: ws://127.0.0.1:{port}/v1/stream   (every frame is echoed back)");
    println!("  status:    curl http://127.0.0.1:{port}/status");
    println!("  page:      http://127.0.0.1:{port}/   (live status page; open it in a browser)");
    println!("  Ctrl-C stops the demo.");
    serve(router).await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
