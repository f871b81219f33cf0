//! Criterion benches: the frame pump (in memory), selection over a large snapshot, config parsing.
//! Run: cargo bench --bench router

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fastwebsockets::{Frame, OpCode, Payload, Role};
use wsrouter::balance::Balancer;
use wsrouter::close::RequestId;
use wsrouter::config::Config;
use wsrouter::config::Policy;
use wsrouter::frames::FrameWriter;
use wsrouter::metrics::DirectionStats;
use wsrouter::registry::{Observation, Registry};
use wsrouter::relay::{self, Direction};

const FRAMES: usize = 1000;

/// Push FRAMES client frames through one pump (client -> replica direction) over in-memory pipes.
async fn pump_frames(size: usize) {
    let (mut client_side, router_in) = tokio::io::duplex(1 << 20);
    let (router_out, upstream_side) = tokio::io::duplex(1 << 20);
    let (mut source, _in_write) = tokio::io::split(router_in);
    let (_out_read, out_write) = tokio::io::split(router_out);
    let mut sink = FrameWriter::new(out_write, Role::Client);

    // The client: FRAMES masked binary frames, then a close.
    let payload = vec![0x5a; size];
    let writer = tokio::spawn(async move {
        // The client writes with fastwebsockets: the bench measures the pump, not our writer.
        let (_, mut ws) = fastwebsockets::after_handshake_split(
            tokio::io::empty(),
            &mut client_side,
            Role::Client,
        );
        ws.set_writev_threshold(16 * 1024);
        for _ in 0..FRAMES {
            ws.write_frame(Frame::binary(Payload::Borrowed(&payload)))
                .await
                .unwrap();
        }
        ws.write_frame(Frame::close(1000, b"")).await.unwrap();
        ws.flush().await.unwrap();
        drop(ws);
        client_side
    });
    // The replica: count frames until the close.
    let reader = tokio::spawn(async move {
        let (upstream_read, _w) = tokio::io::split(upstream_side);
        // The replica reads with fastwebsockets, as the client writes.
        let (mut ws, _) =
            fastwebsockets::after_handshake_split(upstream_read, tokio::io::sink(), Role::Server);
        let mut send = |_: Frame<'_>| std::future::ready(Ok::<(), std::io::Error>(()));
        let mut n = 0;
        loop {
            let frame = ws.read_frame(&mut send).await.unwrap();
            if frame.opcode == OpCode::Close {
                break;
            }
            n += 1;
        }
        assert_eq!(n, FRAMES);
    });
    let inbox = relay::Inbox::default();
    let stats = DirectionStats::default();
    let heard = std::sync::atomic::AtomicU8::new(0);
    let link = relay::Link {
        orders: &inbox,
        stats: &stats,
        replica_stats: &stats,
        heard: &heard,
        request_id: RequestId(1),
    };
    let limits = relay::SessionLimits {
        close_timeout: Duration::from_secs(1),
        max_frame_bytes: 16 << 20,
        compression: false,
        splice: false,
    };
    let state = relay::PumpState::new(Direction::ToUpstream, link, &limits);
    let outcome = relay::pump(&mut source, &mut sink, state).await;
    assert!(
        matches!(outcome.end, relay::PumpEnd::SourceClosed { .. }),
        "{:?}",
        outcome.end
    );
    reader.await.unwrap();
    drop(writer.await.unwrap());
}

fn bench_pump(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("pump");
    for size in [64usize, 65536] {
        group.throughput(Throughput::Elements(FRAMES as u64));
        group.bench_with_input(BenchmarkId::new("frames", size), &size, |b, &size| {
            b.iter(|| runtime.block_on(pump_frames(size)))
        });
    }
    group.finish();
}

fn replicas_config(n: usize) -> String {
    let mut text = String::new();
    for i in 0..n {
        text += &format!(
            "[[replicas]]\nurl = \"http://10.0.{}.{}:8000\"\nprimary = {}\n",
            i / 250,
            i % 250 + 1,
            i == n - 1
        );
    }
    text
}

fn bench_selection(c: &mut Criterion) {
    let registry = Registry::new(&Config::parse(&replicas_config(1000)).unwrap());
    // Every other replica healthy; the primary (last) healthy too.
    let ok = Observation::Success {
        latency: Duration::from_millis(1),
        report: None,
    };
    let replicas = registry.replicas();
    registry.observe_all(
        (0..1000)
            .filter(|i| i % 2 == 1)
            .map(|i| (replicas[i].clone(), ok.clone())),
    );
    for (name, policy) in [
        ("failover", Policy::Failover),
        ("least_sessions", Policy::LeastSessions),
        ("round_robin", Policy::RoundRobin),
    ] {
        let balancer = Balancer::new(policy, None);
        c.bench_function(&format!("candidates/{name}/1000 replicas"), |b| {
            b.iter(|| {
                balancer
                    .candidates(&registry.snapshot(), None)
                    .map(|c| c.len())
            })
        });
    }
}

fn bench_config(c: &mut Criterion) {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/router.toml"))
            .unwrap();
    c.bench_function("config/shipped", |b| {
        b.iter(|| Config::parse(&shipped).unwrap())
    });
    let large = replicas_config(100);
    c.bench_function("config/100 replicas", |b| {
        b.iter(|| Config::parse(&large).unwrap())
    });
}

criterion_group!(benches, bench_pump, bench_selection, bench_config);
criterion_main!(benches);
