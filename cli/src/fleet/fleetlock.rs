//! The FleetLock protocol's client (Zincati's; airlock is its reference server): `POST
//! /v1/pre-reboot` takes a slot, `POST /v1/steady-state` gives it back, each with the header
//! `fleet-lock-protocol: true` and `{"client_params": {"id": …, "group": …}}`. The server
//! decides how many hosts may hold a slot.

use anyhow::Result;
use serde_json::{Value, json};

use super::config::{TlsFiles, Url};
use super::http;

pub struct FleetLock<'a> {
    pub url: &'a Url,
    pub group: &'a str,
}

/// The body of both requests.
pub fn body(id: &str, group: &str) -> String {
    json!({"client_params": {"id": id, "group": group}}).to_string()
}

impl FleetLock<'_> {
    fn post(&self, path: &str, id: &str) -> Result<http::Response> {
        http::post(
            self.url,
            &TlsFiles::default(),
            path,
            &[("fleet-lock-protocol", "true")],
            body(id, self.group).as_bytes(),
        )
    }

    /// Asks for a slot: `Ok(Err(reason))` with the server's reason when it says no.
    pub fn take(&self, id: &str) -> Result<Result<(), String>> {
        let r = self.post("/v1/pre-reboot", id)?;
        Ok(if success(&r) { Ok(()) } else { Err(reason(&r)) })
    }

    /// Gives the slot back (the server answers success when none was held).
    pub fn release(&self, id: &str) -> Result<()> {
        let r = self.post("/v1/steady-state", id)?;
        anyhow::ensure!(
            success(&r),
            "The FleetLock server at {} refused to release the slot: {}",
            self.url,
            reason(&r)
        );
        Ok(())
    }
}

/// Any 2xx answer grants (the protocol says 200; Zincati accepts the class).
fn success(r: &http::Response) -> bool {
    (200..300).contains(&r.status)
}

/// The server's `{"kind": …, "value": …}`, else the status and body.
fn reason(r: &http::Response) -> String {
    let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    match (v["kind"].as_str(), v["value"].as_str()) {
        (Some(kind), Some(value)) => format!("{kind}: {value}"),
        _ => format!(
            "HTTP {}: {}",
            r.status,
            String::from_utf8_lossy(&r.body).trim()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_client_parameters() {
        let v: Value = serde_json::from_str(&body("0123abcd", "web")).unwrap();
        assert_eq!(
            v,
            json!({"client_params": {"id": "0123abcd", "group": "web"}})
        );
        let r = http::Response {
            status: 409,
            body: br#"{"kind":"failed_lock","value":"semaphore is full"}"#.to_vec(),
        };
        assert_eq!(reason(&r), "failed_lock: semaphore is full");
    }
}
