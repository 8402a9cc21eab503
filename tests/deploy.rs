//! deploy/: the Kubernetes manifests validated offline against the
//! Kubernetes schemas (`kubernetes-validate` from PyPI, installed by
//! scripts/test.sh into a throw-away virtualenv), their wiring checked
//! (probes, secrets, security context), the ConfigMap's config loaded by
//! the real binary, and the Dockerfile copying everything the build embeds.

mod common;

use std::path::{Path, PathBuf};

use serde_norway::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/kubernetes"))
        .expect("deploy/kubernetes")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// Every document of every manifest, by kind.
fn documents() -> Vec<Value> {
    let mut docs = Vec::new();
    for file in manifests() {
        let text = std::fs::read_to_string(&file).expect("read manifest");
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).expect("YAML");
            if !value.is_null() {
                docs.push(value);
            }
        }
    }
    docs
}

use serde::Deserialize;

fn of_kind<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes"))
}

#[test]
fn kubernetes_manifests_pass_the_schema_check() {
    let validate = std::env::var_os("MTASTS_K8S_VALIDATE")
        .map(PathBuf::from)
        .filter(|p| p.is_file());
    let Some(validate) = validate else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "kubernetes-validate is missing and CI=true: scripts/test.sh installs it (MTASTS_K8S_VALIDATE)"
        );
        eprintln!("SKIPPING: set MTASTS_K8S_VALIDATE to a kubernetes-validate binary");
        return;
    };
    let files = manifests();
    assert!(files.len() >= 4, "{files:?}");
    let out = std::process::Command::new(&validate)
        .arg("--strict")
        .args(&files)
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for kind in [
        "deployment/mtasts",
        "service/mtasts",
        "configmap/mtasts",
        "poddisruptionbudget/mtasts",
        "secret/mtasts",
    ] {
        assert!(
            text.contains(&format!("passed for resource {kind}")),
            "{kind} not validated: {text}"
        );
    }
    // The checker does reject a broken manifest (so the pass above means
    // something).
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = std::fs::read_to_string(root().join("deploy/kubernetes/pdb.yaml"))
        .expect("pdb")
        .replace("minAvailable: 2", "minAvailable: 2\n  maxUnavailabel: 1");
    let bad = common::write(dir.path(), "bad.yaml", &broken);
    let out = std::process::Command::new(&validate)
        .arg("--strict")
        .arg(&bad)
        .output()
        .expect("run kubernetes-validate");
    assert!(!out.status.success());
}

#[test]
fn kubernetes_deployment_is_wired_as_docs_replicas_describes() {
    let docs = documents();
    let deployment = of_kind(&docs, "Deployment", "mtasts");
    assert_eq!(deployment["spec"]["replicas"], 3);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(
        container["readinessProbe"]["httpGet"]["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("/readyz")),
        "{:?}",
        container["readinessProbe"]
    );
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(container[probe]["httpGet"]["port"], "admin");
    }
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert!(container["resources"]["limits"]["memory"].is_string());
    let ports: Vec<(&str, i64)> = container["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().expect("name"),
                p["containerPort"].as_i64().expect("port"),
            )
        })
        .collect();

    // The config's listeners, admin and secret files match the pod.
    let config_map = of_kind(&docs, "ConfigMap", "mtasts");
    let config: toml::Table = config_map["data"]["mtasts.toml"]
        .as_str()
        .expect("mtasts.toml")
        .parse()
        .expect("TOML");
    let port_of = |addr: &toml::Value| -> i64 {
        addr.as_str()
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, p)| p.parse().ok())
            .expect("address:port")
    };
    assert!(ports.contains(&("https", port_of(&config["server"]["https"]))));
    assert!(ports.contains(&("http", port_of(&config["server"]["http"]))));
    assert!(ports.contains(&("admin", port_of(&config["admin"]["listen"]))));
    assert_eq!(config["store"]["backend"].as_str(), Some("postgres"));
    let secret = of_kind(&docs, "Secret", "mtasts");
    let mounts = container["volumeMounts"].as_sequence().expect("mounts");
    let secret_volume = pod["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .find(|v| v["secret"]["secretName"] == "mtasts")
        .expect("a volume of the mtasts Secret");
    let secret_dir = mounts
        .iter()
        .find(|m| m["name"] == secret_volume["name"])
        .and_then(|m| m["mountPath"].as_str())
        .expect("the Secret is mounted");
    for (section, key) in [
        ("store", "url_file"),
        ("store", "key_file"),
        ("admin", "token_file"),
    ] {
        let file = config[section][key].as_str().expect("secret file path");
        let (dir, name) = file.rsplit_once('/').expect("path");
        assert_eq!(dir, secret_dir, "{section}.{key}");
        assert!(
            secret["stringData"][name].is_string(),
            "{section}.{key} = {file}: the Secret has no key {name}"
        );
    }
    // The PodDisruptionBudget and the Services select these pods.
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let pdb = of_kind(&docs, "PodDisruptionBudget", "mtasts");
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);
    let service = of_kind(&docs, "Service", "mtasts");
    assert_eq!(&service["spec"]["selector"], labels);
    let public: Vec<i64> = service["spec"]["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .map(|p| p["port"].as_i64().expect("port"))
        .collect();
    assert_eq!(public, [443, 80], "senders use 443; HTTP-01 uses 80");
}

#[test]
fn kubernetes_config_map_holds_a_config_mtasts_accepts() {
    let docs = documents();
    let text = of_kind(&docs, "ConfigMap", "mtasts")["data"]["mtasts.toml"]
        .as_str()
        .expect("mtasts.toml")
        .to_owned();
    let dir = tempfile::tempdir().expect("tempdir");
    let var = dir.path().join("var");
    let etc = dir.path().join("etc");
    std::fs::create_dir_all(var.join("domains.d")).expect("mkdir");
    std::fs::create_dir_all(etc.join("secrets")).expect("mkdir");
    let domains = of_kind(&docs, "ConfigMap", "mtasts-domains");
    for (name, body) in domains["data"].as_mapping().expect("data") {
        common::write(
            &var.join("domains.d"),
            name.as_str().expect("name"),
            body.as_str().expect("body"),
        );
    }
    let text = text
        .replace("/var/lib/mtasts", &var.display().to_string())
        .replace("/etc/mtasts", &etc.display().to_string());
    let config = common::write(dir.path(), "mtasts.toml", &text);
    let out = common::mtasts(&["check-config", "--config", config.to_str().expect("utf-8")]);
    let (stdout, stderr) = common::output_text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("customer-one.example") || stdout.contains("1 domain"),
        "{stdout}"
    );
}

/// Paths `include_str!` / `include_bytes!` name in `file`, resolved.
fn includes(file: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(file).expect("read source");
    let mut found = Vec::new();
    for marker in ["include_str!(\"", "include_bytes!(\""] {
        let mut rest = text.as_str();
        while let Some(at) = rest.find(marker) {
            rest = &rest[at + marker.len()..];
            let end = rest.find('"').expect("closing quote");
            found.push(file.parent().expect("dir").join(&rest[..end]));
            rest = &rest[end..];
        }
    }
    found
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn dockerfile_copies_everything_the_build_embeds() {
    let root = root();
    let dockerfile = std::fs::read_to_string(root.join("deploy/Dockerfile")).expect("Dockerfile");
    let copied: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .flat_map(|l| {
            let mut parts: Vec<&str> = l.split_whitespace().collect();
            parts.pop(); // the destination
            parts
        })
        .map(|p| p.trim_end_matches('/').trim_start_matches("./"))
        .collect();
    let mut files = Vec::new();
    sources(&root.join("src"), &mut files);
    let mut embedded = 0;
    for file in files {
        for included in includes(&file) {
            let included = std::fs::canonicalize(&included)
                .unwrap_or_else(|e| panic!("{}: {e}", included.display()));
            let relative = included
                .strip_prefix(std::fs::canonicalize(&root).expect("root"))
                .expect("inside the project");
            let top = relative
                .components()
                .next()
                .expect("component")
                .as_os_str()
                .to_str()
                .expect("utf-8");
            embedded += 1;
            assert!(
                copied.contains(&top) || copied.contains(&relative.to_str().expect("utf-8")),
                "{} embeds {}, which deploy/Dockerfile does not COPY ({copied:?})",
                file.display(),
                relative.display()
            );
        }
    }
    assert!(
        embedded >= 2,
        "the build embeds templates and the example config"
    );
}
