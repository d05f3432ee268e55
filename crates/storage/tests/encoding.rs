//! Property tests of the key and value encodings: round trips and order.

use proptest::prelude::*;
use storage::keys::{decode_mvcc_key, mvcc_meta_key, mvcc_version_key};
use storage::mvcc::value::{decode_intent, decode_version, encode_intent, encode_version};
use storage::mvcc::{TxnId, TxnMeta};
use storage::Timestamp;

fn user_key() -> impl Strategy<Value = Vec<u8>> {
    // Bias towards the bytes the escape encoding treats specially.
    prop::collection::vec(prop_oneof![Just(0u8), Just(1u8), Just(0xFFu8), any::<u8>()], 0..12)
}

fn ts() -> impl Strategy<Value = Timestamp> {
    (
        prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>(), 0u64..4],
        prop_oneof![Just(0u32), Just(u32::MAX), any::<u32>()],
    )
        .prop_map(|(w, l)| Timestamp::new(w, l))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn version_keys_round_trip(k in user_key(), t in ts()) {
        let d = decode_mvcc_key(&mvcc_version_key(&k, t)).unwrap();
        prop_assert_eq!(d.user_key, k.clone());
        prop_assert_eq!(d.ts, Some(t));
        let m = decode_mvcc_key(&mvcc_meta_key(&k)).unwrap();
        prop_assert_eq!(m.user_key, k);
        prop_assert_eq!(m.ts, None);
    }

    #[test]
    fn encoded_order_is_key_ascending_then_ts_descending(a in user_key(), ta in ts(), b in user_key(), tb in ts()) {
        let ea = mvcc_version_key(&a, ta);
        let eb = mvcc_version_key(&b, tb);
        let want = a.cmp(&b).then(tb.cmp(&ta));
        prop_assert_eq!(ea.cmp(&eb), want);
        // The meta key of a sorts with a, before all of a's versions.
        let ma = mvcc_meta_key(&a);
        prop_assert!(ma < ea);
        prop_assert_eq!(ma.cmp(&eb), if a == b { std::cmp::Ordering::Less } else { a.cmp(&b) });
    }

    #[test]
    fn no_encoded_key_is_a_prefix_of_another_keys_versions(a in user_key(), b in user_key(), t in ts()) {
        prop_assume!(a != b);
        prop_assert!(!mvcc_version_key(&b, t).starts_with(&mvcc_meta_key(&a)));
    }

    #[test]
    fn values_round_trip(v in prop::option::of(prop::collection::vec(any::<u8>(), 0..64)), id in any::<[u8; 16]>(), epoch in any::<u32>(), t in ts()) {
        let enc = encode_version(v.as_deref());
        prop_assert_eq!(decode_version(&enc).unwrap(), v.as_deref());
        let txn = TxnMeta { id: TxnId(id), epoch };
        let r = decode_intent(&encode_intent(&txn, t, v.as_deref())).unwrap();
        prop_assert_eq!(r.txn, txn);
        prop_assert_eq!(r.ts, t);
        prop_assert_eq!(r.value, v);
    }

    #[test]
    fn garbage_never_panics(b in prop::collection::vec(any::<u8>(), 0..48)) {
        let _ = decode_mvcc_key(&b);
        let _ = decode_version(&b);
        let _ = decode_intent(&b);
    }
}
