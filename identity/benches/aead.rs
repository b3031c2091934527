//! AES-GCM as the byte path uses it: sealing and opening 16 KiB TLS records
//! in place, one core, with aws-lc-rs (the workspace's provider) and with
//! ring (the alternative rustls offers), so that the choice in ADR 0001
//! rests on a measurement on our machines.
//!
//! Run: `cargo bench -p identity --bench aead` (prints a Markdown table).
//! `AEAD_BENCH_SECS` sets the seconds per measurement (default 1).

#![allow(clippy::unwrap_used)] // A benchmark: a panic is the failure report.

use std::time::{Duration, Instant};

/// The largest TLS record payload, what a bulk transfer seals each time.
const RECORD: usize = 16 * 1024;

fn secs() -> Duration {
    let s = std::env::var("AEAD_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    Duration::from_secs_f64(s)
}

fn nonce(i: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&i.to_be_bytes());
    n
}

/// Runs `seal_open(i)` (one record sealed and opened again) for the
/// measurement time; returns the GB/s put through AES-GCM, a record
/// counting once when sealed and once when opened.
fn rate(mut seal_open: impl FnMut(u64)) -> f64 {
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < secs() {
        for _ in 0..64 {
            seal_open(i);
            i += 1;
        }
    }
    (2 * RECORD) as f64 * i as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// Seals and opens one record after another with `$aead`'s `$alg`, for
/// both providers: their AEAD modules have the same shape but no common
/// trait.
macro_rules! seal_open_rate {
    ($aead:ident, $alg:ident) => {{
        use $aead::aead::{Aad, LessSafeKey, Nonce, UnboundKey};
        let alg = &$aead::aead::$alg;
        let key = LessSafeKey::new(UnboundKey::new(alg, &vec![7u8; alg.key_len()]).unwrap());
        let mut record = vec![0x5au8; RECORD];
        rate(|i| {
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce(i)),
                    Aad::empty(),
                    &mut record,
                )
                .unwrap();
            record.extend_from_slice(tag.as_ref());
            key.open_in_place(
                Nonce::assume_unique_for_key(nonce(i)),
                Aad::empty(),
                &mut record,
            )
            .unwrap();
            record.truncate(RECORD);
        })
    }};
}

fn main() {
    println!("| 16 KiB records, seal + open, one core | aws-lc-rs | ring |");
    println!("|---|---|---|");
    println!(
        "| AES-256-GCM | {:.2} GB/s | {:.2} GB/s |",
        seal_open_rate!(aws_lc_rs, AES_256_GCM),
        seal_open_rate!(ring, AES_256_GCM)
    );
    println!(
        "| AES-128-GCM | {:.2} GB/s | {:.2} GB/s |",
        seal_open_rate!(aws_lc_rs, AES_128_GCM),
        seal_open_rate!(ring, AES_128_GCM)
    );
}
