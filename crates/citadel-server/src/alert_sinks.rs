//! The wire protocols alerts leave by (§11.2): an HTTP POST of JSON (webhook, Alertmanager),
//! RFC 5424 syslog over TCP with RFC 6587 octet counting (optionally TLS), and SMTP with
//! STARTTLS. Each send is bounded by one deadline; TLS trusts only the sink's `ca_file`.

use std::sync::Arc;
use std::time::Duration;

use citadel_core::alerts::Alert;
use citadel_core::time::{rfc3339, rfc5322};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The whole of one send: connect, talk, and hear the answer.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest SMTP reply line read; a server sending more is not one.
const MAX_REPLY_LINE: usize = 4096;
/// Largest `ca_file` read: a bundle of CA certificates, not a disk image.
const MAX_CA_FILE: u64 = 1 << 20;
/// Longest line of a mail's body (SMTP allows 998 octets).
const MAX_MAIL_LINE: usize = 900;

/// Reads a sink's `ca_file`: a regular file (never a FIFO or a device: opened without
/// blocking, checked, then read) of at most `MAX_CA_FILE` bytes, off the async workers.
async fn read_ca(path: &str) -> Result<Vec<u8>, String> {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| format!("cannot read ca_file {path}: {e}"))?;
        let meta = file.metadata().map_err(|e| format!("cannot read ca_file {path}: {e}"))?;
        if !meta.is_file() || meta.len() > MAX_CA_FILE {
            return Err(format!("ca_file {path} must be a regular file of at most {MAX_CA_FILE} bytes"));
        }
        let mut pem = Vec::new();
        file.take(MAX_CA_FILE).read_to_end(&mut pem).map_err(|e| format!("cannot read ca_file {path}: {e}"))?;
        Ok(pem)
    })
    .await
    .map_err(|e| format!("reading ca_file failed: {e}"))?
}

/// `scheme://host:port` of a URL: what an error may name (a path or user info may hold a secret).
fn endpoint(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!("{}://{}:{}", u.scheme(), u.host_str().unwrap_or("?"), u.port_or_known_default().unwrap_or(0)),
        Err(_) => "the sink's url".into(),
    }
}

/// POSTs `body` as JSON; any 2xx answer is an acknowledgement.
pub async fn post_json(url: &str, ca_file: Option<&str>, body: &Value) -> Result<(), String> {
    let mut builder = reqwest::Client::builder().timeout(SEND_TIMEOUT).redirect(reqwest::redirect::Policy::none());
    if let Some(ca) = ca_file {
        let pem = read_ca(ca).await?;
        let cert =
            reqwest::Certificate::from_pem(&pem).map_err(|e| format!("ca_file {ca} is not a PEM certificate: {e}"))?;
        builder = builder.tls_built_in_root_certs(false).add_root_certificate(cert);
    }
    let client = builder.build().map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let at = endpoint(url);
    let reply =
        client.post(url).json(body).send().await.map_err(|e| format!("cannot reach {at}: {}", e.without_url()))?;
    if !reply.status().is_success() {
        return Err(format!("{at} answered {}", reply.status()));
    }
    Ok(())
}

/// A stream that is plain TCP or TLS over it.
trait Wire: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Wire for T {}

async fn connect(address: &str) -> Result<TcpStream, String> {
    TcpStream::connect(address).await.map_err(|e| format!("cannot connect to {address}: {e}"))
}

async fn tls_over<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    host: &str,
    ca_file: Option<&str>,
) -> Result<Box<dyn Wire>, String> {
    let ca = ca_file.ok_or("TLS needs ca_file")?;
    let pem = read_ca(ca).await?;
    let config = crate::tls::client_config_from_pem(&pem, &format!("ca_file {ca}")).map_err(|e| format!("{e:#}"))?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|_| format!("{host:?} is not a name TLS can check"))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await
        .map_err(|e| format!("TLS with {host} failed: {e}"))?;
    Ok(Box::new(tls))
}

fn host_of(address: &str) -> &str {
    address.rsplit_once(':').map_or(address, |(host, _)| host).trim_start_matches('[').trim_end_matches(']')
}

/// Control characters out of anything placed into a protocol line (a header, a syslog field).
fn one_line(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

fn summary(alert: &Alert) -> String {
    let status = if alert.is_firing() { "FIRING" } else { "RESOLVED" };
    let text = alert.annotations.get("summary").map_or("", String::as_str);
    one_line(&format!("{status} {}: {text}", alert.name()))
}

/// One RFC 5424 message per alert notice, each framed by its length (RFC 6587 octet counting).
pub fn syslog_frames(hostname: &str, batch: &[(String, Alert)], now: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for (fingerprint, alert) in batch {
        // local0, with the alert's severity; a resolved notice is a notice.
        let severity = match (alert.is_firing(), alert.labels.get("severity").map(String::as_str)) {
            (false, _) => 5,
            (true, Some("critical")) => 2,
            (true, Some("warning")) => 4,
            (true, _) => 6,
        };
        let escape = |v: &str| one_line(v).replace('\\', "\\\\").replace('"', "\\\"").replace(']', "\\]");
        let mut data = format!(
            "[citadel@32473 fingerprint=\"{fingerprint}\" status=\"{}\"",
            if alert.is_firing() { "firing" } else { "resolved" }
        );
        for (name, value) in &alert.labels {
            // SD-NAMEs are printable US-ASCII without '=', ' ', ']' and '"', at most 32 long.
            let printable = name.len() <= 32 && name.bytes().all(|b| b.is_ascii_graphic() && !b"=]\"".contains(&b));
            if printable {
                data.push_str(&format!(" {name}=\"{}\"", escape(value)));
            }
        }
        data.push(']');
        let message = format!(
            "<{}>1 {} {} citadel - alert {data} {}",
            16 * 8 + severity,
            rfc3339(now),
            one_line(hostname).replace(' ', "-"),
            summary(alert)
        );
        out.extend_from_slice(format!("{} {message}", message.len()).as_bytes());
    }
    out
}

pub async fn send_syslog(
    address: &str,
    tls: bool,
    ca_file: Option<&str>,
    hostname: &str,
    batch: &[(String, Alert)],
) -> Result<(), String> {
    let frames = syslog_frames(hostname, batch, crate::ids::now_ms());
    let work = async {
        let tcp = connect(address).await?;
        let mut wire: Box<dyn Wire> = if tls { tls_over(tcp, host_of(address), ca_file).await? } else { Box::new(tcp) };
        wire.write_all(&frames).await.map_err(|e| format!("writing to {address} failed: {e}"))?;
        wire.flush().await.map_err(|e| format!("writing to {address} failed: {e}"))?;
        // Syslog over TCP has no acknowledgement: a clean close after the write is the best sign.
        wire.shutdown().await.map_err(|e| format!("closing the connection to {address} failed: {e}"))
    };
    tokio::time::timeout(SEND_TIMEOUT, work)
        .await
        .map_err(|_| format!("{address} did not take the messages in time"))?
}

/// The mail for a batch: headers (no line breaks from any value) and a plain-text body.
pub fn mail(from: &str, to: &[String], batch: &[(String, Alert)], now: u64) -> String {
    let firing = batch.iter().filter(|(_, a)| a.is_firing()).count();
    let first = batch.first().map(|(_, a)| summary(a)).unwrap_or_default();
    let subject = if batch.len() == 1 {
        format!("[Citadel] {first}")
    } else {
        format!("[Citadel] {} alerts ({firing} firing): {first}, ...", batch.len())
    };
    let id = batch.first().map_or(String::new(), |(k, a)| format!("{k}.{}", a.revision));
    let mut text = format!(
        "From: <{from}>\r\nTo: {}\r\nSubject: {}\r\nDate: {}\r\nMessage-ID: <{id}.{now}@citadel>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
        to.iter().map(|t| format!("<{t}>")).collect::<Vec<_>>().join(", "),
        header_text(&subject),
        rfc5322(now),
    );
    let mut body = String::new();
    for (fingerprint, alert) in batch {
        body.push_str(&summary(alert));
        body.push_str("\r\n");
        if let Some(description) = alert.annotations.get("description") {
            body.push_str(&format!("  {}\r\n", one_line(description)));
        }
        for (k, v) in &alert.labels {
            body.push_str(&format!("  {k}: {}\r\n", one_line(v)));
        }
        body.push_str(&format!("  started: {}\r\n", rfc3339(alert.starts_at)));
        if let Some(end) = alert.ends_at {
            body.push_str(&format!("  resolved: {}\r\n", rfc3339(end)));
        }
        body.push_str(&format!("  fingerprint: {fingerprint}\r\n\r\n"));
    }
    text.push_str(&fold(&body));
    text
}

/// A header value: one line, and RFC 2047 encoded words when it is not plain ASCII.
fn header_text(text: &str) -> String {
    use base64::Engine as _;
    let line = one_line(text);
    if line.is_ascii() {
        return line;
    }
    // Encoded words of at most 75 characters: 45 bytes of UTF-8 each, cut on characters.
    let mut words = Vec::new();
    let mut chunk = String::new();
    for c in line.chars() {
        if chunk.len() + c.len_utf8() > 45 {
            words.push(std::mem::take(&mut chunk));
        }
        chunk.push(c);
    }
    words.push(chunk);
    let encode = |w: &String| format!("=?UTF-8?B?{}?=", base64::engine::general_purpose::STANDARD.encode(w));
    words.iter().map(encode).collect::<Vec<_>>().join("\r\n ")
}

/// Cuts body lines longer than SMTP allows, on character boundaries.
fn fold(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split("\r\n") {
        let mut width = 0;
        for c in line.chars() {
            if width + c.len_utf8() > MAX_MAIL_LINE {
                out.push_str("\r\n");
                width = 0;
            }
            out.push(c);
            width += c.len_utf8();
        }
        out.push_str("\r\n");
    }
    out.truncate(out.len() - 2);
    out
}

/// Reads one SMTP reply (its lines) and checks its code.
async fn reply<R: AsyncBufReadExt + Unpin>(reader: &mut R, expect: &[u16], what: &str) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        let mut limited = (&mut *reader).take(MAX_REPLY_LINE as u64);
        let n = limited.read_line(&mut line).await.map_err(|e| format!("SMTP {what}: {e}"))?;
        if n == 0 || !line.ends_with('\n') {
            return Err(format!("SMTP {what}: the server closed the connection or sent a line too long"));
        }
        let line = line.trim_end().to_string();
        let code: u16 = line.get(..3).and_then(|c| c.parse().ok()).ok_or_else(|| format!("SMTP {what}: {line:?}"))?;
        let last = line.as_bytes().get(3) != Some(&b'-');
        lines.push(line);
        if last {
            if !expect.contains(&code) {
                return Err(format!("SMTP {what} refused: {}", lines.join(" | ")));
            }
            return Ok(lines);
        }
        if lines.len() > 100 {
            return Err(format!("SMTP {what}: too many reply lines"));
        }
    }
}

async fn command<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut BufReader<S>,
    line: &str,
    expect: &[u16],
    what: &str,
) -> Result<Vec<String>, String> {
    stream.get_mut().write_all(format!("{line}\r\n").as_bytes()).await.map_err(|e| format!("SMTP {what}: {e}"))?;
    reply(stream, expect, what).await
}

/// Sends one mail through `smtp_host:smtp_port`: EHLO, STARTTLS (when asked; refused if the
/// server does not offer it), MAIL, RCPT, DATA.
#[allow(clippy::too_many_arguments)]
pub async fn send_email(
    smtp_host: &str,
    smtp_port: u16,
    starttls: bool,
    ca_file: Option<&str>,
    from: &str,
    to: &[String],
    helo: &str,
    batch: &[(String, Alert)],
) -> Result<(), String> {
    let text = mail(from, to, batch, crate::ids::now_ms());
    let helo = one_line(helo).replace(' ', "-");
    let work = async {
        let tcp = connect(&format!("{smtp_host}:{smtp_port}")).await?;
        let mut plain = BufReader::new(tcp);
        reply(&mut plain, &[220], "greeting").await?;
        let offered = command(&mut plain, &format!("EHLO {helo}"), &[250], "EHLO").await?;
        let mut stream: BufReader<Box<dyn Wire>> = if starttls {
            if !offered.iter().any(|l| l.get(4..).is_some_and(|ext| ext.eq_ignore_ascii_case("STARTTLS"))) {
                return Err(format!("{smtp_host} does not offer STARTTLS (set starttls = false to send in the clear)"));
            }
            command(&mut plain, "STARTTLS", &[220], "STARTTLS").await?;
            let mut secure = BufReader::new(tls_over(plain.into_inner(), smtp_host, ca_file).await?);
            command(&mut secure, &format!("EHLO {helo}"), &[250], "EHLO").await?;
            secure
        } else {
            BufReader::new(Box::new(plain.into_inner()) as Box<dyn Wire>)
        };
        command(&mut stream, &format!("MAIL FROM:<{from}>"), &[250], "MAIL FROM").await?;
        for recipient in to {
            command(&mut stream, &format!("RCPT TO:<{recipient}>"), &[250, 251], "RCPT TO").await?;
        }
        command(&mut stream, "DATA", &[354], "DATA").await?;
        // Dot-stuffing (RFC 5321 4.5.2), then the end of the data.
        let mut data = String::with_capacity(text.len() + 8);
        for line in text.split("\r\n") {
            if line.starts_with('.') {
                data.push('.');
            }
            data.push_str(line);
            data.push_str("\r\n");
        }
        data.push_str(".\r\n");
        stream.get_mut().write_all(data.as_bytes()).await.map_err(|e| format!("SMTP data: {e}"))?;
        reply(&mut stream, &[250], "end of data").await?;
        // The mail is accepted; a failed goodbye changes nothing.
        let _ = command(&mut stream, "QUIT", &[221], "QUIT").await;
        Ok(())
    };
    tokio::time::timeout(SEND_TIMEOUT, work)
        .await
        .map_err(|_| format!("{smtp_host}:{smtp_port} did not take the mail in time"))?
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn alert(firing: bool) -> (String, Alert) {
        let labels = BTreeMap::from([
            ("alertname".to_string(), "CitadelNodeUnreachable".to_string()),
            ("severity".to_string(), "critical".to_string()),
            ("cluster".to_string(), "prod\"]\r\nx".to_string()),
        ]);
        let annotations = BTreeMap::from([("summary".to_string(), "Node 3\r\nBcc: evil@x is unreachable".to_string())]);
        let alert = Alert {
            labels,
            annotations,
            starts_at: 1_000,
            ends_at: (!firing).then_some(2_000),
            revision: 1,
            ..Alert::default()
        };
        ("00ff".into(), alert)
    }

    #[test]
    fn syslog_frames_are_rfc5424_messages_counted_in_octets_with_escaped_structured_data() {
        let frames = String::from_utf8(syslog_frames("node 1", &[alert(true), alert(false)], 3_000)).unwrap();
        let (length, rest) = frames.split_once(' ').unwrap();
        let length: usize = length.parse().unwrap();
        let first = &rest[..length];
        assert!(first.starts_with("<130>1 1970-01-01T00:00:03.000Z node-1 citadel - alert [citadel@32473 "), "{first}");
        assert!(first.contains(r#"cluster="prod\"\]  x""#), "quotes and brackets escaped, no line break: {first}");
        assert!(first.ends_with("FIRING CitadelNodeUnreachable: Node 3  Bcc: evil@x is unreachable"), "{first}");
        let second = &rest[length..];
        let (length, message) = second.split_once(' ').unwrap();
        assert_eq!(message.len(), length.parse::<usize>().unwrap());
        assert!(message.starts_with("<133>1 "), "a resolved notice is a notice: {message}");
    }

    #[test]
    fn a_mail_carries_no_header_a_value_could_inject() {
        let text = mail("citadel@example.com", &["ops@example.com".into()], &[alert(true)], 0);
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.lines().all(|l| !l.starts_with("Bcc")), "{head}");
        assert!(head.contains("Subject: [Citadel] FIRING CitadelNodeUnreachable: Node 3  Bcc: evil@x is unreachable"));
        assert!(head.contains("Date: Thu, 01 Jan 1970 00:00:00 +0000"));
        assert!(body.contains("fingerprint: 00ff"));
    }

    #[test]
    fn long_lines_are_folded_and_a_non_ascii_subject_is_encoded() {
        let (key, mut long) = alert(true);
        long.annotations.insert("description".into(), "é".repeat(2000));
        long.annotations.insert("summary".into(), "Nœud 3 injoignable".into());
        let text = mail("citadel@example.com", &["ops@example.com".into()], &[(key, long)], 0);
        assert!(text.split("\r\n").all(|l| l.len() <= MAX_MAIL_LINE), "no line past SMTP's limit");
        let subject = text.lines().find(|l| l.starts_with("Subject: ")).unwrap();
        assert!(subject.starts_with("Subject: =?UTF-8?B?") && subject.is_ascii(), "{subject}");
    }

    #[test]
    fn errors_name_the_endpoint_never_a_path_or_user_info_that_may_be_secret() {
        assert_eq!(endpoint("https://user:pw@hooks.example.com/T000/B000/XXXX"), "https://hooks.example.com:443");
        assert_eq!(endpoint("not a url"), "the sink's url");
    }
}
