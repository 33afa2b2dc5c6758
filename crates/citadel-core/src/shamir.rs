//! Splitting the unseal key into shares (Shamir over GF(256), via `vsss-rs`).
//!
//! With one share and threshold one, the share *is* the key (as in Vault): Shamir needs a
//! threshold of at least two.

use rand::rngs::OsRng;
use zeroize::Zeroizing;

use crate::barrier::{Key, KEY_LEN};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShamirError {
    #[error("key_shares must be between 1 and 255, got {0}")]
    BadShareCount(usize),
    #[error("key_threshold must be between 2 and key_shares ({shares}) when there are several shares, or 1 with a single share; got {threshold}")]
    BadThreshold { shares: usize, threshold: usize },
    #[error("unseal key shares are malformed or inconsistent")]
    BadShares,
}

/// Checks a share/threshold pair before anything is generated.
pub fn validate(shares: usize, threshold: usize) -> Result<(), ShamirError> {
    if shares == 0 || shares > 255 {
        return Err(ShamirError::BadShareCount(shares));
    }
    let ok = if shares == 1 { threshold == 1 } else { threshold >= 2 && threshold <= shares };
    if ok {
        Ok(())
    } else {
        Err(ShamirError::BadThreshold { shares, threshold })
    }
}

/// Splits `key` into `shares` shares of which any `threshold` recover it.
pub fn split(key: &Key, shares: usize, threshold: usize) -> Result<Vec<Zeroizing<Vec<u8>>>, ShamirError> {
    validate(shares, threshold)?;
    if shares == 1 {
        return Ok(vec![Zeroizing::new(key.0.to_vec())]);
    }
    let parts = vsss_rs::Gf256::split_array(threshold, shares, key.0, OsRng).map_err(|_| ShamirError::BadShares)?;
    Ok(parts.into_iter().map(Zeroizing::new).collect())
}

/// Recombines shares. A wrong combination yields a wrong key, which the caller detects when the
/// key fails to decrypt the root key.
pub fn combine(shares: &[Zeroizing<Vec<u8>>]) -> Result<Key, ShamirError> {
    if shares.len() == 1 {
        return Key::from_slice(&shares[0]).ok_or(ShamirError::BadShares);
    }
    if shares.iter().any(|s| s.len() != KEY_LEN + 1) {
        return Err(ShamirError::BadShares);
    }
    let raw: Vec<Vec<u8>> = shares.iter().map(|s| s.to_vec()).collect();
    let secret = Zeroizing::new(vsss_rs::Gf256::combine_array(&raw).map_err(|_| ShamirError::BadShares)?);
    Key::from_slice(&secret).ok_or(ShamirError::BadShares)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_threshold_subset_recovers_the_key() {
        let key = Key([42; 32]);
        let shares = split(&key, 5, 3).unwrap();
        assert_eq!(shares.len(), 5);
        for subset in [[0, 1, 2], [2, 3, 4], [0, 2, 4]] {
            let picked: Vec<_> = subset.iter().map(|&i| shares[i].clone()).collect();
            assert_eq!(combine(&picked).unwrap(), key);
        }
    }

    #[test]
    fn fewer_than_threshold_shares_do_not_recover_the_key() {
        let key = Key([42; 32]);
        let shares = split(&key, 5, 3).unwrap();
        let picked = vec![shares[0].clone(), shares[1].clone()];
        assert_ne!(combine(&picked).unwrap(), key);
    }

    #[test]
    fn single_share_is_the_key_itself() {
        let key = Key([7; 32]);
        let shares = split(&key, 1, 1).unwrap();
        assert_eq!(combine(&shares).unwrap(), key);
    }

    #[test]
    fn invalid_share_parameters_are_rejected() {
        assert_eq!(validate(0, 0), Err(ShamirError::BadShareCount(0)));
        assert_eq!(validate(3, 1), Err(ShamirError::BadThreshold { shares: 3, threshold: 1 }));
        assert_eq!(validate(3, 4), Err(ShamirError::BadThreshold { shares: 3, threshold: 4 }));
        assert!(validate(5, 3).is_ok());
    }
}
