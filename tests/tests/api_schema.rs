//! The agent against its own OpenAPI document: schemathesis (PyPI; `cargo xtask test` installs
//! it in target/api-venv) generates requests from the document for every operation, valid and
//! invalid, and checks that no response is a 5xx and every response matches the document.

use std::{path::PathBuf, process::Command};

use cnitrace_tests::{AgentProcess, privileged, programs_left_after_exit, remove_stale};

fn schemathesis() -> Option<PathBuf> {
    let st = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/api-venv/bin/st");
    st.exists().then_some(st)
}

#[test]
fn the_agent_answers_as_its_openapi_document_says() {
    if !privileged("the_agent_answers_as_its_openapi_document_says") {
        return;
    }
    let Some(st) = schemathesis() else {
        assert!(
            std::env::var_os("CNITRACE_REQUIRE_PRIVILEGED").is_none(),
            "schemathesis is missing from target/api-venv (`cargo xtask test` installs it)"
        );
        eprintln!("api_schema: skipped: schemathesis not installed (cargo xtask test installs it)");
        return;
    };
    let _serial = cnitrace_tests::serial();
    remove_stale();
    let agent = AgentProcess::start(&["--max-duration", "30"], &[]).expect("agent");
    let out = Command::new(st)
        .args(["run", &format!("{}/api/v1/openapi.json", agent.url)])
        .args(["--header", &format!("Authorization: Bearer {}", agent.token)])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        ])
        .args(["--max-examples", "25", "--seed", "1", "--workers", "1"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--request-timeout", "20"])
        .env("NO_COLOR", "1")
        .output()
        .expect("run schemathesis");
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let status = agent.terminate().expect("SIGTERM");
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{report}"
    );
    // Every operation of the document was exercised, with cases generated for it.
    let selected = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("Selected: "))
        .and_then(|v| v.split('/').next())
        .map(str::to_owned);
    let tested = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("Tested: "))
        .map(str::to_owned);
    assert!(selected.is_some() && selected == tested, "{report}");
    assert!(report.contains(" passed"), "{report}");
    assert!(status.success(), "agent exit after the run: {status:?}");
    assert!(programs_left_after_exit().unwrap().is_empty());
}
