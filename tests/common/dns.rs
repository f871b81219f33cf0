//! A DNS server for the tests, on 127.0.0.1 (UDP), answering from records the test changes
//! while it runs. Built on hickory-proto's message types.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};

#[derive(Clone, Debug)]
enum Answer {
    Ip(IpAddr),
    Srv { port: u16, target: String },
}

#[derive(Default)]
struct Zone {
    /// Lower-case fully qualified name -> answers and their TTL.
    records: HashMap<String, (Vec<Answer>, u32)>,
}

pub struct TestDns {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    servfail: Arc<AtomicBool>,
    queries: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

fn fqdn(name: &str) -> String {
    let name = name.to_ascii_lowercase();
    if name.ends_with('.') {
        name
    } else {
        format!("{name}.")
    }
}

impl TestDns {
    pub async fn start() -> TestDns {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let zone = Arc::new(Mutex::new(Zone::default()));
        let servfail = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let (zone, servfail, queries) = (zone.clone(), servfail.clone(), queries.clone());
            async move {
                let mut buffer = vec![0u8; 4096];
                loop {
                    let Ok((len, from)) = socket.recv_from(&mut buffer).await else {
                        return;
                    };
                    let Ok(request) = Message::from_vec(&buffer[..len]) else {
                        continue;
                    };
                    queries.fetch_add(1, Ordering::SeqCst);
                    let answer = answer(&request, &zone, servfail.load(Ordering::SeqCst));
                    let _ = socket.send_to(&answer.to_vec().unwrap(), from).await;
                }
            }
        });
        TestDns {
            addr,
            zone,
            servfail,
            queries,
            task,
        }
    }

    /// `name` resolves to `ips` (A and AAAA), with `ttl`; no addresses: the name exists and
    /// has none (an empty answer).
    pub fn set_addresses(&self, name: &str, ips: &[IpAddr], ttl: u32) {
        let answers = ips.iter().map(|ip| Answer::Ip(*ip)).collect();
        self.zone
            .lock()
            .unwrap()
            .records
            .insert(fqdn(name), (answers, ttl));
    }

    /// `name` has SRV records for `targets` (port, target name).
    pub fn set_srv(&self, name: &str, targets: &[(u16, &str)], ttl: u32) {
        let answers = targets
            .iter()
            .map(|(port, target)| Answer::Srv {
                port: *port,
                target: fqdn(target),
            })
            .collect();
        self.zone
            .lock()
            .unwrap()
            .records
            .insert(fqdn(name), (answers, ttl));
    }

    /// `name` no longer exists (NXDOMAIN).
    pub fn remove(&self, name: &str) {
        self.zone.lock().unwrap().records.remove(&fqdn(name));
    }

    /// Answer every query with SERVFAIL while `on`.
    pub fn fail(&self, on: bool) {
        self.servfail.store(on, Ordering::SeqCst);
    }

    /// Queries answered so far.
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::SeqCst)
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(request: &Message, zone: &Mutex<Zone>, servfail: bool) -> Message {
    let id = request.metadata.id;
    let op_code = request.metadata.op_code;
    if servfail {
        let mut response = Message::error_msg(id, op_code, ResponseCode::ServFail);
        response.add_queries(request.queries.iter().cloned());
        return response;
    }
    let mut response = Message::response(id, op_code);
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    let zone = zone.lock().unwrap();
    for query in &request.queries {
        response.add_query(query.clone());
        let name = query.name().clone();
        let Some((answers, ttl)) = zone.records.get(&fqdn(&name.to_ascii())) else {
            response.metadata.response_code = ResponseCode::NXDomain;
            continue;
        };
        for answer in answers {
            let rdata = match (answer, query.query_type()) {
                (Answer::Ip(IpAddr::V4(ip)), RecordType::A) => RData::A(A(*ip)),
                (Answer::Ip(IpAddr::V6(ip)), RecordType::AAAA) => RData::AAAA(AAAA(*ip)),
                (Answer::Srv { port, target }, RecordType::SRV) => {
                    RData::SRV(SRV::new(0, 1, *port, Name::from_ascii(target).unwrap()))
                }
                _ => continue,
            };
            response.add_answer(Record::from_rdata(name.clone(), *ttl, rdata));
        }
    }
    response
}
