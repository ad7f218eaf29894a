//! A CNI network configuration (/etc/cni/net.d, `lab bench --cni-conf`), as `doctor` and the lab
//! read it: the file loaded (JSON, a `.conf` made a list of one, checked), then its chain, the
//! components it implies and whether the lab can run it; the same functions on the parsed value
//! directly. Never a panic, and the readings agree with each other.
//!
//! `load` and `summarize` read a file: each input is written to a directory of its own (in
//! /dev/shm, else the temporary directory), which is removed again after the run.
#![no_main]

use std::path::{Path, PathBuf};

use cnitrace::{
    cni_config::{self, Loaded},
    components::COMPONENTS,
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// The versions `plugins_of` accepts (`SUPPORTED_VERSIONS`, private to cni_config.rs).
const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// A directory for the input's file: in /dev/shm where there is one (a file system in memory,
/// several times the executions a second of a disk's).
fn scratch() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join(format!("cnitrace-fuzz-cni-{}", std::process::id()))
}

/// A component of the one taxonomy, or one of `other`'s groups.
fn known_component(name: &str) -> bool {
    COMPONENTS.iter().any(|c| c.name == name) || name.starts_with("other.")
}

/// What holds of any JSON value taken as a configuration list.
fn check_value(value: &Value) {
    let plugins = value["plugins"].as_array();
    let chain = cni_config::chain(value);
    assert!(chain.len() <= 2 * plugins.map_or(0, Vec::len));
    for plugin in plugins.into_iter().flatten().chain([value]) {
        let components = cni_config::components_of(plugin);
        for component in &components {
            assert!(known_component(component), "component {component:?}");
        }
        if plugin["ipMasq"] == Value::Bool(true) {
            assert!(components.contains(&"netfilter"));
        }
    }
    if let Ok((name, version, listed)) = cni_config::plugins_of(value) {
        assert!(!name.is_empty());
        assert!(SUPPORTED.contains(&version.as_str()), "version {version}");
        assert_eq!(
            cni_config::has_check(&version),
            !version.starts_with("0.3.")
        );
        assert!(!listed.is_empty());
        assert!(listed.iter().all(|p| p["type"].is_string()));
        if plugins.is_some() {
            // Each plugin's type is in the chain, in order, its IPAM plugin after it.
            assert!(chain.len() >= listed.len());
            assert_eq!(Some(chain[0].as_str()), listed[0]["type"].as_str());
        }
    }
    let loaded = Loaded {
        file: PathBuf::from("/etc/cni/net.d/10-fuzz.conflist"),
        conflist: value.clone(),
    };
    let _ = loaded.name();
    if let Some(problem) = cni_config::emulation_problem(&loaded) {
        assert!(problem.starts_with("/etc/cni/net.d/10-fuzz.conflist: plugin `"));
        assert!(
            chain
                .iter()
                .any(|kind| problem.contains(&format!("`{kind}`")))
        );
    }
    // Stats CNI_PATH's directories for each plugin; nothing else.
    if cni_config::check_runnable(&loaded).is_ok() {
        assert_eq!(cni_config::emulation_problem(&loaded), None);
        for kind in &chain {
            assert!(!kind.is_empty() && !kind.contains('/'), "plugin {kind:?}");
        }
    }
}

/// The file read as `lab bench --cni-conf FILE` and `doctor` read it.
fn check_file(dir: &Path, file: &Path, value: Option<&Value>) {
    let loaded = cni_config::load(file);
    match &loaded {
        Ok(loaded) => {
            assert_eq!(loaded.file, file);
            assert!(!loaded.name().is_empty());
            assert!(loaded.conflist["plugins"].is_array());
            assert!(cni_config::plugins_of(&loaded.conflist).is_ok());
            assert!(!cni_config::chain(&loaded.conflist).is_empty());
            check_value(&loaded.conflist);
        }
        Err(e) => assert!(e.to_string().contains(&file.display().to_string()), "{e}"),
    }
    if let Some(value) = value {
        // A list or a single configuration is accepted exactly when its parts are.
        assert_eq!(loaded.is_ok(), cni_config::plugins_of(value).is_ok());
        if value["plugins"].is_array()
            && let Ok(loaded) = &loaded
        {
            assert_eq!(&loaded.conflist, value);
        }
    } else {
        assert!(loaded.is_err());
    }
    // The directory as `doctor` summarises it: the one file, in use.
    let summaries = cni_config::summarize(dir);
    assert_eq!(summaries.len(), 1);
    let summary = &summaries[0];
    assert!(summary.in_use);
    match &loaded {
        Ok(loaded) => {
            assert_eq!(summary.error, None);
            assert_eq!(summary.name.as_deref(), Some(loaded.name()));
            assert_eq!(summary.plugins, cni_config::chain(&loaded.conflist));
            for component in &summary.components {
                assert!(known_component(component), "component {component:?}");
            }
        }
        Err(_) => assert!(summary.error.is_some()),
    }
}

fuzz_target!(|bytes: &[u8]| {
    let value = serde_json::from_slice::<Value>(bytes).ok();
    if let Some(value) = &value {
        check_value(value);
    }
    let dir = scratch();
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    let file = dir.join("10-fuzz.conflist");
    std::fs::write(&file, bytes).expect("the input written");
    check_file(&dir, &file, value.as_ref());
    std::fs::remove_file(&file).expect("the input removed");
    std::fs::remove_dir(&dir).expect("the scratch directory removed");
});
