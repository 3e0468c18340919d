//! Random and mutated calls for every method of every interface, sent to the real services
//! (each in a network namespace of its own, so no made-up reference reaches a real host): every
//! call gets a reply or a varlink error (or, for bytes that are not a message, a closed
//! connection), and the service answers GetInfo afterwards.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use dnfimage_integration::sysroot::TestSysroot;
use dnfimage_integration::{Scratch, ServiceProcess, error_name, raw_call};
use dnfimage_interfaces::{deployer, fetcher, importer, layerer};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Map, Value, json};

/// Cases per method.
const CASES: u32 = 24;

/// Strings a fuzzer would not find on its own but that reach deep paths.
fn interesting_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("docker://127.0.0.1:1/dnfimage/os:v1".to_string()),
        Just("127.0.0.1:1/os@sha256:".to_string() + &"a".repeat(64)),
        Just("oci:/nonexistent/layout:v1".to_string()),
        Just("oci-archive:/dev/null".to_string()),
        Just("containers-storage:x".to_string()),
        Just("0".repeat(64)),
        Just("é".repeat(40)),
        Just("--help".to_string()),
        Just("../../etc/passwd".to_string()),
        Just("dnfimage-hello".to_string()),
        "\\PC{0,40}",
        "[a-z0-9:/._@-]{0,80}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e6f64..1e6).prop_map(|f| json!(f)),
        interesting_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z]{1,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A call of `method` whose parameters are those of `params` (each present or not) with random
/// values, sometimes an unknown one added, sometimes with "more" or "oneway".
fn call_of(interface: &str, method: &str, params: Vec<String>) -> impl Strategy<Value = Value> {
    let name = format!("{interface}.{method}");
    let n = params.len();
    (
        prop::collection::vec(prop::option::of(json_value()), n),
        prop::option::weighted(0.2, ("[a-z]{1,8}", json_value())),
        prop::option::weighted(0.3, any::<bool>()),
        prop::option::weighted(0.1, any::<bool>()),
    )
        .prop_map(move |(values, extra, more, oneway)| {
            let mut parameters = Map::new();
            for (key, value) in params.iter().zip(values) {
                if let Some(v) = value {
                    parameters.insert(key.clone(), v);
                }
            }
            if let Some((k, v)) = extra {
                parameters.insert(k, v);
            }
            let mut call = json!({"method": name, "parameters": parameters});
            if let Some(more) = more {
                call["more"] = json!(more);
            }
            if let Some(oneway) = oneway {
                call["oneway"] = json!(oneway);
            }
            call
        })
}

/// The bytes of `call` with random bytes overwritten, inserted or cut.
fn mutated(call: Value) -> impl Strategy<Value = Vec<u8>> {
    let bytes = serde_json::to_vec(&call).expect("a JSON value serializes");
    let len = bytes.len();
    prop::collection::vec((0..len, any::<u8>(), 0..3u8), 1..6).prop_map(move |edits| {
        let mut b = bytes.clone();
        for (at, byte, kind) in edits {
            let at = at.min(b.len().saturating_sub(1));
            match kind {
                0 if !b.is_empty() => b[at] = byte,
                1 => b.insert(at, byte),
                _ => b.truncate(at.max(1)),
            }
        }
        b.push(0);
        b
    })
}

/// Sends `bytes` on a new connection and reads what comes back until the last reply or the end
/// of the connection. Err when the service stayed silent on a call that wants an answer.
fn exchange(socket: &Path, bytes: &[u8], wants_answer: bool) -> Result<Vec<Value>> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    if stream.write_all(bytes).is_err() {
        return Ok(Vec::new());
    }
    if !wants_answer {
        return Ok(Vec::new());
    }
    let mut replies = Vec::new();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        while let Some(end) = buf.iter().position(|b| *b == 0) {
            let message: Vec<u8> = buf.drain(..=end).collect();
            let reply: Value = serde_json::from_slice(&message[..message.len() - 1])
                .context("The service sent a reply that is not JSON")?;
            let more = reply.get("continues").and_then(Value::as_bool) == Some(true);
            replies.push(reply);
            if !more {
                return Ok(replies);
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(replies),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(replies),
            Err(e) => return Err(e).context("No answer"),
        }
    }
}

fn alive(socket: &Path) -> Result<()> {
    let replies = raw_call(
        socket,
        &json!({"method": "org.varlink.service.GetInfo", "parameters": {}}),
    )?;
    anyhow::ensure!(error_name(&replies[0]).is_none(), "{replies:?}");
    Ok(())
}

fn fuzz_interface(socket: &Path, interface: &str, idl: &str) -> Result<()> {
    let parsed = zlink::idl::Interface::try_from(idl).map_err(|e| anyhow::anyhow!("{e}"))?;
    let methods: Vec<(String, Vec<String>)> = parsed
        .methods()
        .map(|m| {
            (
                m.name().to_string(),
                m.inputs().map(|f| f.name().to_string()).collect(),
            )
        })
        .collect();
    for (method, params) in methods {
        let mut runner = TestRunner::new_with_rng(
            Config {
                cases: CASES,
                failure_persistence: None,
                ..Config::default()
            },
            proptest::test_runner::TestRng::deterministic_rng(
                proptest::test_runner::RngAlgorithm::ChaCha,
            ),
        );
        let calls = call_of(interface, &method, params);
        let check = |bytes: &[u8], wants_answer: bool| -> Result<(), TestCaseError> {
            let replies = exchange(socket, bytes, wants_answer)
                .map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
            if wants_answer && replies.is_empty() {
                return Err(TestCaseError::fail("closed without an answer"));
            }
            alive(socket).map_err(|e| TestCaseError::fail(format!("not answering: {e:#}")))
        };
        runner
            .run(&calls, |call| {
                let oneway = call.get("oneway").and_then(Value::as_bool) == Some(true);
                let mut bytes = serde_json::to_vec(&call).expect("serializes");
                bytes.push(0);
                check(&bytes, !oneway)
            })
            .map_err(|e| anyhow::anyhow!("{interface}.{method}: {e}"))?;
        let mutations = calls.prop_flat_map(mutated);
        runner
            .run(&mutations, |bytes| {
                // A mutated message may not be a call any more: any reaction but silence on a
                // well-formed call, and a live service afterwards.
                let wants = serde_json::from_slice::<Value>(&bytes[..bytes.len() - 1])
                    .ok()
                    .is_some_and(|v| {
                        v.is_object() && v.get("oneway").and_then(Value::as_bool) != Some(true)
                    });
                check(&bytes, wants)
            })
            .map_err(|e| anyhow::anyhow!("{interface}.{method} (mutated): {e}"))?;
    }
    Ok(())
}

#[test]
fn every_method_of_every_interface_survives_random_and_mutated_calls() -> Result<()> {
    let scratch = Scratch::new()?;
    let sysroot = TestSysroot::create(&scratch.path().join("sysroot"))?;
    let sysroot_arg = sysroot.path().as_os_str();
    let state = scratch.state_dir();
    let empty = scratch.path().join("empty");
    std::fs::create_dir_all(&empty)?;
    let services = [
        (
            "fetcher",
            fetcher::INTERFACE,
            fetcher::IDL,
            vec![OsStr::new("--state-dir"), state.as_os_str()],
        ),
        (
            "importer",
            importer::INTERFACE,
            importer::IDL,
            vec![OsStr::new("--sysroot"), sysroot_arg],
        ),
        (
            "deployer",
            deployer::INTERFACE,
            deployer::IDL,
            vec![OsStr::new("--sysroot"), sysroot_arg],
        ),
        (
            "layerer",
            layerer::INTERFACE,
            layerer::IDL,
            vec![
                OsStr::new("--sysroot"),
                sysroot_arg,
                OsStr::new("--state-dir"),
                state.as_os_str(),
                OsStr::new("--repos-dir"),
                empty.as_os_str(),
                OsStr::new("--gpg-key-dir"),
                empty.as_os_str(),
            ],
        ),
    ];
    for (name, interface, idl, args) in services {
        let service = ServiceProcess::start_offline(&scratch, name, interface, &args)?;
        fuzz_interface(&scratch.socket(interface), interface, idl)
            .with_context(|| format!("log of {name}:\n{}", service.log_text()))?;
        let log = service.log_text();
        assert!(!log.contains("panicked"), "{name} panicked:\n{log}");
    }
    sysroot.fsck()?;
    Ok(())
}
