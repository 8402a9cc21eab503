use super::*;
use std::sync::Arc;

struct Dir {
    tmp: tempfile::TempDir,
}

impl Dir {
    fn new(defaults: &str) -> Dir {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(tmp.path().join("d")).expect("mkdir");
        let d = Dir { tmp };
        d.main(defaults);
        d
    }
    fn main(&self, defaults: &str) {
        std::fs::write(
            self.tmp.path().join("m.toml"),
            format!("domains_dir = \"d\"\n[defaults]\n{defaults}"),
        )
        .expect("write main");
    }
    fn file(&self, name: &str, text: &str) {
        std::fs::write(self.tmp.path().join("d").join(name), text).expect("write");
    }
    fn loader(&self) -> Loader {
        Loader::new(&self.tmp.path().join("m.toml"))
    }
}

fn entry(name: &str, extra: &str) -> String {
    format!("[[domain]]\nname = \"{name}\"\n{extra}\n")
}

fn find<'a>(cfg: &'a Config, name: &str) -> &'a Arc<crate::config::DomainConfig> {
    cfg.domains
        .iter()
        .find(|d| d.name.as_str() == name)
        .expect("domain")
}

#[test]
fn only_changed_files_are_parsed_and_unchanged_domains_are_shared() {
    let dir = Dir::new("mx = [\"mx.example.net\"]\n");
    for i in 0..20 {
        dir.file(
            &format!("f{i:02}.toml"),
            &entry(&format!("d{i}.example"), ""),
        );
    }
    let mut loader = dir.loader();
    let first = loader.load().expect("valid");
    assert_eq!(loader.stats().parsed, 20);
    assert_eq!(first.domains.len(), 20);

    // Nothing changed (files may be racy: read, but not parsed).
    let again = loader.load().expect("valid");
    assert_eq!(loader.stats().parsed, 0);
    assert!(again.same_as(&first));
    assert!(Arc::ptr_eq(
        find(&again, "d3.example"),
        find(&first, "d3.example")
    ));

    // An identical rewrite is no change either.
    dir.file("f03.toml", &entry("d3.example", ""));
    let same = loader.load().expect("valid");
    assert_eq!(loader.stats().parsed, 0);
    assert!(same.same_as(&first));

    // One file changed, one added, one removed.
    dir.file("f05.toml", &entry("d5.example", "mode = \"enforce\""));
    dir.file("f99.toml", &entry("new.example", ""));
    std::fs::remove_file(dir.tmp.path().join("d/f07.toml")).expect("rm");
    let next = loader.load().expect("valid");
    assert_eq!(loader.stats().parsed, 2);
    assert!(!next.same_as(&first));
    assert_eq!(next.domains.len(), 20);
    assert!(next.domains.iter().all(|d| d.name.as_str() != "d7.example"));
    assert_eq!(
        find(&next, "d5.example").policy.mode,
        crate::policy::Mode::Enforce
    );
    assert!(Arc::ptr_eq(
        find(&next, "d3.example"),
        find(&first, "d3.example")
    ));

    // The main file changed: everything is validated again, and equal
    // domains still keep their Arc.
    dir.main("mx = [\"mx.example.net\"]\nttl = 3600\n");
    let full = loader.load().expect("valid");
    assert_eq!(loader.stats().parsed, 20);
    assert!(Arc::ptr_eq(
        find(&full, "d3.example"),
        find(&first, "d3.example")
    ));
    dir.main("mx = [\"mx2.example.net\"]\n");
    let other = loader.load().expect("valid");
    assert!(!Arc::ptr_eq(
        find(&other, "d3.example"),
        find(&first, "d3.example")
    ));
}

#[test]
fn cross_file_rules_see_cached_files() {
    let dir = Dir::new("mode = \"none\"\n");
    dir.file("b.toml", &entry("dup.example", ""));
    let mut loader = dir.loader();
    loader.load().expect("valid");
    dir.file("c.toml", &entry("Dup.example", ""));
    let errs = loader.load().expect_err("duplicate").errors;
    assert_eq!(errs.len(), 1, "{errs:?}");
    let msg = errs[0].to_string();
    assert!(msg.contains("c.toml:2:8: duplicate domain dup.example (first defined at"));
    assert!(msg.contains("b.toml:2:8)"), "{msg}");
    std::fs::remove_file(dir.tmp.path().join("d/c.toml")).expect("rm");
    dir.file("a.toml", &entry("dup.example", ""));
    let errs = loader.load().expect_err("duplicate").errors;
    assert!(errs[0].to_string().contains("b.toml:2:8: duplicate domain"));
    // A broken file is reported again while unchanged.
    std::fs::remove_file(dir.tmp.path().join("d/a.toml")).expect("rm");
    dir.file("x.toml", "[[domain]\n");
    for _ in 0..2 {
        let errs = loader.load().expect_err("broken").errors;
        assert!(errs[0].to_string().contains("x.toml:1:"), "{errs:?}");
    }
}

#[test]
fn a_changed_mx_certificate_revalidates_its_domains() {
    let dir = Dir::new("mode = \"enforce\"\nmx_certs = [\"mx.pem\"]\n");
    let pem = |san: &str| {
        let mut params = rcgen::CertificateParams::new(vec![san.to_owned()]).expect("params");
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(30);
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("sign").pem()
    };
    std::fs::write(dir.tmp.path().join("mx.pem"), pem("mx1.example.net")).expect("pem");
    dir.file("a.toml", &entry("a.example", ""));
    dir.file("b.toml", &entry("b.example", "mx = [\"mx.b.example\"]"));
    let mut loader = dir.loader();
    let first = loader.load().expect("valid");
    let mx = |c: &Config| find(c, "a.example").policy.mx[0].as_str().to_owned();
    assert_eq!(mx(&first), "mx1.example.net");
    std::fs::write(dir.tmp.path().join("mx.pem"), pem("mx2.example.net")).expect("pem");
    let next = loader.load().expect("valid");
    assert_eq!(mx(&next), "mx2.example.net");
    assert!(Arc::ptr_eq(
        find(&next, "b.example"),
        find(&first, "b.example")
    ));
}

#[test]
fn a_new_file_matching_an_mx_certs_glob_revalidates_its_domains() {
    let dir = Dir::new("mode = \"enforce\"\nmx_certs = [\"live/*/fullchain.pem\"]\n");
    let pem = |san: &str| {
        let params = rcgen::CertificateParams::new(vec![san.to_owned()]).expect("params");
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("sign").pem()
    };
    let put = |name: &str| {
        let d = dir.tmp.path().join("live").join(name);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("fullchain.pem"), pem(name)).expect("pem");
    };
    put("mx1.example.net");
    dir.file("a.toml", &entry("a.example", ""));
    let mut loader = dir.loader();
    let first = loader.load().expect("valid");
    let mx = |c: &Config| -> Vec<String> {
        find(c, "a.example")
            .policy
            .mx
            .iter()
            .map(|m| m.as_str().to_owned())
            .collect()
    };
    assert_eq!(mx(&first), ["mx1.example.net"]);
    put("mx2.example.net");
    let next = loader.load().expect("valid");
    assert_eq!(mx(&next), ["mx1.example.net", "mx2.example.net"]);
    // A glob matching nothing is a warning, not an error.
    dir.main("mode = \"testing\"\nmx = [\"mx.example.net\"]\n");
    dir.file(
        "a.toml",
        &entry(
            "a.example",
            "mx_certs = [\"../none/*.pem\"]\nmode = \"none\"",
        ),
    );
    let cfg = loader.load().expect("valid");
    assert!(
        cfg.warnings
            .iter()
            .any(|w| w.to_string().contains("matches no file")),
        "{:?}",
        cfg.warnings
    );
}

/// A load that changes a few files applies the change to the previous
/// list; the result is what a full load gives, and anything but a plain
/// change (a name defined twice, an invalid entry) is merged in full
/// and reported as before.
#[test]
fn a_small_change_is_merged_incrementally_and_equals_a_full_load() {
    let dir = Dir::new("mx = [\"mx.example.net\"]\n");
    for i in 0..40 {
        let body: String = (0..5)
            .map(|k| entry(&format!("d{i}-{k}.example"), ""))
            .collect();
        dir.file(&format!("f{i:02}.toml"), &body);
    }
    let mut loader = dir.loader();
    loader.load().expect("valid");
    // Old enough that the next loads read only what changed.
    std::thread::sleep(RACY + Duration::from_millis(100));
    loader.load().expect("valid");
    let names =
        |cfg: &Config| -> Vec<String> { cfg.domains.iter().map(|d| d.name.to_string()).collect() };
    let full = |loader_cfg: &Config| {
        let fresh = Config::load(&dir.tmp.path().join("m.toml")).expect("valid");
        assert_eq!(names(loader_cfg), names(&fresh));
        for (a, b) in loader_cfg.domains.iter().zip(&fresh.domains) {
            assert_eq!(**a, **b);
        }
    };
    // One file changed: one domain renamed, one gets its own mode, one added.
    dir.file(
        "f03.toml",
        &[
            entry("d3-0.example", ""),
            entry("renamed.example", ""),
            entry("d3-2.example", "mode = \"testing\""),
            entry("d3-3.example", ""),
            entry("d3-4.example", ""),
            entry("aaa-new.example", ""),
        ]
        .concat(),
    );
    // One file gone, one new.
    std::fs::remove_file(dir.tmp.path().join("d/f07.toml")).expect("rm");
    dir.file("zz.toml", &entry("zzz.example", ""));
    let cfg = loader.load().expect("valid");
    assert!(loader.stats().incremental, "{:?}", loader.stats());
    assert_eq!(cfg.domains.len(), 40 * 5 + 1 - 5 + 1);
    full(&cfg);
    assert!(
        cfg.domains
            .iter()
            .all(|d| d.name.as_str() != "d3-1.example")
    );

    // A name defined in another file too: the full merge reports it.
    dir.file("zz.toml", &entry("d5-0.example", ""));
    let errs = loader.load().expect_err("duplicate");
    assert!(!loader.stats().incremental);
    assert!(
        errs.errors
            .iter()
            .any(|e| e.message.contains("d5-0.example")),
        "{errs:?}"
    );
    // Fixed again: full merge first (the last load was not clean)...
    dir.file("zz.toml", &entry("zzz.example", ""));
    let cfg = loader.load().expect("valid");
    assert!(!loader.stats().incremental);
    full(&cfg);
    // ...then incremental again.
    dir.file("zz.toml", &entry("zzz2.example", ""));
    let cfg = loader.load().expect("valid");
    assert!(loader.stats().incremental, "{:?}", loader.stats());
    full(&cfg);
}
