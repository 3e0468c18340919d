//! A small HTTP/1.1 client for JSON POSTs: what the etcd gateway and a FleetLock server need.
//! One request a connection (`Connection: close`), plain or TLS (OpenSSL), with timeouts.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, Result};
use openssl::ssl::{SslConnector, SslFiletype, SslMethod};

use super::config::{TlsFiles, Url};

/// How long connecting, and then each read or write, may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A response: status code and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// The bytes of a POST of `body` (JSON) to `path` under `url`.
pub fn request(url: &Url, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut head = format!(
        "POST {}{path} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        url.path,
        if url.host.contains(':') {
            format!("[{}]", url.host)
        } else {
            url.host.clone()
        },
        url.port,
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// POSTs `body` to `path` under `url` and reads the whole response.
pub fn post(
    url: &Url,
    tls: &TlsFiles,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response> {
    let addrs: Vec<_> = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .with_context(|| format!("Resolving {}", url.host))?
        .collect();
    let mut last = None;
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let stream = match (stream, last) {
        (Some(s), _) => s,
        (None, Some(e)) => return Err(e).with_context(|| format!("Connecting to {url}")),
        (None, None) => anyhow::bail!("Connecting to {url}: the name has no address"),
    };
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let bytes = request(url, path, headers, body);
    let raw = if url.tls {
        let mut builder = SslConnector::builder(SslMethod::tls_client())?;
        if let Some(ca) = &tls.ca_file {
            builder
                .set_ca_file(ca)
                .with_context(|| format!("Loading the CA file {}", ca.display()))?;
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            builder
                .set_certificate_chain_file(cert)
                .with_context(|| format!("Loading the certificate {}", cert.display()))?;
            builder
                .set_private_key_file(key, SslFiletype::PEM)
                .with_context(|| format!("Loading the key {}", key.display()))?;
        }
        let mut s = builder
            .build()
            .connect(&url.host, stream)
            .with_context(|| format!("Setting up TLS with {url}"))?;
        exchange(&mut s, &bytes)
    } else {
        let mut s = stream;
        exchange(&mut s, &bytes)
    }
    .with_context(|| format!("Talking to {url}"))?;
    parse_response(&raw).with_context(|| format!("Reading the answer of {url}"))
}

fn exchange<S: Read + Write>(stream: &mut S, request: &[u8]) -> Result<Vec<u8>> {
    stream.write_all(request)?;
    stream.flush()?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        // A TLS peer that closes without close_notify still sent the whole answer.
        Err(e) if !raw.is_empty() && e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(e.into()),
    }
    Ok(raw)
}

/// Status and body of a whole HTTP/1.1 response (`Content-Length`, chunked, or to the end).
pub fn parse_response(raw: &[u8]) -> Result<Response> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("The response has no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).context("The headers are not UTF-8")?;
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{status_line:?} is not an HTTP status line"))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        }
    }
    if chunked {
        body = dechunk(&body)?;
    } else if let Some(n) = length {
        anyhow::ensure!(
            body.len() >= n,
            "The body ended after {} of {n} bytes",
            body.len()
        );
        body.truncate(n);
    }
    Ok(Response { status, body })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("A chunk has no size line")?;
        let size_text = std::str::from_utf8(&data[..end])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("{size_text:?} is not a chunk size"))?;
        data = &data[end + 2..];
        if size == 0 {
            return Ok(out);
        }
        anyhow::ensure!(data.len() >= size + 2, "A chunk is cut short");
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_responses() {
        let cases: [(&[u8], u16, &[u8]); 4] = [
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", 200, b"{}"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}junk", 200, b"{}"),
            (
                b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n",
                404,
                b"{\"a\":1}",
            ),
            (b"HTTP/1.0 503 x\r\n\r\nrest", 503, b"rest"),
        ];
        for (raw, status, body) in cases {
            let r = parse_response(raw).unwrap();
            assert_eq!((r.status, r.body.as_slice()), (status, body));
        }
        for bad in [
            &b"HTTP/1.1 200 OK\r\n"[..],
            b"HTTP/1.1 2x0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}",
        ] {
            assert!(parse_response(bad).is_err());
        }
    }

    #[test]
    fn writes_requests() {
        let url = Url::parse("http://127.0.0.1:8080/base/").unwrap();
        let r = request(
            &url,
            "/v1/pre-reboot",
            &[("fleet-lock-protocol", "true")],
            b"{}",
        );
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "POST /base/v1/pre-reboot HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\
             Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\
             fleet-lock-protocol: true\r\n\r\n{}"
        );
    }
}
