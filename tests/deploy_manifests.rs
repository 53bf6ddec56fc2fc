//! The deployment files under deploy/ read the way the tools that use them read them, and checked
//! against the config they ship: the Kubernetes manifests parse and name themselves; the
//! ConfigMap's config is one that the library and `shiftgate check` accept; the Deployment mounts
//! it so that reloads reach the process, probes the admin port that config listens on, waits
//! out its drain and requires the admin token's Secret; the NetworkPolicy keeps the admin port
//! to the monitoring namespace and the proxy port open; the systemd unit reloads with SIGHUP and
//! waits out the drain too; the image runs as a non-root user with the CA roots; the upgrade
//! script is valid sh and agrees with the unit. Docker and a cluster are not needed: nothing is
//! built or applied.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;
use serde_yaml::Value;
use shiftgate::config::{Config, STOP_MARGIN};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every YAML document of every `.yaml`/`.yml` file under deploy/kubernetes, with its file name.
fn k8s_documents() -> Vec<(String, Value)> {
    let dir = repo().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML file in deploy/kubernetes");
    let mut docs = Vec::new();
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{name} is not valid YAML: {e}"));
            if !value.is_null() {
                docs.push((name.clone(), value));
            }
        }
    }
    docs
}

/// The one manifest of this kind and name.
fn manifest<'a>(docs: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .map(|(_, v)| v)
        .filter(|v| {
            v["kind"].as_str() == Some(kind) && v["metadata"]["name"].as_str() == Some(name)
        })
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind} named {name}");
    found[0]
}

fn text<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} should be a string, is {v:?}"))
}

fn seq<'a>(v: &'a Value, what: &str) -> &'a Vec<Value> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("{what} should be a list, is {v:?}"))
}

/// A stand-in for a secret the deployment provides at run time (the admin token).
const STAND_IN: &str = "stand-in-token";

/// The names of the variables the Deployment's shiftgate container sets.
fn container_env_names(docs: &[(String, Value)]) -> Vec<String> {
    let container = shiftgate_container(manifest(docs, "Deployment", "shiftgate"));
    container["env"]
        .as_sequence()
        .map(|env| {
            env.iter()
                .map(|e| text(&e["name"], "env name").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The config text of the ConfigMap `shiftgate-config`, and that config parsed in the
/// environment the Deployment gives it: its variables set (to a stand-in), every other unset. So
/// `admin_token_env` must name a variable the Deployment sets.
fn configmap_config(docs: &[(String, Value)]) -> (String, Config) {
    let cm = manifest(docs, "ConfigMap", "shiftgate-config");
    let yaml = text(&cm["data"]["config.yaml"], "ConfigMap data.\"config.yaml\"").to_string();
    let names = container_env_names(docs);
    let env = |name: &str| {
        names
            .iter()
            .any(|n| n == name)
            .then(|| STAND_IN.to_string())
    };
    let config = Config::parse_with_env(&yaml, &env)
        .unwrap_or_else(|e| panic!("the ConfigMap's config.yaml is rejected:\n{e}"));
    (yaml, config)
}

/// Every variable set (to a stand-in): the systemd unit's EnvironmentFile and `docker run -e`
/// provide the admin token at run time.
fn any_env(_: &str) -> Option<String> {
    Some(STAND_IN.to_string())
}

/// The shipped config.yaml at the repository root (the systemd unit and the image use it).
fn shipped_config() -> Config {
    Config::parse_with_env(&read("config.yaml"), &any_env)
        .unwrap_or_else(|e| panic!("config.yaml is rejected:\n{e}"))
}

/// The container named shiftgate of the Deployment's pod template.
fn shiftgate_container(deployment: &Value) -> &Value {
    seq(
        &deployment["spec"]["template"]["spec"]["containers"],
        "containers",
    )
    .iter()
    .find(|c| c["name"].as_str() == Some("shiftgate"))
    .expect("a container named shiftgate")
}

/// A probe's or Service's port, by number or by the container port's name.
fn resolve_port(container: &Value, port: &Value) -> u16 {
    if let Some(n) = port.as_u64() {
        return n as u16;
    }
    let name = text(port, "port");
    let p = seq(&container["ports"], "container ports")
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no container port named {name}"));
    p["containerPort"].as_u64().expect("containerPort") as u16
}

/// (a) Every manifest parses, multi-document files included, and has apiVersion, kind and
/// metadata.name; kustomization.yaml lists every other manifest, and only existing files.
#[test]
fn every_kubernetes_manifest_parses_and_names_itself() {
    let docs = k8s_documents();
    for (file, doc) in &docs {
        for (key, value) in [
            ("apiVersion", &doc["apiVersion"]),
            ("kind", &doc["kind"]),
            ("metadata.name", &doc["metadata"]["name"]),
        ] {
            let s = value.as_str().unwrap_or("");
            assert!(!s.is_empty(), "{file}: {key} is missing");
        }
        println!(
            "{file}: {} {} {}",
            text(&doc["apiVersion"], "apiVersion"),
            text(&doc["kind"], "kind"),
            text(&doc["metadata"]["name"], "metadata.name")
        );
    }

    let kustomization = manifest(&docs, "Kustomization", "shiftgate");
    let listed: Vec<&str> = seq(&kustomization["resources"], "resources")
        .iter()
        .map(|r| text(r, "a resource"))
        .collect();
    for file in &listed {
        assert!(
            repo().join("deploy/kubernetes").join(file).is_file(),
            "kustomization.yaml lists {file}, which does not exist"
        );
    }
    for (file, doc) in &docs {
        if doc["kind"].as_str() != Some("Kustomization") {
            assert!(
                listed.contains(&file.as_str()),
                "kustomization.yaml does not list {file}"
            );
        }
    }
}

/// (b) The ConfigMap's config.yaml passes `Config::parse` and `shiftgate check` (exit 0), and is
/// the container variant: every interface for listen and admin_listen, JSON logs.
#[test]
fn configmap_config_passes_parse_and_shiftgate_check() {
    let docs = k8s_documents();
    let (yaml, config) = configmap_config(&docs);
    assert_eq!(config.listen, "0.0.0.0:8080".parse().unwrap(), "listen");
    assert_eq!(
        config.admin_listen,
        "0.0.0.0:9090".parse().unwrap(),
        "admin_listen must be reachable by the kubelet's probes and Prometheus"
    );
    assert_eq!(
        config.log.format,
        shiftgate::config::LogFormat::Json,
        "log.format"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let mut check = Command::new(env!("CARGO_BIN_EXE_shiftgate"));
    check.arg("check").arg("--config").arg(&path);
    // The Deployment's environment: its variables (the admin token's among them), no other.
    check.env_clear();
    for name in container_env_names(&docs) {
        check.env(name, STAND_IN);
    }
    let out = check.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("shiftgate check: {}", stdout.trim());
    assert_eq!(
        out.status.code(),
        Some(0),
        "shiftgate check rejects the ConfigMap's config:\n{stdout}{stderr}"
    );
}

/// Without `cluster`, each replica paces on its own: the ConfigMap serves the same routes and
/// budgets as the shipped config.yaml, each budget's rate divided by the Deployment's replicas.
#[test]
fn configmap_budgets_are_the_shipped_ones_divided_by_the_replicas() {
    let docs = k8s_documents();
    let (_, cm) = configmap_config(&docs);
    let shipped = shipped_config();
    let replicas = manifest(&docs, "Deployment", "shiftgate")["spec"]["replicas"]
        .as_u64()
        .expect("spec.replicas") as f64;

    let names = |c: &Config| -> Vec<String> { c.routes.iter().map(|r| r.name.clone()).collect() };
    assert_eq!(names(&cm), names(&shipped), "route names, in order");
    let budgets = |c: &Config| -> BTreeMap<String, f64> {
        c.budgets
            .iter()
            .map(|b| (b.name.clone(), b.rate.per_second))
            .collect()
    };
    let (cm_budgets, shipped_budgets) = (budgets(&cm), budgets(&shipped));
    assert_eq!(
        cm_budgets.keys().collect::<Vec<_>>(),
        shipped_budgets.keys().collect::<Vec<_>>(),
        "budget names"
    );
    if cm.cluster.is_some() {
        println!("cluster is set: budgets are shared, no division needed");
        return;
    }
    for (name, rate) in &cm_budgets {
        let org = shipped_budgets[name];
        println!("budget {name}: {rate}/s per replica x {replicas} replicas, org {org}/s");
        assert!(
            rate * replicas <= org * (1.0 + 1e-9),
            "budget {name}: {rate}/s on each of {replicas} replicas exceeds the org's {org}/s"
        );
    }
}

/// The JavaScript and Go SDKs give up after about 16 s (shared facts; docs/capacity-planning.md,
/// section 2). A shipped wait or retry window at or past that would answer clients that have
/// already left: every route's `max_wait` and `retry.max_elapsed` stay under 16 s, with at
/// least a second left for the upstream's answer, in config.yaml and in the ConfigMap.
#[test]
fn shipped_waits_stay_under_the_sdks_16_s_timeouts() {
    const SDK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(16);
    const UPSTREAM_ALLOWANCE: std::time::Duration = std::time::Duration::from_secs(1);
    let docs = k8s_documents();
    let (_, cm) = configmap_config(&docs);
    for (which, config) in [("config.yaml", shipped_config()), ("the ConfigMap", cm)] {
        let mut waits: Vec<(String, std::time::Duration)> = config
            .routes
            .iter()
            .map(|r| (format!("routes {} max_wait", r.name), r.max_wait))
            .collect();
        waits.push(("retry.max_elapsed".into(), config.retry.max_elapsed));
        for (what, wait) in waits {
            println!("{which}: {what} {wait:?}");
            assert!(
                wait + UPSTREAM_ALLOWANCE < SDK_TIMEOUT,
                "{which}: {what} is {wait:?}: with the upstream's answer it reaches the SDKs' {SDK_TIMEOUT:?} timeout"
            );
        }
    }
}

/// (c) The Deployment mounts the ConfigMap as a directory (no subPath, which is never updated)
/// where `--config` points, probes /readyz and /healthz on the port the config's admin_listen
/// uses, serves the config's listen port as `http`, gives SIGTERM more time than the preStop
/// pause, the drain and 5 s of answers together, runs as non-root on a read-only root, and takes
/// the admin token from a Secret that is not optional, under the name admin_token_env gives.
#[test]
fn deployment_mounts_the_configmap_and_probes_the_admin_port() {
    let docs = k8s_documents();
    let (_, config) = configmap_config(&docs);
    let deployment = manifest(&docs, "Deployment", "shiftgate");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = shiftgate_container(deployment);

    // The ConfigMap's volume, and where the container mounts it.
    let volume = seq(&pod["volumes"], "volumes")
        .iter()
        .find(|v| v["configMap"]["name"].as_str() == Some("shiftgate-config"))
        .expect("a volume from the ConfigMap shiftgate-config");
    let volume_name = text(&volume["name"], "volume name");
    let mounts: Vec<&Value> = seq(&container["volumeMounts"], "volumeMounts")
        .iter()
        .filter(|m| m["name"].as_str() == Some(volume_name))
        .collect();
    assert_eq!(mounts.len(), 1, "the config volume is mounted once");
    let mount = mounts[0];
    assert!(
        mount["subPath"].is_null() && mount["subPathExpr"].is_null(),
        "the ConfigMap must be mounted as a directory: a subPath mount is never updated"
    );
    let mount_path = text(&mount["mountPath"], "mountPath").trim_end_matches('/');

    // --config names the ConfigMap's key inside that directory.
    let args: Vec<&str> = seq(&container["args"], "args")
        .iter()
        .map(|a| text(a, "an argument"))
        .collect();
    assert_eq!(
        args.first(),
        Some(&"run"),
        "the container runs `shiftgate run`"
    );
    let config_arg = args
        .iter()
        .position(|a| *a == "--config")
        .and_then(|i| args.get(i + 1))
        .expect("--config PATH in args");
    assert_eq!(
        *config_arg,
        format!("{mount_path}/config.yaml"),
        "--config must point into the mounted ConfigMap directory"
    );

    // Probes: the admin port of the config, /readyz for readiness, /healthz for liveness.
    let admin_port = config.admin_listen.port();
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe} path");
        let port = resolve_port(container, &get["port"]);
        assert_eq!(
            port, admin_port,
            "{probe} must hit admin_listen's port {admin_port}"
        );
        println!("{probe}: GET {path} on port {port}");
    }
    let http = resolve_port(container, &Value::from("http"));
    assert_eq!(
        http,
        config.listen.port(),
        "container port http is the config's listen port"
    );

    // The grace period covers the preStop pause, the drain and the answers in flight.
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    let pre_stop = match container["lifecycle"]["preStop"]["exec"]["command"].as_sequence() {
        Some(cmd) => {
            let cmd: Vec<&str> = cmd.iter().map(|c| text(c, "preStop command")).collect();
            assert_eq!(cmd.first(), Some(&"sleep"), "preStop is a sleep");
            cmd[1].parse::<u64>().expect("sleep seconds")
        }
        None => 0,
    };
    // The stop rule (Config::stop_timeout): the process exits at the latest drain_timeout +
    // upstream_timeout + 5 s after SIGTERM, whatever is in flight; preStop comes before it.
    let stop = config.stop_timeout();
    assert_eq!(
        stop,
        config.shutdown.drain_timeout + config.limits.upstream_timeout + STOP_MARGIN
    );
    let needed = Duration::from_secs(pre_stop) + stop;
    println!(
        "terminationGracePeriodSeconds {grace} > preStop {pre_stop} s + drain_timeout {:?} + upstream_timeout {:?} + {STOP_MARGIN:?}",
        config.shutdown.drain_timeout, config.limits.upstream_timeout
    );
    assert!(
        Duration::from_secs(grace) > needed,
        "terminationGracePeriodSeconds {grace} does not cover preStop + drain_timeout + \
         upstream_timeout + 5 s ({needed:?})"
    );
    // Both places that state the figures say the value shipped.
    assert!(
        read("deploy/kubernetes/deployment.yaml")
            .contains(&format!("{} < {grace}", needed.as_secs())),
        "the deployment's comment states the sum against the grace period"
    );

    // Non-root, read-only root file system.
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(
        container["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true)
    );

    // The admin token, from a Secret, under the name the config reads.
    let token_env = config
        .admin_token
        .as_ref()
        .map(|t| t.env.as_str())
        .expect("admin_token_env in the ConfigMap's config");
    let env = seq(&container["env"], "env")
        .iter()
        .find(|e| e["name"].as_str() == Some(token_env))
        .unwrap_or_else(|| panic!("env {token_env}"));
    let secret = &env["valueFrom"]["secretKeyRef"];
    assert!(
        secret["name"].as_str().is_some(),
        "{token_env} from a Secret"
    );
    // Not optional: without the Secret the pod does not start (CreateContainerConfigError names
    // it), rather than start with the variable unset and exit 1 in a restart loop.
    assert_ne!(
        secret["optional"].as_bool(),
        Some(true),
        "the admin token's Secret must not be optional"
    );
}

/// The Service forwards http and admin to the container ports of those names, and the PodMonitor
/// scrapes /metrics on the container port named admin.
#[test]
fn service_and_podmonitor_use_the_container_ports() {
    let docs = k8s_documents();
    let (_, config) = configmap_config(&docs);
    let container = shiftgate_container(manifest(&docs, "Deployment", "shiftgate"));

    let service = manifest(&docs, "Service", "shiftgate");
    assert_eq!(service["spec"]["type"].as_str(), Some("ClusterIP"));
    let ports = seq(&service["spec"]["ports"], "Service ports");
    for (name, want) in [
        ("http", config.listen.port()),
        ("admin", config.admin_listen.port()),
    ] {
        let port = ports
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("Service port {name}"));
        assert_eq!(
            resolve_port(container, &port["targetPort"]),
            want,
            "Service port {name} targets {want}"
        );
    }

    let monitor = manifest(&docs, "PodMonitor", "shiftgate");
    let endpoint = &seq(
        &monitor["spec"]["podMetricsEndpoints"],
        "podMetricsEndpoints",
    )[0];
    assert_eq!(endpoint["path"].as_str(), Some("/metrics"));
    assert_eq!(
        resolve_port(container, &endpoint["port"]),
        config.admin_listen.port(),
        "the PodMonitor scrapes the admin port"
    );
}

/// The label the NetworkPolicy asks the pods that watch the admin port to carry, and the
/// namespace it admits them from (deploy/kubernetes/networkpolicy.yaml and deploy/README.md).
const ADMIN_ACCESS_LABEL: (&str, &str) = ("shiftgate/admin-access", "true");
const MONITORING_NAMESPACE: &str = "monitoring";

/// The NetworkPolicy selects the Deployment's pods and filters their ingress: the proxy port
/// (the config's listen) is open to every client, the admin port (admin_listen: /metrics,
/// /status, POST /-/reload) only to pods with [`ADMIN_ACCESS_LABEL`] in the namespace
/// [`MONITORING_NAMESPACE`]; no rule opens every port.
#[test]
fn networkpolicy_admits_the_admin_port_only_from_monitoring_and_leaves_the_proxy_port_open() {
    let docs = k8s_documents();
    let (_, config) = configmap_config(&docs);
    let deployment = manifest(&docs, "Deployment", "shiftgate");
    let container = shiftgate_container(deployment);
    let policy = manifest(&docs, "NetworkPolicy", "shiftgate");
    let spec = &policy["spec"];

    // It applies to the shiftgate pods.
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let selector = spec["podSelector"]["matchLabels"]
        .as_mapping()
        .expect("podSelector.matchLabels");
    assert!(
        !selector.is_empty(),
        "an empty podSelector selects every pod"
    );
    for (k, v) in selector {
        assert_eq!(&pod_labels[k], v, "the pod template has the label {k:?}");
    }
    let types: Vec<&str> = seq(&spec["policyTypes"], "policyTypes")
        .iter()
        .map(|t| text(t, "a policy type"))
        .collect();
    assert!(types.contains(&"Ingress"), "policyTypes: {types:?}");

    let (http, admin) = (config.listen.port(), config.admin_listen.port());
    let mut http_open_to_all = false;
    let mut admin_rules = 0;
    for (i, rule) in seq(&spec["ingress"], "ingress").iter().enumerate() {
        let ports: Vec<u16> = seq(&rule["ports"], "ingress ports (none: every port)")
            .iter()
            .map(|p| {
                assert_ne!(p["protocol"].as_str(), Some("UDP"), "ingress[{i}]");
                resolve_port(container, &p["port"])
            })
            .collect();
        let from = rule["from"].as_sequence();
        if ports.contains(&http) && from.is_none_or(|f| f.is_empty()) {
            http_open_to_all = true;
        }
        if !ports.contains(&admin) {
            continue;
        }
        admin_rules += 1;
        assert!(
            !ports.contains(&http),
            "ingress[{i}] admits the admin port: it must not be the proxy port's rule"
        );
        let from = from
            .filter(|f| !f.is_empty())
            .unwrap_or_else(|| panic!("ingress[{i}] admits the admin port from everywhere"));
        for (j, peer) in from.iter().enumerate() {
            let at = format!("ingress[{i}].from[{j}]");
            assert!(
                peer["ipBlock"].is_null(),
                "{at}: no ipBlock to the admin port"
            );
            assert_eq!(
                peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"].as_str(),
                Some(MONITORING_NAMESPACE),
                "{at}: the monitoring namespace only"
            );
            let pods = peer["podSelector"]["matchLabels"]
                .as_mapping()
                .unwrap_or_else(|| panic!("{at}: a podSelector, in the same entry"));
            assert_eq!(pods.len(), 1, "{at}: one label to set");
            let (key, value) = ADMIN_ACCESS_LABEL;
            assert_eq!(
                pods.get(key).and_then(Value::as_str),
                Some(value),
                "{at}: the label deploy/README.md tells to set"
            );
        }
    }
    assert!(
        http_open_to_all,
        "the proxy port {http} stays open to every client"
    );
    assert_eq!(admin_rules, 1, "one rule admits the admin port {admin}");
    println!(
        "NetworkPolicy: port {http} from anywhere; port {admin} from pods labelled {}={} in namespace {MONITORING_NAMESPACE}",
        ADMIN_ACCESS_LABEL.0, ADMIN_ACCESS_LABEL.1
    );
}

/// `key=value` lines of a systemd unit, every value of each key in order.
fn unit_entries(unit: &str) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty()
            || line.starts_with('#')
            || line.starts_with(';')
            || line.starts_with('[')
        {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            map.entry(key.trim().to_string())
                .or_default()
                .push(value.trim().to_string());
        }
    }
    map
}

/// A systemd time span as used here: `60`, `60s`, `2min`.
fn unit_seconds(value: &str) -> u64 {
    let (digits, unit) = value.split_at(
        value
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(value.len()),
    );
    let n: u64 = digits
        .parse()
        .unwrap_or_else(|_| panic!("time span {value}"));
    match unit.trim() {
        "" | "s" | "sec" => n,
        "min" | "m" => n * 60,
        other => panic!("unexpected unit {other} in {value}"),
    }
}

/// (d) The unit runs the binary as the contract says, is ready when shiftgate says so
/// (`Type=notify`, from any process of the unit: the upgrade's new one), reloads with SIGHUP
/// only after `shiftgate check` accepts the file, does not restart on an invalid config (exit
/// 1), stops with SIGTERM and waits longer than drain_timeout + 5 s of the config it runs before
/// SIGKILL.
#[test]
fn systemd_unit_reloads_with_hup_and_waits_out_the_drain() {
    let unit = unit_entries(&read("deploy/systemd/shiftgate.service"));
    let one = |key: &str| -> &str {
        let values = unit
            .get(key)
            .unwrap_or_else(|| panic!("shiftgate.service has no {key}="));
        assert_eq!(values.len(), 1, "{key}= appears once");
        &values[0]
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(
        one("NotifyAccess"),
        "all",
        "the upgrade's new process sends MAINPID= before it is the main process"
    );
    assert_eq!(
        one("RestartPreventExitStatus"),
        "1",
        "exit 1: invalid config"
    );
    assert_eq!(one("User"), "shiftgate");
    assert_eq!(
        one("ExecStart"),
        "/usr/local/bin/shiftgate run --config /etc/shiftgate/config.yaml \
         --upgrade-sock /run/shiftgate/upgrade.sock --pid-file /run/shiftgate/shiftgate.pid"
    );
    // ExecReload= lines run in order, and a failing one stops the reload: check, then signal.
    let reload = &unit["ExecReload"];
    assert_eq!(reload.len(), 2, "ExecReload: {reload:?}");
    assert_eq!(
        reload[0], "/usr/local/bin/shiftgate check --config /etc/shiftgate/config.yaml",
        "the reload checks the config ExecStart runs first"
    );
    assert!(
        reload[1].contains("kill") && reload[1].contains("-HUP") && reload[1].contains("$MAINPID"),
        "then sends SIGHUP to the main process: {reload:?}"
    );
    assert_eq!(one("KillSignal"), "SIGTERM");
    assert_eq!(one("RuntimeDirectory"), "shiftgate");
    assert_eq!(one("PIDFile"), "/run/shiftgate/shiftgate.pid");
    assert!(
        one("EnvironmentFile").starts_with('-'),
        "EnvironmentFile is optional: without it shiftgate itself refuses a config whose \
         admin_token_env names an unset variable, and says which"
    );

    // The stop rule, with the shipped config (the unit runs /etc/shiftgate/config.yaml).
    let stop = unit_seconds(one("TimeoutStopSec"));
    let config = shipped_config();
    let bound = config.stop_timeout();
    println!(
        "TimeoutStopSec {stop} s > drain_timeout {:?} + upstream_timeout {:?} + {STOP_MARGIN:?} = {bound:?}",
        config.shutdown.drain_timeout, config.limits.upstream_timeout
    );
    assert!(
        Duration::from_secs(stop) > bound,
        "TimeoutStopSec must exceed drain_timeout + upstream_timeout + 5 s ({bound:?})"
    );
    assert!(
        read("deploy/systemd/shiftgate.service").contains(&format!("({} s)", bound.as_secs())),
        "the unit's comment states the bound for the shipped config"
    );
    // Docker's documented stop timeout too.
    let docker = read("deploy/docker/Dockerfile");
    let t: u64 = docker
        .split("docker stop -t ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .expect("the Dockerfile names a docker stop -t");
    assert!(Duration::from_secs(t) > bound, "docker stop -t {t}");
}

/// The upgrade script's paths are those of the unit: same binary, config, upgrade socket, PID
/// file and user (the new process must use the old one's --upgrade-sock).
#[test]
fn upgrade_script_agrees_with_the_unit() {
    let script = read("deploy/systemd/shiftgate-upgrade.sh");
    let constant = |name: &str| -> String {
        script
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("shiftgate-upgrade.sh sets no {name}="))
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string()
    };
    let unit = unit_entries(&read("deploy/systemd/shiftgate.service"));
    let exec_start = unit["ExecStart"][0].clone();
    let args: Vec<&str> = exec_start.split_whitespace().collect();
    let after = |flag: &str| -> String {
        let i = args.iter().position(|a| *a == flag).unwrap();
        args[i + 1].to_string()
    };
    assert_eq!(constant("BIN"), args[0], "BIN");
    assert_eq!(constant("CONFIG"), after("--config"), "CONFIG");
    assert_eq!(constant("SOCK"), after("--upgrade-sock"), "SOCK");
    assert_eq!(constant("PIDFILE"), after("--pid-file"), "PIDFILE");
    assert_eq!(
        constant("PIDFILE"),
        unit["PIDFile"][0],
        "PIDFILE is PIDFile="
    );
    assert_eq!(constant("RUN_AS"), unit["User"][0], "RUN_AS is User=");
    assert_eq!(
        constant("UNIT"),
        "shiftgate.service",
        "the unit file's name"
    );
    // The new process runs under the unit's open-files limit, not the shell's (1,024): the
    // script reads LimitNOFILE from the unit and sets soft and hard before exec'ing.
    assert!(
        unit.contains_key("LimitNOFILE"),
        "the unit sets LimitNOFILE"
    );
    assert!(
        script.contains("systemctl show -p LimitNOFILE --value \"$UNIT\""),
        "the script takes LimitNOFILE from the unit"
    );
    assert!(
        script.contains("ulimit -n \"$3\" && cd /") && script.contains("\"$nofile\" \\"),
        "the new process is started with that limit"
    );
    // `ulimit -n N` in /bin/sh sets soft and hard together, and what it execs inherits both
    // (a lower value here: raising the hard limit takes root's CAP_SYS_RESOURCE).
    let out = Command::new("sh")
        .args([
            "-c",
            "ulimit -n \"$1\" && exec sh -c 'ulimit -Sn; ulimit -Hn'",
            "sh",
            "1000",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1000\n1000\n");
}

/// (f) `sh -n`: the upgrade script parses as POSIX sh.
#[test]
fn upgrade_script_is_valid_sh() {
    let path = repo().join("deploy/systemd/shiftgate-upgrade.sh");
    let out = Command::new("sh").arg("-n").arg(&path).output().unwrap();
    assert!(
        out.status.success(),
        "sh -n {}:\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        read("deploy/systemd/shiftgate-upgrade.sh").starts_with("#!/bin/sh\n"),
        "the script runs with /bin/sh"
    );
}

/// The Dockerfile's stages, each as its instructions with continuation lines joined.
fn dockerfile_stages() -> Vec<Vec<String>> {
    let mut stages: Vec<Vec<String>> = Vec::new();
    let mut current = String::new();
    for line in read("deploy/docker/Dockerfile").lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        current.push_str(trimmed.trim_end_matches('\\'));
        current.push(' ');
        if trimmed.ends_with('\\') {
            continue;
        }
        let instruction = current.trim().to_string();
        current.clear();
        if instruction.is_empty() {
            continue;
        }
        if instruction.to_ascii_uppercase().starts_with("FROM ") {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("the Dockerfile starts with FROM")
            .push(instruction);
    }
    stages
}

/// (e) The runtime stage installs ca-certificates (rustls reads the system roots), runs as a
/// numeric non-root USER, exposes 8080 and 9090 and starts `shiftgate`; the build stage builds
/// with --locked. The image's config is config.yaml with admin_listen rewritten by sed: the line
/// it rewrites is in config.yaml and the result is valid, with the admin port on every interface.
#[test]
fn dockerfile_runtime_is_non_root_with_ca_certificates() {
    let stages = dockerfile_stages();
    assert!(stages.len() >= 2, "a multi-stage build");
    let (builder, runtime) = (&stages[0], stages.last().unwrap());
    assert!(
        builder
            .iter()
            .any(|i| i.starts_with("RUN") && i.contains("cargo build --release --locked")),
        "the build stage runs cargo build --release --locked"
    );
    assert!(
        runtime.iter().any(|i| i.starts_with("RUN")
            && i.contains("apt-get install")
            && i.contains("ca-certificates")),
        "the runtime stage installs ca-certificates"
    );
    let user = runtime
        .iter()
        .rev()
        .find_map(|i| i.strip_prefix("USER "))
        .expect("the runtime stage sets USER");
    let uid = user.split(':').next().unwrap().trim();
    assert!(
        uid.parse::<u32>().is_ok_and(|n| n != 0),
        "USER must be a numeric non-root uid (runAsNonRoot checks it), got {user}"
    );
    let exposed: Vec<&str> = runtime
        .iter()
        .filter_map(|i| i.strip_prefix("EXPOSE "))
        .flat_map(str::split_whitespace)
        .collect();
    assert!(
        exposed.contains(&"8080") && exposed.contains(&"9090"),
        "EXPOSE 8080 9090"
    );
    assert!(
        runtime.iter().any(|i| i == r#"ENTRYPOINT ["shiftgate"]"#),
        "ENTRYPOINT [\"shiftgate\"]"
    );
    println!("runtime stage: USER {user}, EXPOSE {}", exposed.join(" "));

    // The sed in the build stage rewrites this exact line of config.yaml.
    let original = r#"admin_listen: "127.0.0.1:9090""#;
    assert!(
        builder
            .iter()
            .any(|i| i
                .contains(r#"s/^admin_listen: "127\.0\.0\.1:9090"/admin_listen: "0.0.0.0:9090"/"#)),
        "the build stage rewrites admin_listen with sed"
    );
    let shipped = read("config.yaml");
    assert_eq!(
        shipped.lines().filter(|l| l.starts_with(original)).count(),
        1,
        "config.yaml has the line the Dockerfile rewrites"
    );
    let image_config: String = shipped
        .lines()
        .map(|l| match l.strip_prefix(original) {
            Some(rest) => format!(r#"admin_listen: "0.0.0.0:9090"{rest}"#),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let config = Config::parse_with_env(&image_config, &any_env)
        .unwrap_or_else(|e| panic!("the image's config is rejected:\n{e}"));
    assert_eq!(config.admin_listen, "0.0.0.0:9090".parse().unwrap());
}

/// Issue 14: the image's binary is stripped and without debug info, the builder image is
/// pinned to a full Rust version (`rust:1` moves under a rebuild), the dependencies are built in
/// a layer of their own before the source is copied (a source edit then reuses it), and the
/// runtime's HEALTHCHECK runs `shiftgate health` (no curl in the image), on the config the
/// image ships.
#[test]
fn dockerfile_strips_pins_its_builder_caches_dependencies_and_checks_health() {
    let stages = dockerfile_stages();
    let (builder, runtime) = (&stages[0], stages.last().unwrap());

    let from = builder[0].split_whitespace().nth(1).expect("FROM image");
    let tag = from
        .strip_prefix("rust:")
        .unwrap_or_else(|| panic!("the builder is a rust image: {from}"));
    let version = tag.split(['-', '@']).next().unwrap();
    assert!(
        version.split('.').count() == 3 && version.split('.').all(|n| n.parse::<u32>().is_ok()),
        "the builder is pinned to a full Rust version (rust:X.Y.Z-...), not {from}"
    );
    assert!(
        tag.contains("bookworm") && runtime[0].contains("bookworm"),
        "builder and runtime on the same Debian (glibc): {from} / {}",
        runtime[0]
    );
    let rust_version: String = read("Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("Cargo.toml has rust-version")
        .trim_matches('"')
        .to_string();
    let at_least = |v: &str| -> Vec<u32> { v.split('.').map(|n| n.parse().unwrap()).collect() };
    assert!(
        at_least(version) >= at_least(&rust_version),
        "the builder's Rust {version} is at least rust-version {rust_version}"
    );

    let env = builder
        .iter()
        .filter(|i| i.starts_with("ENV "))
        .cloned()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        env.contains("CARGO_PROFILE_RELEASE_STRIP=symbols")
            && env.contains("CARGO_PROFILE_RELEASE_DEBUG=0"),
        "the release build is stripped and without debug info: {env}"
    );

    // The dependency layer: the manifests alone, a build, and only then the whole source.
    let position = |pred: &dyn Fn(&str) -> bool, what: &str| -> usize {
        builder
            .iter()
            .position(|i| pred(i))
            .unwrap_or_else(|| panic!("the build stage has {what}"))
    };
    let manifests = position(
        &|i| i.starts_with("COPY Cargo.toml Cargo.lock"),
        "COPY Cargo.toml Cargo.lock",
    );
    let deps = position(
        &|i| i.starts_with("RUN") && i.contains("cargo build --release --locked"),
        "a cargo build",
    );
    let source = position(&|i| i.starts_with("COPY . ."), "COPY . .");
    assert!(
        manifests < deps && deps < source,
        "dependencies are built before the source is copied"
    );
    assert!(
        builder[deps].contains("target/release/.fingerprint/shiftgate-"),
        "the stub's own artifacts are removed, so the real source is built"
    );
    assert!(
        builder[source..]
            .iter()
            .any(|i| i.starts_with("RUN") && i.contains("cargo build --release --locked")),
        "the source is built after it is copied"
    );
    // Each bench Cargo.toml declares gets a stub: the manifest does not parse without them.
    assert!(
        builder[deps].contains("benches/$b.rs") && builder[deps].contains(r"^\[\[bench\]\]"),
        "a stub per [[bench]] of Cargo.toml"
    );

    let health = runtime
        .iter()
        .find_map(|i| i.strip_prefix("HEALTHCHECK "))
        .expect("the runtime stage has a HEALTHCHECK");
    let cmd = health
        .split_once("CMD ")
        .map(|(_, c)| c.trim())
        .expect("HEALTHCHECK ... CMD");
    let cmd: Vec<String> = serde_json::from_str(cmd).expect("HEALTHCHECK CMD in exec form");
    assert_eq!(cmd[..2], ["shiftgate", "health"], "{cmd:?}");
    let image_config = "/etc/shiftgate/config.yaml";
    assert!(
        runtime
            .iter()
            .any(|i| i == &format!("ENV SHIFTGATE_CONFIG={image_config}")),
        "`shiftgate health` reads the image's config (SHIFTGATE_CONFIG)"
    );
    assert!(
        runtime
            .iter()
            .any(|i| i.starts_with("COPY") && i.ends_with(image_config)),
        "the image has {image_config}"
    );
    let timeout: u64 = health
        .split_whitespace()
        .find_map(|w| w.strip_prefix("--timeout="))
        .and_then(|t| t.strip_suffix('s'))
        .and_then(|t| t.parse().ok())
        .expect("HEALTHCHECK --timeout=Ns");
    assert!(
        Duration::from_secs(timeout) > shiftgate::health::TIMEOUT,
        "the probe's own timeout ({:?}) fits in HEALTHCHECK's {timeout} s",
        shiftgate::health::TIMEOUT
    );
    assert!(
        !runtime
            .iter()
            .any(|i| i.contains("curl") || i.contains("wget")),
        "no curl or wget in the image"
    );
    println!("builder {from}; HEALTHCHECK {health}");
}
