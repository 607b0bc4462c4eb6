//! The `outrigger` command: parse, validate, run.
//!
//! The config is validated completely before any runtime, thread or socket
//! exists; an invalid config exits 64 (EX_USAGE), listing every bad field.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use outrigger::config::{Config, ConfigError};

/// I/O events the runtime takes per scheduler tick; see `run`.
const IO_EVENTS_PER_TICK: usize = 8;

/// EX_USAGE from sysexits.h: the invocation (here, the config) is wrong.
const EX_USAGE: u8 = 64;
/// EX_UNAVAILABLE: a runtime failure (port taken, duplicate instance).
const EX_UNAVAILABLE: u8 = 69;

#[derive(Debug, Parser)]
#[command(
    name = "outrigger",
    version,
    about = "A small, fast sidecar proxy for microservices"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "OUTRIGGER_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a sidecar.
    Run {
        /// Config file (TOML). Any key can be overridden with an environment
        /// variable OUTRIGGER_<SECTION>__<KEY>, e.g. OUTRIGGER_SERVICE__NAME=b.
        #[arg(long, short, env = "OUTRIGGER_CONFIG")]
        config: PathBuf,
        /// Overrides service.name.
        #[arg(long)]
        service: Option<String>,
        /// Overrides service.instance_id.
        #[arg(long)]
        instance_id: Option<String>,
        /// Overrides service.address (where the local service listens).
        #[arg(long)]
        service_address: Option<String>,
        /// Overrides service.advertise (what peers dial).
        #[arg(long)]
        advertise: Option<String>,
        /// Overrides service.zone.
        #[arg(long)]
        zone: Option<String>,
    },
    /// Validate a config file: exit 0 if valid, else list every invalid field.
    CheckConfig {
        /// Config file (TOML).
        file: PathBuf,
    },
    /// Exit 0 if a running sidecar is ready (its /ready answers 200), 1 if
    /// not; for container healthchecks.
    Ready {
        /// The sidecar's admin listener.
        #[arg(long, default_value = "127.0.0.1:15000", env = "OUTRIGGER_ADMIN")]
        admin: SocketAddr,
    },
    /// Write a development CA and one SPIFFE certificate per service, for
    /// mTLS: ca.pem, ca-key.pem, <service>.pem, <service>-key.pem (keys
    /// mode 0600). Existing files are kept (a rerun is a no-op; a new
    /// service is issued by the existing CA) unless --force.
    Certs {
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// SPIFFE trust domain: identities are spiffe://<DOMAIN>/service/<name>.
        #[arg(long)]
        trust_domain: String,
        /// Lifetime of the service certificates in days.
        #[arg(long, default_value_t = 365)]
        days: u64,
        /// Replace every file: a new CA and new certificates.
        #[arg(long)]
        force: bool,
        /// Services to issue certificates for.
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Print a running sidecar's routing table.
    Routes {
        /// The sidecar's admin listener.
        #[arg(long, default_value = "127.0.0.1:15000", env = "OUTRIGGER_ADMIN")]
        admin: SocketAddr,
        /// Print the raw JSON of /routes.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Certs {
            out,
            trust_domain,
            days,
            force,
            services,
        } => {
            let req = outrigger::tls::certs::CertsRequest {
                out,
                trust_domain,
                services,
                days,
                force,
            };
            match outrigger::tls::certs::generate(&req) {
                Ok(actions) => {
                    for a in actions {
                        match a {
                            outrigger::tls::certs::FileAction::Written(p) => {
                                println!("wrote {}", p.display())
                            }
                            outrigger::tls::certs::FileAction::Kept(p) => {
                                println!("kept  {} (exists)", p.display())
                            }
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig { file } => match load(&file, std::env::vars().collect()) {
            Ok(_) => {
                println!("{}: valid", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => config_failure(&e),
        },
        Command::Ready { admin } => {
            let Some(rt) = cli_runtime() else {
                return ExitCode::from(EX_UNAVAILABLE);
            };
            match rt.block_on(outrigger::routes_cli::get(admin, "/ready")) {
                Ok((200, _)) => ExitCode::SUCCESS,
                Ok((_, body)) => {
                    eprint!("{}", String::from_utf8_lossy(&body));
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Routes { admin, json } => {
            let Some(rt) = cli_runtime() else {
                return ExitCode::from(EX_UNAVAILABLE);
            };
            match rt.block_on(outrigger::routes_cli::fetch(admin)) {
                Ok(v) if json => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Ok(v) => {
                    print!("{}", outrigger::routes_cli::render(&v));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EX_UNAVAILABLE)
                }
            }
        }
        Command::Run {
            config,
            service,
            instance_id,
            service_address,
            advertise,
            zone,
        } => {
            // Flags win over the environment, which wins over the file.
            let mut env: Vec<(String, String)> = std::env::vars().collect();
            for (key, value) in [
                ("OUTRIGGER_SERVICE__NAME", service),
                ("OUTRIGGER_SERVICE__INSTANCE_ID", instance_id),
                ("OUTRIGGER_SERVICE__ADDRESS", service_address),
                ("OUTRIGGER_SERVICE__ADVERTISE", advertise),
                ("OUTRIGGER_SERVICE__ZONE", zone),
            ] {
                if let Some(v) = value {
                    env.push((key.into(), toml_string(&v)));
                }
            }
            let config = match load(&config, env) {
                Ok(c) => c,
                Err(e) => return config_failure(&e),
            };
            run(config)
        }
    }
}

/// Load and validate the config, then its TLS files (which `Config::load`
/// does not touch, so config parsing stays free of I/O beyond the file).
fn load(path: &std::path::Path, env: Vec<(String, String)>) -> Result<Config, ConfigError> {
    let config = Config::load(path, env)?;
    outrigger::tls::validate_files(&config)?;
    Ok(config)
}

fn run(config: Config) -> ExitCode {
    outrigger::memory::cap_arenas(config.runtime.worker_threads);
    let mut builder = if config.runtime.worker_threads <= 1 {
        // A sidecar shares its pod's CPU: one thread, no work-stealing.
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(config.runtime.worker_threads);
        b
    };
    // Take at most this many I/O events per scheduler tick (tokio's default
    // is 1024). With the default, a tick reads every client connection that
    // is ready, and only then does the HTTP/2 connection task run and write
    // all of their requests to the peer in one batch. Whole batches then
    // move hop to hop while the other stages wait: under `wrk -c64` the
    // two-hop chain kept the 2-core box 76-78 % busy, against HAProxy's
    // 86-91 %. With 8, requests leave in small groups and the stages
    // overlap: 83-87 % busy, and max RPS went from 0.90x to 1.05x
    // HAProxy's in full harness runs (README, Performance). At low load a
    // tick rarely sees more than 8 events, so nothing changes there.
    builder.max_io_events_per_tick(IO_EVENTS_PER_TICK);
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    match rt.block_on(outrigger::app::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "outrigger stopped");
            eprintln!("error: {e}");
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}

fn cli_runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("error: cannot start a runtime: {e}");
            None
        }
    }
}

fn config_failure(e: &ConfigError) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(EX_USAGE)
}

/// Quote a flag value as a TOML string so it is never re-typed (a zone
/// named `1` stays a string).
fn toml_string(v: &str) -> String {
    toml::Value::String(v.to_owned()).to_string()
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a terminal: container logs and files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
