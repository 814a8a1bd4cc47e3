//! Command-line interface: flags, their defaults, and conversion into validated config.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use http::Uri;

use crate::{
    proxy::Limits,
    serve::{ModelSource, ServeConfig},
    xdp::XdpMode,
};

/// Edge API gateway with usage plans (API keys, throttles, quotas) and an XDP fast path.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, about, args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (tracing env-filter syntax), e.g. `info` or `gateway=debug,xdp=debug`.
    #[arg(long, global = true, env = "GATEWAY_LOG", default_value = "info")]
    pub log: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway: data plane, admin API and (optionally) the XDP program.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Data-plane listen address; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Admin API (and /metrics) listen address; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:9180")]
    pub admin_listen: SocketAddr,
    /// Directory for persistent state: configuration and usage (`gateway.redb`).
    #[arg(long, default_value = "./.gateway")]
    pub state_dir: PathBuf,
    /// Configuration file: a JSON model of REST APIs, stages, usage plans and API keys. It
    /// replaces the stored configuration at start-up (usage counters are kept).
    #[arg(long, conflicts_with_all = ["upstream", "demo"])]
    pub config: Option<PathBuf>,
    /// Serve one open API (no key required) forwarding every path to this upstream base
    /// URL (http://HOST:PORT[/PATH]); replaces the stored configuration at start-up.
    #[arg(long, conflicts_with = "demo")]
    pub upstream: Option<String>,
    /// Start a demo upstream and a demo API, plan and key (replaces the stored configuration).
    /// Without --demo, --config or --upstream the stored configuration is served, and the admin
    /// API changes it.
    #[arg(long)]
    pub demo: bool,
    /// Access key id the admin API requires in SigV4 signatures. Without credentials the admin
    /// API accepts unsigned requests and may only listen on loopback.
    #[arg(
        long,
        env = "GATEWAY_ADMIN_ACCESS_KEY_ID",
        requires = "admin_secret_access_key"
    )]
    pub admin_access_key_id: Option<String>,
    /// Secret access key of --admin-access-key-id.
    #[arg(
        long,
        env = "GATEWAY_ADMIN_SECRET_ACCESS_KEY",
        requires = "admin_access_key_id",
        hide_env_values = true
    )]
    pub admin_secret_access_key: Option<String>,
    /// Stage name of the --upstream API.
    #[arg(long, default_value = "prod", requires = "upstream")]
    pub stage: String,
    /// Leave out the IETF RateLimit / RateLimit-Policy headers and Retry-After, as AWS does.
    #[arg(long)]
    pub no_rate_limit_headers: bool,
    /// Forward the client's x-api-key header to the upstream.
    #[arg(long)]
    pub forward_api_key: bool,
    /// Attach the XDP program to this interface.
    #[arg(long)]
    pub xdp_iface: Option<String>,
    /// XDP attach mode: auto, native (driver) or skb (generic).
    #[arg(long, default_value = "auto", requires = "xdp_iface")]
    pub xdp_mode: XdpMode,
    /// Seconds in-flight requests may take to finish after SIGTERM / Ctrl-C.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout_secs: u64,
    /// Milliseconds to wait for an upstream response before answering 504 (AWS: 29000).
    #[arg(long, default_value_t = 29_000)]
    pub integration_timeout_ms: u64,
    /// Seconds a client may take to send a request head, and an idle keep-alive
    /// connection may wait for the next one.
    #[arg(long, default_value_t = 10)]
    pub header_read_timeout_secs: u64,
    /// Largest request head in bytes (request line + headers); larger gets 431.
    #[arg(long, default_value_t = 10_240)]
    pub max_header_bytes: usize,
    /// Largest request body in bytes (AWS: 10 MiB); larger gets 413.
    #[arg(long, default_value_t = 10_485_760)]
    pub max_body_bytes: u64,
    /// Most data-plane connections open at once.
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: usize,
}

/// A flag value that parsed but makes no sense.
#[derive(Debug, thiserror::Error)]
#[error("--{flag}: {reason}")]
pub struct FlagError {
    pub flag: &'static str,
    pub reason: String,
}

impl ServeArgs {
    /// Checks the flags together and builds the serve configuration.
    pub fn into_config(self) -> Result<ServeConfig, FlagError> {
        let model = match (self.config, self.upstream) {
            (Some(path), _) => ModelSource::File(path),
            (None, Some(raw)) => {
                if self.stage.is_empty() || self.stage.contains('/') {
                    return Err(FlagError {
                        flag: "stage",
                        reason: "must be a non-empty name without `/`".into(),
                    });
                }
                ModelSource::Upstream {
                    upstream: parse_upstream(&raw)?,
                    stage: self.stage,
                }
            }
            (None, None) if self.demo => ModelSource::Demo,
            (None, None) => ModelSource::Stored,
        };
        let admin_credentials = match (self.admin_access_key_id, self.admin_secret_access_key) {
            (Some(access_key_id), Some(secret_access_key)) => {
                if access_key_id.is_empty() || secret_access_key.is_empty() {
                    return Err(FlagError {
                        flag: "admin-access-key-id",
                        reason: "the access key id and the secret must not be empty".into(),
                    });
                }
                Some(crate::sigv4::Credentials {
                    access_key_id,
                    secret_access_key,
                })
            }
            _ => None,
        };
        if admin_credentials.is_none() && !self.admin_listen.ip().is_loopback() {
            return Err(FlagError {
                flag: "admin-listen",
                reason: format!(
                    "{} is not a loopback address: an admin API reachable from the network needs \
                     --admin-access-key-id and --admin-secret-access-key",
                    self.admin_listen
                ),
            });
        }
        if let Some(iface) = &self.xdp_iface {
            crate::xdp::validate_interface(iface).map_err(|e| FlagError {
                flag: "xdp-iface",
                reason: e.to_string(),
            })?;
        }
        if self.integration_timeout_ms == 0 || self.integration_timeout_ms > 29_000 {
            return Err(FlagError {
                flag: "integration-timeout-ms",
                reason: "must be between 1 and 29000 (AWS's maximum)".into(),
            });
        }
        if self.header_read_timeout_secs == 0 {
            return Err(FlagError {
                flag: "header-read-timeout-secs",
                reason: "must be at least 1".into(),
            });
        }
        if !(8192..=1 << 20).contains(&self.max_header_bytes) {
            return Err(FlagError {
                flag: "max-header-bytes",
                reason: "must be between 8192 and 1048576".into(),
            });
        }
        if self.max_connections == 0 {
            return Err(FlagError {
                flag: "max-connections",
                reason: "must be at least 1".into(),
            });
        }
        Ok(ServeConfig {
            listen: self.listen,
            admin_listen: self.admin_listen,
            admin_credentials,
            state_dir: self.state_dir,
            model,
            xdp_iface: self.xdp_iface,
            xdp_mode: self.xdp_mode,
            drain_timeout: Duration::from_secs(self.drain_timeout_secs),
            integration_timeout: Duration::from_millis(self.integration_timeout_ms),
            limits: Limits {
                header_read_timeout: Duration::from_secs(self.header_read_timeout_secs),
                max_header_bytes: self.max_header_bytes,
                max_body_bytes: self.max_body_bytes,
                max_connections: self.max_connections,
            },
            rate_limit_headers: !self.no_rate_limit_headers,
            forward_api_key: self.forward_api_key,
        })
    }
}

fn parse_upstream(raw: &str) -> Result<Uri, FlagError> {
    let bad = |reason: &str| FlagError {
        flag: "upstream",
        reason: format!("`{raw}`: {reason}"),
    };
    let uri: Uri = raw.parse().map_err(|e| bad(&format!("{e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => return Err(bad(&format!("scheme `{other}` is not supported, use http"))),
        None => return Err(bad("needs a scheme, e.g. http://127.0.0.1:9000")),
    }
    if uri.authority().is_none() {
        return Err(bad("needs a host"));
    }
    if uri.query().is_some() {
        return Err(bad("must not have a query"));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_args(extra: &[&str]) -> Result<ServeConfig, String> {
        let mut argv = vec!["gateway", "serve"];
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let Command::Serve(args) = cli.command;
        args.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_match_the_documented_addresses() {
        let config = serve_args(&[]).unwrap();
        assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.admin_listen, "127.0.0.1:9180".parse().unwrap());
        assert_eq!(config.state_dir, PathBuf::from("./.gateway"));
        assert!(matches!(config.model, ModelSource::Stored));
        assert!(config.admin_credentials.is_none());
        assert!(matches!(
            serve_args(&["--demo"]).unwrap().model,
            ModelSource::Demo
        ));
        // A flag given twice: the last one wins (scripts append overrides).
        let config = serve_args(&["--state-dir", "/a", "--state-dir", "/b"]).unwrap();
        assert_eq!(config.state_dir, PathBuf::from("/b"));
        assert_eq!(config.integration_timeout, Duration::from_secs(29));
    }

    #[test]
    fn bad_flags_name_the_flag() {
        let err = serve_args(&["--upstream", "ftp://x"]).unwrap_err();
        assert!(err.starts_with("--upstream:"), "{err}");
        let err = serve_args(&["--upstream", "127.0.0.1:9"]).unwrap_err();
        assert!(err.starts_with("--upstream:"), "{err}");
        let err = serve_args(&["--xdp-iface", "a/b"]).unwrap_err();
        assert!(err.starts_with("--xdp-iface:"), "{err}");
        let err = serve_args(&["--integration-timeout-ms", "30000"]).unwrap_err();
        assert!(err.starts_with("--integration-timeout-ms:"), "{err}");
        let err = serve_args(&["--admin-listen", "0.0.0.0:9180"]).unwrap_err();
        assert!(err.starts_with("--admin-listen:"), "{err}");
        let ok = serve_args(&[
            "--admin-listen",
            "0.0.0.0:9180",
            "--admin-access-key-id",
            "AKID",
            "--admin-secret-access-key",
            "secret",
        ]);
        assert!(ok.is_ok(), "{ok:?}");
        let err = serve_args(&["--xdp-iface", "eth0", "--xdp-mode", "fast"]).unwrap_err();
        assert!(err.contains("unknown XDP mode"), "{err}");
    }
}
