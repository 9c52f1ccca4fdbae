//! An open-loop load generator for the router benchmark (`bench/router/run.sh`): sends
//! requests at a fixed rate over keep-alive connections and measures each latency from the
//! moment the request was *due*, not when it was sent, so a stalled server cannot hide
//! its queueing (the coordinated-omission correction of wrk2 / `oha --latency-correction`).
//! Loopback targets only.
//!
//! `cargo run --release -p cellplane-router --example fixed_rate -- URL RATE SECONDS CONNECTIONS [TENANTS]`
//! With TENANTS > 0 each request carries `Host: t{n}.localhost` for a random n < TENANTS.

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: fixed_rate URL RATE SECONDS CONNECTIONS [TENANTS]");
        std::process::exit(2);
    }
    let url: http::Uri = args[1].parse().expect("URL");
    let rate: f64 = args[2].parse().expect("RATE");
    let secs: f64 = args[3].parse().expect("SECONDS");
    let conns: usize = args[4].parse().expect("CONNECTIONS");
    let tenants: u64 = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(0);
    let host = url.host().expect("host").to_string();
    assert!(
        host == "127.0.0.1" || host == "localhost" || host == "::1",
        "loopback targets only"
    );
    let addr = format!("{host}:{}", url.port_u16().unwrap_or(80));
    let total = (rate * secs) as u64;
    let start = Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::new();
    for k in 0..conns {
        let (addr, url) = (addr.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut sender = None;
            let mut i = k as u64;
            let mut seed = 0x9e3779b97f4a7c15u64 ^ (k as u64);
            while i < total {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                if sender.is_none() {
                    match tokio::net::TcpStream::connect(&addr).await {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            let io = hyper_util::rt::TokioIo::new(s);
                            match hyper::client::conn::http1::handshake(io).await {
                                Ok((snd, conn)) => {
                                    tokio::spawn(conn);
                                    sender = Some(snd);
                                }
                                Err(_) => errors += 1,
                            }
                        }
                        Err(_) => errors += 1,
                    }
                }
                if let Some(snd) = sender.as_mut() {
                    let host = if tenants > 0 {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        format!("t{}.localhost", seed % tenants)
                    } else {
                        "localhost".to_string()
                    };
                    let req =
                        http::Request::get(url.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
                            .header("host", host)
                            .body(Empty::<Bytes>::new())
                            .expect("request");
                    let ok = match snd.send_request(req).await {
                        Ok(resp) => {
                            let good = resp.status().is_success();
                            let _ = resp.into_body().collect().await;
                            good
                        }
                        Err(_) => {
                            sender = None;
                            false
                        }
                    };
                    if ok {
                        lat.push(due.elapsed().as_micros() as u32);
                    } else {
                        errors += 1;
                    }
                }
                i += conns as u64;
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("task");
        all.extend(l);
        errors += e;
    }
    let took = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let p = |q: f64| -> f64 {
        if all.is_empty() {
            return f64::NAN;
        }
        all[((all.len() as f64 * q) as usize).min(all.len() - 1)] as f64 / 1000.0
    };
    println!(
        "{{\"rate\":{rate},\"sent\":{},\"ok\":{},\"errors\":{errors},\"achieved_rps\":{:.0},\"p50_ms\":{:.3},\"p90_ms\":{:.3},\"p99_ms\":{:.3},\"p999_ms\":{:.3},\"max_ms\":{:.3}}}",
        all.len() as u64 + errors,
        all.len(),
        all.len() as f64 / took,
        p(0.5),
        p(0.9),
        p(0.99),
        p(0.999),
        p(1.0)
    );
}
