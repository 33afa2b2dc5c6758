//! Random identifiers and secrets, drawn by the proposer (never inside `apply`).

use base64::Engine;
use rand::RngCore;

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut out);
    out
}

pub fn uuid() -> String {
    let b: [u8; 16] = random_bytes();
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// A client token: `hvs.` (as Vault's service tokens, so tools recognise it) + 192 random bits.
pub fn token() -> String {
    let b: [u8; 24] = random_bytes();
    format!("hvs.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

pub fn accessor() -> String {
    let b: [u8; 12] = random_bytes();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
