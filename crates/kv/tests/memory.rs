//! Memory footprint of a large keyspace. Ignored by default (it allocates ~0.5 GB);
//! run with `cargo test -p concord-kv --test memory -- --ignored --nocapture`.

use concord_kv::*;

/// Resident set size of this process in bytes (Linux only; 0 elsewhere).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[test]
#[ignore = "allocates about half a gigabyte; run by hand"]
fn one_million_keys_of_256_bytes() {
    const KEYS: u64 = 1_000_000;
    const VALUE_BYTES: usize = 256;
    let before = rss_bytes();
    let mut store = KvStore::new();
    let t = std::time::Instant::now();
    for i in 0..KEYS {
        let cmd = Command::Put(PutRequest {
            key: format!("/registry/pods/default/pod-{i:08}").into_bytes(),
            value: vec![(i % 251) as u8; VALUE_BYTES],
            ..Default::default()
        });
        let resp = store.apply(i + 1, cmd);
        assert!(resp.result.is_ok());
    }
    let put_ms = t.elapsed().as_millis();
    let after = rss_bytes();
    let st = store.status();
    assert_eq!(st.key_count, KEYS);
    let key_bytes = 35u64; // "/registry/pods/default/pod-" + 8 digits
    let payload = KEYS * (key_bytes + VALUE_BYTES as u64);
    let used = after.saturating_sub(before);
    println!("apply of {KEYS} puts (incl. building them): {put_ms}ms");
    println!(
        "keys={KEYS} value={VALUE_BYTES}B rss_delta={}MiB payload={}MiB overhead_per_key={}B db_size_estimate={}MiB",
        used >> 20,
        payload >> 20,
        used.saturating_sub(payload) / KEYS,
        st.db_size_bytes >> 20
    );
    let t = std::time::Instant::now();
    let snap = store.snapshot();
    let snap_ms = t.elapsed().as_millis();
    let t = std::time::Instant::now();
    let restored = KvStore::restore(&snap).unwrap();
    let restore_ms = t.elapsed().as_millis();
    assert_eq!(restored.status(), st);
    drop(restored);
    // Overwrite every key once more, then compact the old versions away.
    for i in 0..KEYS {
        let cmd = Command::Put(PutRequest {
            key: format!("/registry/pods/default/pod-{i:08}").into_bytes(),
            value: vec![1; VALUE_BYTES],
            ..Default::default()
        });
        store.apply(KEYS + i + 1, cmd);
    }
    let t = std::time::Instant::now();
    let rev = store.revision();
    assert!(store
        .apply(2 * KEYS + 1, Command::Compact { revision: rev })
        .result
        .is_ok());
    let compact_ms = t.elapsed().as_millis();
    assert_eq!(store.status().version_count, KEYS);
    println!(
        "snapshot={}MiB snapshot_ms={snap_ms} restore_ms={restore_ms} compact_1M_ms={compact_ms}",
        snap.len() >> 20
    );
    // The estimate should be within a factor of two of what the process really holds.
    assert!(st.db_size_bytes * 2 > used && st.db_size_bytes < used * 2);
}
