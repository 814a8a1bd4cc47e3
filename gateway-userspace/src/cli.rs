//! Command-line interface: flags, their defaults, and conversion into validated config.
//!
//! `serve` runs the gateway; `api`, `plan`, `key` and `usage` drive a running gateway's admin
//! API (see [`crate::client`]). Every flag value is checked here, by the flag's own parser, so
//! a bad value is refused with the flag's name before any request is sent.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use http::Uri;
use rustls::pki_types::{CertificateDer, pem::PemObject};

use crate::{
    client::{ClientConfig, Endpoint},
    proxy::Limits,
    serve::{ModelSource, ServeConfig},
    xdp::XdpMode,
};

/// Edge API gateway with usage plans (API keys, throttles, quotas) and an XDP fast path.
#[derive(Debug, Parser)]
#[command(
    name = "gateway",
    version,
    about,
    args_override_self = true,
    after_help = WORKFLOW
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = LogFormat::Text,
        help_heading = "Logging"
    )]
    pub log_format: LogFormat,
    /// Log filter (tracing env-filter syntax), e.g. `info` or `gateway=debug,xdp=debug`.
    #[arg(
        long,
        global = true,
        env = "GATEWAY_LOG",
        default_value = "info",
        help_heading = "Logging"
    )]
    pub log: String,
}

/// The usage-plan workflow with this CLI, shown by `gateway --help`.
const WORKFLOW: &str = "\
Sell API access in tiers (with a gateway running: gateway serve):
  1. gateway api create --name shop --upstream http://127.0.0.1:9000
       a REST API whose methods require an API key, deployed to stage prod
  2. gateway plan create --name Silver --rate 50 --burst 100 --quota 5000 --period MONTH --stage API_ID:prod
       the tier: 50 requests/s, bursts of 100, 5000 requests a month, on that stage
  3. gateway key create --name acme
       a key for a customer (prints its id and value)
  4. gateway plan add-key PLAN_ID KEY_ID
  5. the customer sends the header x-api-key: VALUE with every request
  6. gateway usage PLAN_ID
       requests per key today and what is left of the quota";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway: data plane, admin API and (optionally) the XDP program.
    Serve(ServeArgs),
    /// REST APIs: the routes clients call and the upstream they forward to.
    Api(ApiArgs),
    /// Usage plans: the throttle and quota a tier grants, on which API stages, to which keys.
    Plan(PlanArgs),
    /// API keys: what clients send in the x-api-key header.
    Key(KeyArgs),
    /// Requests each key of a plan made per day and what is left of its quota.
    Usage(UsageArgs),
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
    /// URL (http(s)://HOST:PORT[/PATH]); replaces the stored configuration at start-up.
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
    /// PEM file of certificate authorities to trust for https integrations, besides the
    /// system's trust store (for upstreams with a private CA).
    #[arg(long)]
    pub upstream_ca_file: Option<PathBuf>,
    /// Attach the XDP program to this interface.
    #[arg(long)]
    pub xdp_iface: Option<String>,
    /// XDP attach mode: auto, native (driver) or skb (generic).
    #[arg(long, default_value = "auto", requires = "xdp_iface")]
    pub xdp_mode: XdpMode,
    /// Kernel bucket of a key = its plan throttle (rate and burst) times this; 1.0 makes the
    /// kernel enforce the plan exactly, higher leaves every exact answer to the proxy.
    #[arg(
        long,
        default_value_t = 2.0,
        requires = "xdp_iface",
        allow_negative_numbers = true
    )]
    pub xdp_headroom: f64,
    /// Refused requests of a key over its quota, within --xdp-shed-window-secs, after which the
    /// kernel drops that key's request starts until the quota resets (at most --xdp-shed-ttl-secs).
    #[arg(long, default_value_t = 100, requires = "xdp_iface")]
    pub xdp_shed_after: u32,
    /// Window of --xdp-shed-after, in seconds.
    #[arg(long, default_value_t = 10, requires = "xdp_iface")]
    pub xdp_shed_window_secs: u64,
    /// Longest a key is shed before the gateway looks again, in seconds.
    #[arg(long, default_value_t = 300, requires = "xdp_iface")]
    pub xdp_shed_ttl_secs: u64,
    /// Failed key checks (missing or unknown key) from one source address, within
    /// --xdp-scan-window-secs, after which the kernel blocks the source.
    #[arg(long, default_value_t = 100, requires = "xdp_iface")]
    pub xdp_scan_after: u32,
    /// Window of --xdp-scan-after, in seconds.
    #[arg(long, default_value_t = 60, requires = "xdp_iface")]
    pub xdp_scan_window_secs: u64,
    /// How long a blocked source stays blocked, in seconds.
    #[arg(long, default_value_t = 300, requires = "xdp_iface")]
    pub xdp_scan_ttl_secs: u64,
    /// New TCP connections (SYNs) per second one source address may open; 0 turns the
    /// SYN guard off.
    #[arg(
        long,
        default_value_t = 200.0,
        requires = "xdp_iface",
        allow_negative_numbers = true
    )]
    pub xdp_syn_rate: f64,
    /// Burst of SYNs per source above --xdp-syn-rate.
    #[arg(long, default_value_t = 400, requires = "xdp_iface")]
    pub xdp_syn_burst: u64,
    /// API keys the kernel can limit at once (key slots); keys beyond are limited by the
    /// proxy only.
    #[arg(long, default_value_t = gateway_common::sizes::KEY_SLOTS, requires = "xdp_iface")]
    pub xdp_key_slots: u32,
    /// Seconds in-flight requests may take to finish after SIGTERM / Ctrl-C.
    #[arg(long, default_value_t = 30, allow_negative_numbers = true)]
    pub drain_timeout_secs: u64,
    /// Milliseconds the --upstream API waits for its upstream before answering 504, 1 to
    /// 29000 (AWS's maximum). APIs made through the admin API have their own
    /// `timeoutInMillis` per integration.
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
    /// Shared store of a fleet of gateways: redis://[:PASSWORD@]HOST:PORT[/DB], rediss://…
    /// (TLS) or redis+cluster://HOST:PORT[,HOST:PORT…]. Configuration and usage then live
    /// there and every node applies a change made on any node. Default: the embedded store.
    #[arg(long, help_heading = "Fleet")]
    pub store: Option<String>,
    /// What keyed requests get while the --store is unreachable: local (enforce from the last
    /// configuration and local counters), open (quotas waived) or closed (503).
    #[arg(
        long,
        default_value = "local",
        requires = "store",
        help_heading = "Fleet"
    )]
    pub store_failure: crate::fleet::FailureMode,
    /// Longest wait for one call to the --store, in milliseconds (connect, send, answer).
    #[arg(
        long,
        default_value_t = 500,
        requires = "store",
        help_heading = "Fleet"
    )]
    pub store_timeout_ms: u64,
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
                for (flag, value) in [
                    ("admin-access-key-id", &access_key_id),
                    ("admin-secret-access-key", &secret_access_key),
                ] {
                    if value.is_empty() {
                        return Err(FlagError {
                            flag,
                            reason: "must not be empty".into(),
                        });
                    }
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
        let upstream_ca = match &self.upstream_ca_file {
            Some(path) => read_ca_file(path)?,
            None => Vec::new(),
        };
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
        if !(10..=60_000).contains(&self.store_timeout_ms) {
            return Err(FlagError {
                flag: "store-timeout-ms",
                reason: "must be between 10 and 60000".into(),
            });
        }
        if !(self.xdp_headroom.is_finite() && self.xdp_headroom >= 1.0) {
            return Err(FlagError {
                flag: "xdp-headroom",
                reason: "must be a number of at least 1.0 (the kernel must not refuse what the plan admits)".into(),
            });
        }
        if !(self.xdp_syn_rate.is_finite() && self.xdp_syn_rate >= 0.0) {
            return Err(FlagError {
                flag: "xdp-syn-rate",
                reason: "must be 0 (off) or a positive number of SYNs per second".into(),
            });
        }
        for (flag, value) in [
            ("xdp-syn-burst", self.xdp_syn_burst),
            ("xdp-key-slots", u64::from(self.xdp_key_slots)),
            ("xdp-shed-window-secs", self.xdp_shed_window_secs),
            ("xdp-scan-window-secs", self.xdp_scan_window_secs),
        ] {
            if value == 0 {
                return Err(FlagError {
                    flag,
                    reason: "must be at least 1".into(),
                });
            }
        }
        let xdp = crate::serve::XdpConfig {
            options: crate::xdp::XdpOptions {
                key_slots: self.xdp_key_slots,
                // Every open connection may be bound; leave room so live bindings are not evicted.
                flows: u32::try_from(self.max_connections.saturating_mul(2))
                    .unwrap_or(u32::MAX)
                    .max(gateway_common::sizes::FLOWS),
                ..crate::xdp::XdpOptions::default()
            },
            fast_path: crate::fastpath::FastPathConfig {
                headroom: self.xdp_headroom,
                shed_after: self.xdp_shed_after,
                shed_window: Duration::from_secs(self.xdp_shed_window_secs),
                shed_ttl: Duration::from_secs(self.xdp_shed_ttl_secs),
                scan_after: self.xdp_scan_after,
                scan_window: Duration::from_secs(self.xdp_scan_window_secs),
                scan_ttl: Duration::from_secs(self.xdp_scan_ttl_secs),
            },
            syn_guard: (self.xdp_syn_rate > 0.0)
                .then(|| crate::limit::params(self.xdp_syn_rate, self.xdp_syn_burst)),
        };
        let store = self.store.map(|url| crate::fleet::FleetOptions {
            timeout: Duration::from_millis(self.store_timeout_ms),
            failure: self.store_failure,
            ..crate::fleet::FleetOptions::new(url)
        });
        Ok(ServeConfig {
            listen: self.listen,
            admin_listen: self.admin_listen,
            admin_credentials,
            state_dir: self.state_dir,
            model,
            xdp_iface: self.xdp_iface,
            xdp_mode: self.xdp_mode,
            xdp,
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
            upstream_ca,
            store,
        })
    }
}

/// The certificates of a PEM file (`--upstream-ca-file`); at least one.
fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, FlagError> {
    let bad = |reason: String| FlagError {
        flag: "upstream-ca-file",
        reason: format!("{}: {reason}", path.display()),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(certs)
}

fn parse_upstream(raw: &str) -> Result<Uri, FlagError> {
    let bad = |reason: &str| FlagError {
        flag: "upstream",
        reason: format!("`{raw}`: {reason}"),
    };
    let uri: Uri = raw.parse().map_err(|e| bad(&format!("{e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => {
            return Err(bad(&format!(
                "scheme `{other}` is not supported, use http or https"
            )));
        }
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

// ---------------------------------------------------------------------------------------
// Admin API commands: `gateway api|plan|key|usage ...`

/// Where the admin API is and how to talk to it; accepted by every `api`, `plan`, `key` and
/// `usage` command, before or after the subcommand's name.
#[derive(Clone, Debug, Args)]
#[command(next_help_heading = "Admin API")]
pub struct ClientArgs {
    /// Base URL of the gateway's admin API (`gateway serve --admin-listen`). Connecting gives
    /// up after 5 s and a whole request after 30 s.
    #[arg(
        long,
        global = true,
        env = "GATEWAY_ADMIN_URL",
        default_value = "http://127.0.0.1:9180",
        value_name = "URL",
        value_parser = Endpoint::parse
    )]
    pub endpoint: Endpoint,
    /// Sign every request (AWS SigV4) with this access key id: the one the gateway was started
    /// with (`serve --admin-access-key-id`). Without credentials requests go unsigned.
    #[arg(
        long,
        global = true,
        env = "GATEWAY_ADMIN_ACCESS_KEY_ID",
        value_name = "ID",
        requires = "secret_access_key",
        value_parser = non_empty
    )]
    pub access_key_id: Option<String>,
    /// Secret access key of --access-key-id.
    #[arg(
        long,
        global = true,
        env = "GATEWAY_ADMIN_SECRET_ACCESS_KEY",
        value_name = "SECRET",
        requires = "access_key_id",
        hide_env_values = true,
        value_parser = non_empty
    )]
    pub secret_access_key: Option<String>,
    /// Region named in signatures (the gateway accepts any); used only with credentials.
    #[arg(
        long,
        global = true,
        default_value = "us-east-1",
        value_name = "REGION",
        value_parser = non_empty
    )]
    pub region: String,
    /// Print the admin API's JSON answer instead of text, for scripts.
    #[arg(long, global = true)]
    pub json: bool,
}

impl ClientArgs {
    /// The client configuration these flags describe.
    pub fn config(&self) -> ClientConfig {
        let credentials = match (&self.access_key_id, &self.secret_access_key) {
            (Some(id), Some(secret)) => Some(crate::sigv4::Credentials::new(id, secret)),
            _ => None,
        };
        ClientConfig {
            endpoint: self.endpoint.clone(),
            credentials,
            region: self.region.clone(),
        }
    }
}

/// `gateway api ...`
#[derive(Debug, Args)]
pub struct ApiArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub action: ApiAction,
}

#[derive(Debug, Subcommand)]
pub enum ApiAction {
    /// Create a REST API that forwards every path and method to an upstream, and deploy it.
    ///
    /// Creates the API, a catch-all `/{proxy+}` route and the root `/`, both for any HTTP
    /// method and, unless --no-key-required, only for clients with an API key of a usage plan
    /// that includes the stage; then deploys the stage. Prints the API id and the URLs
    /// clients call. With --json: `{"restApi": .., "deployment": .., "stage": .., "invokeUrl": ..}`.
    Create(ApiCreate),
    /// List the REST APIs and their stages.
    List,
    /// Delete a REST API (refused while a usage plan includes one of its stages).
    Delete {
        /// REST API id.
        #[arg(value_parser = non_empty)]
        id: String,
    },
    /// Deploy a REST API to a stage, creating the stage if it does not exist.
    Deploy(ApiDeploy),
}

#[derive(Debug, Args)]
pub struct ApiCreate {
    /// Name of the API (need not be unique).
    #[arg(long, value_parser = non_empty)]
    pub name: String,
    /// Where requests go: http(s)://HOST:PORT[/PATH]; `/x/y` on the gateway is forwarded to
    /// `{upstream}/x/y`.
    #[arg(long, value_name = "URL", value_parser = upstream_value)]
    pub upstream: Uri,
    /// Stage to deploy: the first path segment clients call (`/prod/...`).
    #[arg(long, default_value = "prod", value_parser = stage_name)]
    pub stage: String,
    /// Let any client call the API without a key: no usage plan throttle or quota applies.
    #[arg(long)]
    pub no_key_required: bool,
    /// Description of the API.
    #[arg(long)]
    pub description: Option<String>,
    #[command(flatten)]
    pub data: DataUrl,
}

/// `--data-url` of the commands that print invoke URLs.
#[derive(Debug, Args)]
pub struct DataUrl {
    /// Where clients reach the data plane (`gateway serve --listen`); only used to print the
    /// invoke URLs.
    #[arg(
        long,
        env = "GATEWAY_DATA_URL",
        default_value = "http://127.0.0.1:8080",
        value_name = "URL",
        value_parser = Endpoint::parse
    )]
    pub data_url: Endpoint,
}

#[derive(Debug, Args)]
pub struct ApiDeploy {
    /// REST API id.
    #[arg(value_parser = non_empty)]
    pub id: String,
    /// Stage to deploy to.
    #[arg(long, value_parser = stage_name)]
    pub stage: String,
    /// Description of the deployment.
    #[arg(long)]
    pub description: Option<String>,
    #[command(flatten)]
    pub data: DataUrl,
}

/// `gateway plan ...`
#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub action: PlanAction,
}

#[derive(Debug, Subcommand)]
pub enum PlanAction {
    /// Create a usage plan: a throttle (rate and burst), a quota, and the API stages it covers.
    #[command(
        after_help = "Example: a Silver tier of 50 requests/s with bursts of 100 and \
        5000 requests a month, on stage prod of REST API a1b2c3d4e5:\n  \
        gateway plan create --name Silver --rate 50 --burst 100 --quota 5000 --period MONTH --stage a1b2c3d4e5:prod"
    )]
    Create(PlanCreate),
    /// List the usage plans.
    List,
    /// Show a usage plan and its keys. With --json: the plan plus a `keys` member.
    Show {
        /// Usage plan id.
        #[arg(value_parser = non_empty)]
        id: String,
    },
    /// Change a usage plan's name, description, throttle or quota.
    Set(PlanSet),
    /// Let the plan's keys call an API stage.
    AddStage {
        /// Usage plan id.
        #[arg(value_parser = non_empty)]
        plan: String,
        /// API_ID:STAGE, e.g. a1b2c3d4e5:prod.
        #[arg(value_parser = api_stage)]
        stage: ApiStageRef,
    },
    /// Stop the plan's keys calling an API stage.
    RemoveStage {
        /// Usage plan id.
        #[arg(value_parser = non_empty)]
        plan: String,
        /// API_ID:STAGE, e.g. a1b2c3d4e5:prod.
        #[arg(value_parser = api_stage)]
        stage: ApiStageRef,
    },
    /// Put an API key in a usage plan: its requests then count against the plan's limits.
    AddKey {
        /// Usage plan id.
        #[arg(value_parser = non_empty)]
        plan: String,
        /// API key id (`gateway key list`).
        #[arg(value_parser = non_empty)]
        key: String,
    },
    /// Take an API key out of a usage plan.
    RemoveKey {
        /// Usage plan id.
        #[arg(value_parser = non_empty)]
        plan: String,
        /// API key id.
        #[arg(value_parser = non_empty)]
        key: String,
    },
    /// Delete a usage plan (refused while it includes API stages, unless --force).
    Delete {
        /// Usage plan id.
        #[arg(value_parser = non_empty)]
        id: String,
        /// Remove the plan's API stages first, then delete it.
        #[arg(long)]
        force: bool,
    },
}

/// Quota period: a UTC calendar day, week (from Monday) or month.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Period {
    #[value(name = "DAY")]
    Day,
    #[value(name = "WEEK")]
    Week,
    #[value(name = "MONTH")]
    Month,
}

impl Period {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "DAY",
            Period::Week => "WEEK",
            Period::Month => "MONTH",
        }
    }
}

/// An API stage named `API_ID:STAGE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiStageRef {
    /// REST API id.
    pub api_id: String,
    /// Stage name.
    pub stage: String,
}

impl std::fmt::Display for ApiStageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.api_id, self.stage)
    }
}

#[derive(Debug, Args)]
pub struct PlanCreate {
    /// Name of the plan, e.g. Silver.
    #[arg(long, value_parser = non_empty)]
    pub name: String,
    /// Description of the plan.
    #[arg(long)]
    pub description: Option<String>,
    /// Steady rate each key may send, in requests per second (fractions allowed).
    #[arg(long, value_name = "PER_SECOND", requires = "burst", allow_negative_numbers = true, value_parser = rate)]
    pub rate: Option<f64>,
    /// Most requests a key may send at once, above the rate, before getting 429.
    #[arg(long, value_name = "REQUESTS", requires = "rate", allow_negative_numbers = true, value_parser = count)]
    pub burst: Option<i64>,
    /// Requests each key may make per --period.
    #[arg(long, value_name = "REQUESTS", requires = "period", allow_negative_numbers = true, value_parser = count)]
    pub quota: Option<i64>,
    /// Period of --quota.
    #[arg(long, requires = "quota", ignore_case = true)]
    pub period: Option<Period>,
    /// Days the quota period starts late: 0 for DAY, 0-6 for WEEK, 0-27 for MONTH.
    #[arg(long, value_name = "DAYS", requires = "quota", allow_negative_numbers = true, value_parser = offset)]
    pub quota_offset: Option<i64>,
    /// An API stage the plan's keys may call, as API_ID:STAGE; repeat for more.
    #[arg(long = "stage", value_name = "API_ID:STAGE", value_parser = api_stage)]
    pub stages: Vec<ApiStageRef>,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("change").required(true).multiple(true))]
pub struct PlanSet {
    /// Usage plan id.
    #[arg(value_parser = non_empty)]
    pub id: String,
    /// New name.
    #[arg(long, group = "change", value_parser = non_empty)]
    pub name: Option<String>,
    /// New description.
    #[arg(long, group = "change")]
    pub description: Option<String>,
    /// New rate, in requests per second.
    #[arg(long, value_name = "PER_SECOND", group = "change", allow_negative_numbers = true, value_parser = rate)]
    pub rate: Option<f64>,
    /// New burst, in requests.
    #[arg(long, value_name = "REQUESTS", group = "change", allow_negative_numbers = true, value_parser = count)]
    pub burst: Option<i64>,
    /// New quota limit, in requests per period.
    #[arg(long, value_name = "REQUESTS", group = "change", allow_negative_numbers = true, value_parser = count)]
    pub quota: Option<i64>,
    /// New quota period.
    #[arg(long, group = "change", ignore_case = true)]
    pub period: Option<Period>,
    /// New quota offset, in days.
    #[arg(long, value_name = "DAYS", group = "change", allow_negative_numbers = true, value_parser = offset)]
    pub quota_offset: Option<i64>,
    /// Remove the throttle: keys are then limited only by the stage and account throttles.
    #[arg(long, group = "change", conflicts_with_all = ["rate", "burst"])]
    pub no_throttle: bool,
    /// Remove the quota.
    #[arg(long, group = "change", conflicts_with_all = ["quota", "period", "quota_offset"])]
    pub no_quota: bool,
}

/// `gateway key ...`
#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub action: KeyAction,
}

#[derive(Debug, Subcommand)]
pub enum KeyAction {
    /// Create an API key for a client (enabled unless --disabled). Prints its id and value.
    Create(KeyCreate),
    /// List the API keys, oldest first.
    List {
        /// Only keys whose name starts with this.
        #[arg(long, value_name = "PREFIX")]
        name_prefix: Option<String>,
        /// Only keys of this customer id.
        #[arg(long, value_name = "ID")]
        customer_id: Option<String>,
        /// Include the key values (secrets).
        #[arg(long)]
        show_values: bool,
    },
    /// Show an API key and the usage plans it belongs to.
    Show {
        /// API key id.
        #[arg(value_parser = non_empty)]
        id: String,
        /// Include the key value (a secret).
        #[arg(long)]
        show_value: bool,
    },
    /// Let an API key call again.
    Enable {
        /// API key id.
        #[arg(value_parser = non_empty)]
        id: String,
    },
    /// Refuse an API key's requests (403) until it is enabled again.
    Disable {
        /// API key id.
        #[arg(value_parser = non_empty)]
        id: String,
    },
    /// Delete an API key; it leaves every usage plan.
    Delete {
        /// API key id.
        #[arg(value_parser = non_empty)]
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct KeyCreate {
    /// Name of the key, e.g. the customer's name.
    #[arg(long, value_parser = non_empty)]
    pub name: String,
    /// The key's value (20 to 128 visible ASCII characters, no spaces); generated when left out.
    #[arg(long)]
    pub value: Option<String>,
    /// Your own id of the customer the key belongs to.
    #[arg(long, value_name = "ID")]
    pub customer_id: Option<String>,
    /// Description of the key.
    #[arg(long)]
    pub description: Option<String>,
    /// Create the key disabled: it is refused until `gateway key enable`.
    #[arg(long)]
    pub disabled: bool,
}

/// `gateway usage PLAN` or `gateway usage extend PLAN KEY --remaining N`.
#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Days are UTC calendar days. Without --from and --to, today's usage is shown. \
        (A plan whose id is `extend` is shown with `gateway usage -- extend`.)"
)]
pub struct UsageArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub action: Option<UsageAction>,
    /// Usage plan id.
    #[arg(required = true, value_parser = non_empty)]
    pub plan: Option<String>,
    /// Only this API key id.
    #[arg(long, value_name = "KEY_ID")]
    pub key: Option<String>,
    /// First day, YYYY-MM-DD (default: --to).
    #[arg(long, value_name = "YYYY-MM-DD", value_parser = date)]
    pub from: Option<time::Date>,
    /// Last day, YYYY-MM-DD (default: today, UTC).
    #[arg(long, value_name = "YYYY-MM-DD", value_parser = date)]
    pub to: Option<time::Date>,
}

#[derive(Debug, Subcommand)]
pub enum UsageAction {
    /// Set how many requests a key has left in the current quota period (a temporary
    /// extension or reduction; the next period starts from the plan's quota again).
    Extend(UsageExtend),
}

#[derive(Debug, Args)]
pub struct UsageExtend {
    /// Usage plan id.
    #[arg(value_parser = non_empty)]
    pub plan: String,
    /// API key id.
    #[arg(value_parser = non_empty)]
    pub key: String,
    /// Requests left for the rest of the current period.
    #[arg(long, value_name = "REQUESTS", allow_negative_numbers = true, value_parser = remaining)]
    pub remaining: u64,
}

/// What `gateway usage` shows.
#[derive(Debug)]
pub struct UsageShow {
    /// Usage plan id.
    pub plan: String,
    /// Only this key.
    pub key: Option<String>,
    /// First day.
    pub from: time::Date,
    /// Last day.
    pub to: time::Date,
}

impl UsageArgs {
    /// The days to show: --to defaults to `today`, --from to --to.
    pub fn show(&self, today: time::Date) -> Result<UsageShow, FlagError> {
        let to = self.to.unwrap_or(today);
        let from = self.from.unwrap_or(to);
        if from > to {
            return Err(FlagError {
                flag: "from",
                reason: format!("{from} is after --to {to}"),
            });
        }
        Ok(UsageShow {
            plan: self.plan.clone().unwrap_or_default(),
            key: self.key.clone(),
            from,
            to,
        })
    }
}

fn non_empty(raw: &str) -> Result<String, String> {
    if raw.is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(raw.to_string())
    }
}

fn upstream_value(raw: &str) -> Result<Uri, String> {
    parse_upstream(raw).map_err(|e| e.reason)
}

/// AWS's stage name rule: letters, digits, `-` and `_`, at most 128.
fn stage_name(raw: &str) -> Result<String, String> {
    let ok = !raw.is_empty()
        && raw.len() <= 128
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(raw.to_string())
    } else {
        Err("a stage name is 1 to 128 letters, digits, `-` or `_`".into())
    }
}

fn api_stage(raw: &str) -> Result<ApiStageRef, String> {
    let expected = || "expected API_ID:STAGE, e.g. a1b2c3d4e5:prod".to_string();
    let (api_id, stage) = raw.split_once(':').ok_or_else(expected)?;
    // Lenient on purpose: this names a stage that exists, whatever made it.
    let bad = |s: &str| s.is_empty() || s.contains([':', '/']);
    if bad(api_id) || bad(stage) {
        return Err(expected());
    }
    Ok(ApiStageRef {
        api_id: api_id.to_string(),
        stage: stage.to_string(),
    })
}

fn rate(raw: &str) -> Result<f64, String> {
    match raw.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        Ok(_) => Err("must be a number of requests per second, 0 or more".into()),
        Err(_) => Err("not a number".into()),
    }
}

/// A count the admin API stores as a 32-bit signed integer.
fn count(raw: &str) -> Result<i64, String> {
    match raw.trim().parse::<i64>() {
        Ok(n) if (0..=i64::from(i32::MAX)).contains(&n) => Ok(n),
        _ => Err(format!("must be a whole number from 0 to {}", i32::MAX)),
    }
}

fn offset(raw: &str) -> Result<i64, String> {
    match raw.trim().parse::<i64>() {
        Ok(n) if (0..=27).contains(&n) => Ok(n),
        _ => Err("must be a number of days from 0 to 27".into()),
    }
}

fn remaining(raw: &str) -> Result<u64, String> {
    raw.trim()
        .parse::<u64>()
        .ok()
        .filter(|n| *n <= u64::from(u32::MAX))
        .ok_or_else(|| format!("must be a whole number from 0 to {}", u32::MAX))
}

fn date(raw: &str) -> Result<time::Date, String> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(raw, &format).map_err(|_| "expected a date YYYY-MM-DD".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_args(extra: &[&str]) -> Result<ServeConfig, String> {
        let mut argv = vec!["gateway", "serve"];
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let Command::Serve(args) = cli.command else {
            panic!("parsed a serve command line");
        };
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
    fn each_bad_serve_flag_is_named_in_its_error() {
        for (argv, flag) in [
            (
                &[
                    "--admin-access-key-id",
                    "AK",
                    "--admin-secret-access-key",
                    "",
                ][..],
                "--admin-secret-access-key",
            ),
            (
                &[
                    "--admin-access-key-id",
                    "",
                    "--admin-secret-access-key",
                    "s",
                ][..],
                "--admin-access-key-id",
            ),
            (
                &["--xdp-iface", "lo", "--xdp-syn-burst", "0"][..],
                "--xdp-syn-burst",
            ),
            (
                &["--xdp-iface", "lo", "--xdp-syn-rate", "-1"][..],
                "--xdp-syn-rate",
            ),
            (
                &["--xdp-iface", "lo", "--xdp-key-slots", "0"][..],
                "--xdp-key-slots",
            ),
            (
                &["--xdp-iface", "lo", "--xdp-shed-window-secs", "0"][..],
                "--xdp-shed-window-secs",
            ),
            (
                &["--xdp-iface", "lo", "--xdp-scan-window-secs", "0"][..],
                "--xdp-scan-window-secs",
            ),
            (&["--drain-timeout-secs", "-1"][..], "--drain-timeout-secs"),
        ] {
            let error = serve_args(argv).err().unwrap_or_default();
            assert!(error.contains(flag), "{argv:?}: {error}");
        }
    }

    fn parse(argv: &[&str]) -> Result<Command, String> {
        let mut full = vec!["gateway"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full)
            .map(|cli| cli.command)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn admin_commands_parse_the_silver_plan_workflow() {
        let Ok(Command::Plan(args)) = parse(&[
            "plan",
            "create",
            "--name",
            "Silver",
            "--rate",
            "50",
            "--burst",
            "100",
            "--quota",
            "5000",
            "--period",
            "month",
            "--stage",
            "a1b2c3d4e5:prod",
            "--stage",
            "f6:dev",
            "--endpoint",
            "http://10.0.0.1:9180/",
            "--json",
        ]) else {
            panic!("a plan command");
        };
        let PlanAction::Create(create) = args.action else {
            panic!("plan create");
        };
        assert_eq!(create.rate, Some(50.0));
        assert_eq!(create.burst, Some(100));
        assert_eq!(create.quota, Some(5000));
        assert_eq!(create.period, Some(Period::Month));
        assert_eq!(
            create.stages,
            [
                ApiStageRef {
                    api_id: "a1b2c3d4e5".into(),
                    stage: "prod".into()
                },
                ApiStageRef {
                    api_id: "f6".into(),
                    stage: "dev".into()
                }
            ]
        );
        // Connection flags go before or after the subcommand's name.
        assert!(args.client.json);
        assert_eq!(args.client.endpoint.to_string(), "http://10.0.0.1:9180");
        assert!(args.client.config().credentials.is_none());
        let Ok(Command::Key(args)) = parse(&[
            "key",
            "--access-key-id",
            "AK",
            "--secret-access-key",
            "SK",
            "--region",
            "eu-west-1",
            "create",
            "--name",
            "acme",
        ]) else {
            panic!("a key command");
        };
        let config = args.client.config();
        assert_eq!(
            config.credentials.map(|c| c.access_key_id).as_deref(),
            Some("AK")
        );
        assert_eq!(config.region, "eu-west-1");
        let Ok(Command::Usage(args)) = parse(&["usage", "extend", "p1", "k1", "--remaining", "2"])
        else {
            panic!("a usage command");
        };
        assert!(matches!(
            args.action,
            Some(UsageAction::Extend(UsageExtend { remaining: 2, .. }))
        ));
    }

    #[test]
    fn usage_days_default_to_today() {
        let today = time::macros::date!(2026 - 03 - 15);
        let Ok(Command::Usage(args)) = parse(&["usage", "p1"]) else {
            panic!("a usage command");
        };
        let show = args.show(today).unwrap();
        assert_eq!(
            (show.plan.as_str(), show.from, show.to),
            ("p1", today, today)
        );
        let Ok(Command::Usage(args)) = parse(&["usage", "p1", "--from", "2026-03-01"]) else {
            panic!("a usage command");
        };
        let show = args.show(today).unwrap();
        assert_eq!(
            (show.from, show.to),
            (time::macros::date!(2026 - 03 - 01), today)
        );
        let Ok(Command::Usage(args)) = parse(&["usage", "p1", "--from", "2026-04-01"]) else {
            panic!("a usage command");
        };
        let err = args.show(today).unwrap_err().to_string();
        assert!(err.starts_with("--from:"), "{err}");
    }

    #[test]
    fn bad_admin_flag_values_name_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (
                &[
                    "plan", "create", "--name", "x", "--quota", "5", "--period", "YEAR",
                ],
                "--period",
            ),
            (
                &["plan", "create", "--name", "x", "--stage", "foo"],
                "--stage",
            ),
            (
                &["plan", "create", "--name", "x", "--stage", ":prod"],
                "--stage",
            ),
            (
                &[
                    "plan", "create", "--name", "x", "--rate", "-1", "--burst", "3",
                ],
                "--rate",
            ),
            (
                &[
                    "plan", "create", "--name", "x", "--rate", "1", "--burst", "2.5",
                ],
                "--burst",
            ),
            (&["plan", "create", "--name", "x", "--rate", "1"], "--burst"),
            (
                &["plan", "create", "--name", "x", "--quota", "10"],
                "--period",
            ),
            (&["plan", "create", "--name", "", "--quota", "10"], "--name"),
            (
                &["plan", "set", "p", "--quota-offset", "40"],
                "--quota-offset",
            ),
            (&["plan", "set", "p", "--quota", "99999999999"], "--quota"),
            (
                &["plan", "set", "p", "--rate", "1", "--no-throttle"],
                "--no-throttle",
            ),
            (&["usage", "p", "--from", "2026-02-30"], "--from"),
            (
                &["usage", "extend", "p", "k", "--remaining", "-1"],
                "--remaining",
            ),
            (
                &["usage", "extend", "p", "k", "--remaining", "4294967296"],
                "--remaining",
            ),
            (&["key", "show", ""], "<ID>"),
            (&["plan", "add-key", "p", ""], "<KEY>"),
            (&["usage", ""], "<PLAN>"),
            (
                &["api", "create", "--name", "x", "--upstream", "ftp://h"],
                "--upstream",
            ),
            (
                &[
                    "api",
                    "create",
                    "--name",
                    "x",
                    "--upstream",
                    "http://h",
                    "--stage",
                    "a/b",
                ],
                "--stage",
            ),
            (&["api", "deploy", "a1", "--stage", "pr od"], "--stage"),
            (&["key", "list", "--endpoint", "https://h"], "--endpoint"),
            (
                &["plan", "list", "--endpoint", "127.0.0.1:9180"],
                "--endpoint",
            ),
            (
                &["key", "list", "--access-key-id", "AK"],
                "--secret-access-key",
            ),
        ];
        for (argv, flag) in cases {
            let err = parse(argv).expect_err("refused");
            // The flag itself, not one it is a prefix of (`--stage` in `--stages`).
            let named = err.match_indices(flag).any(|(i, _)| {
                !err[i + flag.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '-')
            });
            assert!(named, "{argv:?}: {err}");
        }
        let err = parse(&["plan", "set", "p"]).expect_err("nothing to change");
        assert!(err.contains("--rate"), "{err}");
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
