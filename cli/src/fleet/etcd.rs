//! Reboot slots in etcd, through its v3 JSON gateway (`/v3/kv/txn`, `/v3/lease/grant`, …).
//!
//! A group has `max-rebooting` slot keys, `PREFIX/slots/0` … `PREFIX/slots/N-1`. A host takes
//! one in a transaction that succeeds only if that slot key and the host's own holder key
//! (`PREFIX/holders/ID`) do not exist, and writes both under a lease of `slot-ttl` seconds. As
//! only N slot keys can ever exist, no more than N hosts hold a slot at once, whoever races.
//! Releasing revokes the lease, which deletes both keys; a host that never comes back loses
//! them when the lease runs out.

use anyhow::{Context, Result};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use super::Held;
use super::config::EtcdConfig;
use super::http;

/// The key prefix of a group.
pub fn prefix(group: &str) -> String {
    format!("/dnfimage/fleet/{group}/")
}

pub struct Etcd<'a> {
    pub config: &'a EtcdConfig,
    pub group: &'a str,
}

fn b64(text: &str) -> String {
    B64.encode(text)
}

impl Etcd<'_> {
    /// POSTs `body` to the gateway's `path` on the first endpoint that answers.
    fn call(&self, path: &str, body: &Value) -> Result<Value> {
        let mut failures = Vec::new();
        for endpoint in &self.config.endpoints {
            match self.call_one(endpoint, path, body) {
                Ok(v) => return Ok(v),
                Err(Unanswered(e)) => failures.push(format!("{endpoint}: {e:#}")),
                Err(Refused(e)) => return Err(e),
            }
        }
        anyhow::bail!("No etcd endpoint answered: {}", failures.join("; "))
    }

    fn call_one(
        &self,
        endpoint: &super::config::Url,
        path: &str,
        body: &Value,
    ) -> std::result::Result<Value, Failure> {
        let tls = &self.config.tls;
        let token = match &self.config.auth {
            Some((user, file)) => {
                let password = std::fs::read_to_string(file)
                    .with_context(|| format!("Reading the etcd password from {}", file.display()))
                    .map_err(Refused)?;
                let body = json!({"name": user, "password": password.trim_end_matches('\n')});
                let r = http::post(
                    endpoint,
                    tls,
                    "/v3/auth/authenticate",
                    &[],
                    body.to_string().as_bytes(),
                )
                .map_err(Unanswered)?;
                let v = answer(&r).map_err(|e| classify(&r, e.context("Logging in to etcd")))?;
                Some(v["token"].as_str().unwrap_or_default().to_string())
            }
            None => None,
        };
        let headers: Vec<(&str, &str)> = token
            .as_deref()
            .map(|t| ("Authorization", t))
            .into_iter()
            .collect();
        let r = http::post(endpoint, tls, path, &headers, body.to_string().as_bytes())
            .map_err(Unanswered)?;
        answer(&r).map_err(|e| classify(&r, e))
    }

    /// Takes a slot for host `id`: `None` when all are held by others. Holding one already
    /// (an earlier run) gives that one.
    pub fn take(&self, id: &str) -> Result<Option<Held>> {
        let prefix = prefix(self.group);
        let holder = format!("{prefix}holders/{id}");
        if let Some(held) = self.holder(&holder)? {
            return Ok(Some(held));
        }
        let lease = self
            .call("/v3/lease/grant", &json!({"TTL": self.config.slot_ttl}))
            .context("Granting a lease")?;
        let lease = lease["ID"]
            .as_str()
            .map(str::to_string)
            .or_else(|| lease["ID"].as_i64().map(|n| n.to_string()))
            .context("etcd granted a lease without an ID")?;
        for slot in 0..self.config.max_rebooting {
            let key = format!("{prefix}slots/{slot}");
            let value = json!({"slot": slot, "lease": lease}).to_string();
            let txn = json!({
                "compare": [
                    {"key": b64(&key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"},
                    {"key": b64(&holder), "target": "CREATE", "result": "EQUAL", "create_revision": "0"},
                ],
                "success": [
                    {"request_put": {"key": b64(&key), "value": b64(id), "lease": lease}},
                    {"request_put": {"key": b64(&holder), "value": b64(&value), "lease": lease}},
                ],
            });
            let reply = self
                .call("/v3/kv/txn", &txn)
                .with_context(|| format!("Taking slot {slot} of group {}", self.group))?;
            if reply["succeeded"].as_bool() == Some(true) {
                return Ok(Some(Held {
                    slot: Some(slot),
                    lease: Some(lease),
                }));
            }
            // Our own put from an attempt whose answer was lost counts as taken.
            if let Some(held) = self.holder(&holder)? {
                return Ok(Some(held));
            }
        }
        self.revoke(&lease)?;
        Ok(None)
    }

    /// What the holder key of this host says, if it exists.
    fn holder(&self, key: &str) -> Result<Option<Held>> {
        let reply = self
            .call("/v3/kv/range", &json!({"key": b64(key)}))
            .context("Reading the slot this host holds")?;
        let Some(kv) = reply["kvs"].as_array().and_then(|k| k.first()) else {
            return Ok(None);
        };
        let value = B64
            .decode(kv["value"].as_str().unwrap_or_default())
            .context("Decoding the holder key")?;
        let v: Value = serde_json::from_slice(&value).context("Reading the holder key")?;
        Ok(Some(Held {
            slot: v["slot"].as_u64(),
            lease: v["lease"].as_str().map(str::to_string),
        }))
    }

    /// The hosts that hold a slot now.
    pub fn holders(&self) -> Result<Vec<String>> {
        let prefix = format!("{}slots/", prefix(self.group));
        let mut end = prefix.clone().into_bytes();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let reply = self
            .call(
                "/v3/kv/range",
                &json!({"key": b64(&prefix), "range_end": B64.encode(&end)}),
            )
            .context("Listing the slots")?;
        let mut holders = Vec::new();
        for kv in reply["kvs"].as_array().into_iter().flatten() {
            let v = B64.decode(kv["value"].as_str().unwrap_or_default())?;
            holders.push(String::from_utf8_lossy(&v).into_owned());
        }
        Ok(holders)
    }

    fn revoke(&self, lease: &str) -> Result<()> {
        match self.call("/v3/lease/revoke", &json!({"ID": lease})) {
            Ok(_) => Ok(()),
            // Already gone: it ran out, which released the slot too.
            Err(e) if format!("{e:#}").contains("lease not found") => Ok(()),
            Err(e) => Err(e).context("Revoking the slot's lease"),
        }
    }

    /// Gives the slot back: revokes its lease, which deletes its keys.
    pub fn release(&self, held: &Held) -> Result<()> {
        match &held.lease {
            Some(lease) => self.revoke(lease),
            None => Ok(()),
        }
    }
}

/// Why a call to one endpoint failed: it did not answer (try the next one), or it answered no.
enum Failure {
    Unanswered(anyhow::Error),
    Refused(anyhow::Error),
}
use Failure::{Refused, Unanswered};

/// An answer that is not a success: a server error (unavailable, no leader) may be the member's
/// alone, so the next endpoint is tried; anything else is the cluster's answer.
fn classify(r: &http::Response, e: anyhow::Error) -> Failure {
    if r.status >= 500 {
        Unanswered(e)
    } else {
        Refused(e)
    }
}

/// The JSON of a 200 answer, else an error with what etcd said.
fn answer(r: &http::Response) -> Result<Value> {
    let v: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&r.body).trim().to_string()));
    if r.status == 200 {
        anyhow::ensure!(v.is_object(), "etcd answered {v}");
        return Ok(v);
    }
    let said = v["error"]
        .as_str()
        .or_else(|| v["message"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string());
    anyhow::bail!("etcd answered {}: {said}", r.status)
}
