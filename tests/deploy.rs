//! The deployment artefacts under config/ parse and agree with the config they carry: ports,
//! probe paths, the config path, and stop timings against the drain.

use std::time::Duration;

use wsrouter::Config;
use yaml_rust2::{Yaml, YamlLoader};

const MANIFESTS: &str = include_str!("../config/kubernetes/wsrouter.yaml");
const UNIT: &str = include_str!("../config/systemd/wsrouter.service");
const DOCKERFILE: &str = include_str!("../config/Dockerfile");

fn manifests() -> Vec<Yaml> {
    YamlLoader::load_from_str(MANIFESTS).expect("the manifests are YAML")
}

fn find<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The container port named `name`.
fn named_port(container: &Yaml, name: &str) -> i64 {
    container["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p["containerPort"].as_i64())
        .unwrap_or_else(|| panic!("no container port {name}"))
}

#[test]
fn the_kubernetes_manifests_agree_with_the_config_they_mount() {
    let docs = manifests();
    let text = find(&docs, "ConfigMap", "wsrouter-config")["data"]["router.toml"]
        .as_str()
        .unwrap();
    let config = Config::parse(text).expect("the mounted config is valid");

    let deployment = find(&docs, "Deployment", "wsrouter");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(
        named_port(container, "websocket"),
        i64::from(config.listen_addr().port())
    );
    let admin = config.admin.as_ref().expect("an admin listener");
    assert_eq!(named_port(container, "admin"), i64::from(admin.addr.port()));
    assert!(
        !admin.addr.ip().is_loopback(),
        "the kubelet must reach the probes"
    );
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/health")] {
        assert_eq!(container[probe]["httpGet"]["path"].as_str(), Some(path));
        assert_eq!(container[probe]["httpGet"]["port"].as_str(), Some("admin"));
    }

    // The config path the router is given is the file the ConfigMap volume holds.
    let args: Vec<&str> = container["args"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let path = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    let mount = container["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|m| m["name"].as_str() == Some("config"))
        .unwrap();
    assert!(
        mount["subPath"].is_badvalue(),
        "a subPath mount never sees ConfigMap updates"
    );
    assert_eq!(
        format!("{}/router.toml", mount["mountPath"].as_str().unwrap()),
        path
    );
    let volume = pod["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|v| v["name"].as_str() == Some("config"))
        .unwrap();
    assert_eq!(
        volume["configMap"]["name"].as_str(),
        Some("wsrouter-config")
    );

    // Kubernetes waits for the whole drain before it kills.
    let grace = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_i64().unwrap() as u64);
    assert!(
        grace > config.limits.drain_timeout + config.limits.close_timeout,
        "{grace:?} does not cover the drain"
    );

    // The Service sends clients to the websocket port; the PDB and Service select the pods.
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let service = find(&docs, "Service", "wsrouter");
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"].as_str(),
        Some("websocket")
    );
    assert_eq!(service["spec"]["selector"], *labels);
    assert_eq!(
        find(&docs, "PodDisruptionBudget", "wsrouter")["spec"]["selector"]["matchLabels"],
        *labels
    );

    // The replica group looks up the headless Service, on its port.
    let headless = find(&docs, "Service", "streamer-headless");
    assert_eq!(headless["spec"]["clusterIP"].as_str(), Some("None"));
    let group = &config.replica_groups[0];
    let wsrouter::config::GroupLookup::Host { name, port } = &group.lookup else {
        panic!("an A-record group");
    };
    let namespace = headless["metadata"]["namespace"].as_str().unwrap();
    assert_eq!(
        name,
        &format!("streamer-headless.{namespace}.svc.cluster.local")
    );
    assert_eq!(
        headless["spec"]["ports"][0]["port"].as_i64(),
        Some(i64::from(*port))
    );
}

/// `key=value` of the unit file (the last one wins, as in systemd).
fn unit(key: &str) -> &'static str {
    UNIT.lines()
        .rev()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key} in the unit"))
}

#[test]
fn the_systemd_unit_reloads_with_sighup_and_outlasts_the_drain() {
    let config = Config::parse(include_str!("../config/router.toml")).unwrap();
    assert!(unit("ExecReload").contains("kill -HUP $MAINPID"));
    assert_eq!(unit("KillSignal"), "SIGTERM");
    let stop = Duration::from_secs(unit("TimeoutStopSec").parse().unwrap());
    assert!(stop > config.limits.drain_timeout + config.limits.close_timeout);
    let files: u64 = unit("LimitNOFILE").parse().unwrap();
    // Room for the default limits without lowering them (two descriptors per session).
    assert!(files >= 2 * 10_000 + 1_000, "LimitNOFILE={files}");
    assert!(unit("ExecStart").ends_with("--config /etc/wsrouter/router.toml"));
    assert!(unit("ExecStartPre").contains("wsrouter check --config /etc/wsrouter/router.toml"));
}

#[test]
fn the_dockerfile_builds_in_two_stages_and_runs_unprivileged() {
    let stages = DOCKERFILE
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert_eq!(stages, 2, "a build stage and a small runtime stage");
    let user = DOCKERFILE
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "{user}"
    );
    assert!(DOCKERFILE.contains("cargo build --release --locked"));
    assert!(DOCKERFILE.contains("ENTRYPOINT [\"/usr/local/bin/wsrouter\"]"));
    assert!(DOCKERFILE.contains("/etc/wsrouter/router.toml"));
}
