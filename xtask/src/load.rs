//! The benchmark's HTTP/1.1 load generator and the upstream every contender proxies to.
//!
//! Each request carries an `x-api-key` picked at random from a list. Two modes:
//!
//! - **closed loop**: every keep-alive connection sends its next request as soon as the
//!   previous answer arrived; this measures the most requests per second.
//! - **open loop**: requests are scheduled at fixed intervals whatever the answers do, and a
//!   request's latency runs from its *scheduled* send time, so time spent waiting for a free
//!   connection behind a slow answer counts (no coordinated omission).
//!
//! Latencies go into an HDR histogram in microseconds. Everything is bounded in time: a run
//! stops after its duration plus a grace period, whatever is still in flight.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response, body::Incoming, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::{
    net::{TcpSocket, TcpStream},
    sync::Mutex,
};

/// How requests are paced.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Each connection sends back to back.
    Closed,
    /// This many requests per second in total, on a fixed schedule.
    Open { rate: f64 },
}

/// One load run.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Request path, e.g. `/prod/bench`.
    pub path: String,
    /// Keys to pick from, uniformly at random per request; empty sends no key.
    pub keys: Arc<Vec<String>>,
    /// Keep-alive connections.
    pub connections: usize,
    /// How long requests are started.
    pub duration: Duration,
    /// Pacing.
    pub mode: Mode,
    /// Worker threads of the generator's runtime.
    pub threads: usize,
    /// Source address the connections are bound to (any when `None`).
    pub source: Option<IpAddr>,
}

/// What a run measured.
pub struct Report {
    /// Answers by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no answer (connection errors, cut off at the end).
    pub errors: u64,
    /// Requests scheduled by an open-loop run (0 for closed loop).
    pub scheduled: u64,
    /// From the first request to the end of the sending window, seconds.
    pub seconds: f64,
    /// Latency of every answered request, microseconds.
    pub latency_us: Histogram<u64>,
}

impl Report {
    /// Answered requests per second.
    pub fn rps(&self) -> f64 {
        self.answered() as f64 / self.seconds
    }

    /// Requests that got an answer.
    pub fn answered(&self) -> u64 {
        self.statuses.values().sum()
    }

    /// Answers with this status.
    pub fn status(&self, code: u16) -> u64 {
        self.statuses.get(&code).copied().unwrap_or(0)
    }

    /// Latency at quantile `q` (0..=1), milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }
}

/// What one connection task saw.
struct Tally {
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    latency_us: Histogram<u64>,
}

impl Tally {
    fn new() -> Self {
        Tally {
            statuses: BTreeMap::new(),
            errors: 0,
            latency_us: histogram(),
        }
    }
}

/// 1 µs to 60 s with three significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("the bounds are valid")
}

/// Time answers still in flight get after the sending window closes.
const GRACE: Duration = Duration::from_secs(3);

/// Runs `spec` on a runtime of its own and returns what it measured.
pub fn run(spec: &Spec) -> Result<Report> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(spec.threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the load generator's runtime")?;
    runtime.block_on(drive(spec.clone()))
}

async fn drive(spec: Spec) -> Result<Report> {
    let spec = Arc::new(spec);
    // Connect everything first so connection set-up is not measured.
    let mut senders = Vec::with_capacity(spec.connections);
    for _ in 0..spec.connections {
        senders.push(connect(spec.addr, spec.source).await?);
    }
    let start = Instant::now();
    let stop = start + spec.duration;
    let hard_stop = stop + GRACE;
    let (queue, scheduled) = match spec.mode {
        Mode::Closed => (None, None),
        Mode::Open { rate } => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
            let total = (rate * spec.duration.as_secs_f64()).round() as u64;
            let ticker = tokio::spawn(async move {
                let interval = Duration::from_secs_f64(1.0 / rate);
                for i in 0..total {
                    let at = start + interval.mul_f64(i as f64);
                    tokio::time::sleep_until(at.into()).await;
                    if tx.send(at).is_err() {
                        break;
                    }
                }
                total
            });
            (Some(Arc::new(Mutex::new(rx))), Some(ticker))
        }
    };
    let mut tasks = Vec::with_capacity(senders.len());
    for sender in senders {
        let spec = spec.clone();
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            connection(spec, sender, queue, stop, hard_stop).await
        }));
    }
    let mut report = Report {
        statuses: BTreeMap::new(),
        errors: 0,
        scheduled: 0,
        seconds: spec.duration.as_secs_f64(),
        latency_us: histogram(),
    };
    for task in tasks {
        let tally = task.await.context("a load connection task panicked")?;
        for (code, n) in tally.statuses {
            *report.statuses.entry(code).or_default() += n;
        }
        report.errors += tally.errors;
        report
            .latency_us
            .add(&tally.latency_us)
            .expect("histograms share their bounds");
    }
    if let Some(ticker) = scheduled {
        report.scheduled = ticker.await.context("the open-loop ticker panicked")?;
        // Scheduled requests no connection picked up in time got no answer.
        let answered = report.answered() + report.errors;
        report.errors += report.scheduled.saturating_sub(answered);
    }
    Ok(report)
}

async fn connect(addr: SocketAddr, source: Option<IpAddr>) -> Result<SendRequest<Empty<Bytes>>> {
    let stream = match source {
        None => TcpStream::connect(addr).await,
        Some(source) => {
            let socket = if source.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket
                .bind(SocketAddr::new(source, 0))
                .with_context(|| format!("cannot bind {source}"))?;
            socket.connect(addr).await
        }
    }
    .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP/1.1 handshake failed")?;
    tokio::spawn(async move {
        // The connection ends when the run drops its sender or the peer closes it.
        let _ = conn.await;
    });
    Ok(sender)
}

async fn connection(
    spec: Arc<Spec>,
    mut sender: SendRequest<Empty<Bytes>>,
    queue: Option<Arc<Mutex<tokio::sync::mpsc::UnboundedReceiver<Instant>>>>,
    stop: Instant,
    hard_stop: Instant,
) -> Tally {
    let mut tally = Tally::new();
    let mut rng = StdRng::from_rng(&mut rand::rng());
    loop {
        // The time the request's latency counts from.
        let from = match &queue {
            None => {
                let now = Instant::now();
                if now >= stop {
                    break;
                }
                now
            }
            Some(queue) => {
                let next = tokio::time::timeout_at(hard_stop.into(), async {
                    queue.lock().await.recv().await
                })
                .await;
                match next {
                    Ok(Some(at)) => at,
                    _ => break,
                }
            }
        };
        let mut request = Request::get(spec.path.as_str()).header(http::header::HOST, "bench");
        if !spec.keys.is_empty() {
            let key = &spec.keys[rng.random_range(0..spec.keys.len())];
            request = request.header("x-api-key", key.as_str());
        }
        let request = request
            .body(Empty::new())
            .expect("the request parts are valid");
        let answer = tokio::time::timeout_at(hard_stop.into(), async {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status().as_u16();
            response.into_body().collect().await?;
            Ok::<u16, hyper::Error>(status)
        })
        .await;
        match answer {
            Ok(Ok(status)) => {
                let us = from.elapsed().as_micros().clamp(1, 60_000_000) as u64;
                tally.latency_us.saturating_record(us);
                *tally.statuses.entry(status).or_default() += 1;
            }
            Ok(Err(_)) => {
                tally.errors += 1;
                if Instant::now() >= hard_stop {
                    break;
                }
                // A closed connection (e.g. the peer's keep-alive limit): open another.
                match tokio::time::timeout_at(hard_stop.into(), connect(spec.addr, spec.source))
                    .await
                {
                    Ok(Ok(fresh)) => sender = fresh,
                    _ => break,
                }
            }
            Err(_) => {
                tally.errors += 1;
                break;
            }
        }
    }
    tally
}

/// Serves `200 {"ok":true}` to every request on `listen` with `threads` worker threads; prints
/// `listening ADDR` once bound and runs until killed.
pub fn upstream(listen: SocketAddr, threads: usize) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the upstream's runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        println!("listening {}", listener.local_addr()?);
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header(http::header::CONTENT_TYPE, "application/json")
                            .body(Full::new(Bytes::from_static(b"{\"ok\":true}")))
                            .expect("the response parts are valid"),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
