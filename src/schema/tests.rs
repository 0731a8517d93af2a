use super::*;

fn twitter() -> Schema {
    let cfg: SchemaConfig = toml::from_str(
        r#"
            node_types = ["user", "tweet", "ad"]
            relations = [
              { name = "follows", src = "user", dst = "user" },
              { name = "favorites", src = "user", dst = "tweet" },
              { name = "mixed", src = ["user", "ad"], dst = "tweet" },
            ]
            "#,
    )
    .unwrap();
    Schema::new(&cfg).unwrap()
}

const LIMITS: DecodeLimits = DecodeLimits {
    max_event_bytes: 512,
    max_id_bytes: 16,
    max_ahead_ms: None,
};

fn decode(s: &str) -> Result<Event, InvalidEvent> {
    decode_event(&twitter(), &LIMITS, Some(s.as_bytes()), 777)
}

fn reason(s: &str) -> InvalidReason {
    decode(s).expect_err(s).reason
}

#[test]
fn decodes_a_full_event() {
    let e = decode(r#"{"src":"user:42","rel":"favorites","dst":"tweet:9001","ts":1732190000123,"weight":2.5,"event_id":"e1"}"#)
            .unwrap();
    let s = twitter();
    assert_eq!(
        e.src,
        NodeKey {
            node_type: s.type_id("user").unwrap(),
            id: "42".into()
        }
    );
    assert_eq!(
        e.dst,
        NodeKey {
            node_type: s.type_id("tweet").unwrap(),
            id: "9001".into()
        }
    );
    assert_eq!(e.rel, s.rel_id("favorites").unwrap());
    assert_eq!(e.ts, 1732190000123);
    assert_eq!(e.weight, 2.5);
    assert_eq!(e.event_id.as_deref(), Some("e1"));
}

#[test]
fn defaults_ts_weight_and_keeps_colons_and_escapes_in_ids() {
    let e = decode(r#"{"src":"user:a:b","rel":"follows","dst":"user:\u00e9t\u00e9","extra":[1]}"#)
        .unwrap();
    assert_eq!(e.ts, 777);
    assert_eq!(e.weight, 1.0);
    assert_eq!(e.src.id, "a:b");
    assert_eq!(e.dst.id, "été");
    assert_eq!(e.event_id, None);
    let e = decode(r#"{"src":"ad:1","rel":"mixed","dst":"tweet:2","weight":0,"ts":null}"#).unwrap();
    assert_eq!((e.weight, e.ts), (0.0, 777));
}

#[test]
fn every_invalid_class_is_named() {
    let big = format!(
        r#"{{"src":"user:1","rel":"follows","dst":"user:2","pad":"{}"}}"#,
        "x".repeat(600)
    );
    let cases: Vec<(Vec<u8>, InvalidReason)> = vec![
        (b"".to_vec(), InvalidReason::EmptyPayload),
        (big.into_bytes(), InvalidReason::TooLarge),
        (vec![b'{', 0xff, 0xfe, b'}'], InvalidReason::NotUtf8),
        (b"{not json".to_vec(), InvalidReason::NotJson),
        (
            br#"{"src":"user:1","src":"user:2"}"#.to_vec(),
            InvalidReason::WrongType,
        ),
        (b"[1,2,3]".to_vec(), InvalidReason::NotObject),
        (b"42".to_vec(), InvalidReason::NotObject),
        (
            br#"{"rel":"follows","dst":"user:2"}"#.to_vec(),
            InvalidReason::MissingField,
        ),
        (
            br#"{"src":"user:1","rel":"follows","dst":null}"#.to_vec(),
            InvalidReason::MissingField,
        ),
        (
            br#"{"src":1,"rel":"follows","dst":"user:2"}"#.to_vec(),
            InvalidReason::WrongType,
        ),
        (
            br#"{"src":"user:1","rel":"follows","dst":"user:2","weight":"1"}"#.to_vec(),
            InvalidReason::WrongType,
        ),
        (
            br#"{"src":"user1","rel":"follows","dst":"user:2"}"#.to_vec(),
            InvalidReason::BadNodeRef,
        ),
        (
            br#"{"src":"robot:1","rel":"follows","dst":"user:2"}"#.to_vec(),
            InvalidReason::UnknownNodeType,
        ),
        (
            br#"{"src":"user:1","rel":"likes","dst":"user:2"}"#.to_vec(),
            InvalidReason::UnknownRelation,
        ),
        (
            br#"{"src":"user:1","rel":"follows","dst":"tweet:2"}"#.to_vec(),
            InvalidReason::TypeMismatch,
        ),
        (
            br#"{"src":"ad:1","rel":"follows","dst":"user:2"}"#.to_vec(),
            InvalidReason::TypeMismatch,
        ),
        (
            br#"{"src":"user:","rel":"follows","dst":"user:2"}"#.to_vec(),
            InvalidReason::EmptyId,
        ),
        (
            br#"{"src":"user:1","rel":"follows","dst":"user:01234567890123456"}"#.to_vec(),
            InvalidReason::IdTooLong,
        ),
        (
            br#"{"src":"user:1","rel":"follows","dst":"user:2","weight":1e999}"#.to_vec(),
            InvalidReason::NonFiniteWeight,
        ),
        (
            br#"{"src":"user:1","rel":"follows","dst":"user:2","weight":1e39}"#.to_vec(),
            InvalidReason::NonFiniteWeight,
        ),
        (
            br#"{"src":"user:1","rel":"follows","dst":"user:2","weight":-0.5}"#.to_vec(),
            InvalidReason::NegativeWeight,
        ),
        (
            br#"{"src":"user:1","rel":"follows","dst":"user:2","ts":-1}"#.to_vec(),
            InvalidReason::BadTimestamp,
        ),
        (
            br#"{"src":"user:1","rel":"follows","dst":"user:2","ts":1.5}"#.to_vec(),
            InvalidReason::BadTimestamp,
        ),
        (
            br#"{"src":"user:1","rel":"follows","dst":"user:2","ts":"now"}"#.to_vec(),
            InvalidReason::BadTimestamp,
        ),
        (
            br#"{"src":"user:1","rel":"follows","dst":"user:2","event_id":""}"#.to_vec(),
            InvalidReason::BadEventId,
        ),
        (
            br#"{"src":"user:1","rel":"follows","dst":"user:2","event_id":7}"#.to_vec(),
            InvalidReason::WrongType,
        ),
    ];
    for (payload, want) in cases {
        let got = decode_event(&twitter(), &LIMITS, Some(&payload), 0)
            .expect_err(&String::from_utf8_lossy(&payload));
        assert_eq!(
            got.reason,
            want,
            "payload {:?}: {}",
            String::from_utf8_lossy(&payload),
            got.detail
        );
        assert!(!got.detail.is_empty());
    }
    assert_eq!(
        decode_event(&twitter(), &LIMITS, None, 0)
            .unwrap_err()
            .reason,
        InvalidReason::EmptyPayload
    );
    assert_eq!(
        reason(r#"{"src":"user:1","rel":"follows"}"#),
        InvalidReason::MissingField
    );
}

#[test]
fn reason_labels_round_trip() {
    for r in InvalidReason::ALL {
        assert_eq!(InvalidReason::parse(r.as_str()), Some(r));
    }
    assert_eq!(InvalidReason::parse("nope"), None);
}

#[test]
fn schema_errors_name_the_key() {
    let bad = |toml_src: &str| {
        let cfg: SchemaConfig = toml::from_str(toml_src).unwrap();
        Schema::new(&cfg).unwrap_err()
    };
    let e = bad(r#"node_types = ["user", "user"]
                       relations = [{ name = "f", src = "user", dst = "user" }]"#);
    assert_eq!(e.key, "schema.node_types[1]");
    let e = bad(r#"node_types = ["user"]
                       relations = [{ name = "f", src = "user", dst = "tweet" }]"#);
    assert_eq!(e.key, "schema.relations[0].dst");
    assert!(e.problem.contains("tweet"));
    let e = bad(r#"node_types = ["us:er"]
                       relations = [{ name = "f", src = "user", dst = "user" }]"#);
    assert_eq!(e.key, "schema.node_types[0]");
    let e = bad(r#"node_types = ["user"]
                       relations = []"#);
    assert_eq!(e.key, "schema.relations");
}

#[test]
fn an_event_time_far_ahead_of_its_record_is_a_bad_timestamp_but_past_times_are_valid() {
    let limits = DecodeLimits {
        max_ahead_ms: Some(3_600_000),
        ..LIMITS
    };
    let record = 1_732_190_400_000u64;
    let at = |ts: u64| {
        let s = format!(r#"{{"src":"user:1","rel":"follows","dst":"user:2","ts":{ts}}}"#);
        decode_event(&twitter(), &limits, Some(s.as_bytes()), record).map(|e| e.ts)
    };
    assert_eq!(
        at(874_724_710_000).unwrap(),
        874_724_710_000,
        "1997 is fine"
    );
    assert_eq!(at(record + 3_600_000).unwrap(), record + 3_600_000);
    let e = at(9_999_999_999_999).unwrap_err();
    assert_eq!(e.reason, InvalidReason::BadTimestamp);
    assert!(
        e.detail.contains("ingest.max_event_time_ahead_secs"),
        "{}",
        e.detail
    );
    let files = DecodeLimits {
        max_ahead_ms: None,
        ..LIMITS
    };
    let s = r#"{"src":"user:1","rel":"follows","dst":"user:2","ts":9999999999999}"#;
    assert!(decode_event(&twitter(), &files, Some(s.as_bytes()), 0).is_ok());
}

/// Property tests (proptest): every payload, arbitrary or a mutated valid event, decodes to
/// a valid event or an [`InvalidEvent`] with a reason, never a panic; valid events carry
/// exactly the fields written, and a decoded event re-encoded decodes to itself.
mod props {
    use super::*;
    use proptest::prelude::*;

    /// Cases per property; the three properties run about 2,000 cases each.
    const CASES: u32 = 2_000;
    const AHEAD_MS: u64 = 3_600_000;
    const PROPS: DecodeLimits = DecodeLimits {
        max_event_bytes: 1_024,
        max_id_bytes: 24,
        max_ahead_ms: Some(AHEAD_MS),
    };
    const RECORD_TS: u64 = 1_732_190_400_000;

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: CASES,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    /// `type:id` of a node key, as an event names it.
    fn node_name(s: &Schema, k: &NodeKey) -> String {
        format!("{}:{}", s.type_name(k.node_type), k.id)
    }

    /// The event as JSON, every optional field written.
    fn encode(s: &Schema, e: &Event) -> Vec<u8> {
        if e.op == EventOp::Erase {
            let mut j =
                serde_json::json!({"op": "erase", "node": node_name(s, &e.src), "ts": e.ts});
            if let Some(id) = &e.event_id {
                j["event_id"] = serde_json::json!(id);
            }
            return j.to_string().into_bytes();
        }
        let mut j = serde_json::json!({
            "src": node_name(s, &e.src),
            "rel": s.relation(e.rel).name,
            "dst": node_name(s, &e.dst),
            "ts": e.ts,
            // Exact: an f32 widened to f64 prints a decimal that parses back to it.
            "weight": f64::from(e.weight),
        });
        if let Some(id) = &e.event_id {
            j["event_id"] = serde_json::json!(id);
        }
        if e.op == EventOp::Delete {
            j["op"] = serde_json::json!("delete");
        }
        j.to_string().into_bytes()
    }

    /// What every decoder answer must satisfy: a valid event within the schema and the
    /// limits that re-encodes to itself, or a reason with a detail.
    fn check_answer(payload: Option<&[u8]>) -> Result<(), TestCaseError> {
        let s = twitter();
        match decode_event(&s, &PROPS, payload, RECORD_TS) {
            Ok(e) => {
                if e.op == EventOp::Erase {
                    prop_assert_eq!(&e.src, &e.dst);
                } else {
                    let rel = s.relation(e.rel);
                    prop_assert!(rel.src_types.contains(&e.src.node_type), "{e:?}");
                    prop_assert!(rel.dst_types.contains(&e.dst.node_type), "{e:?}");
                }
                for id in [&e.src.id, &e.dst.id] {
                    prop_assert!(!id.is_empty() && id.len() <= PROPS.max_id_bytes, "{e:?}");
                }
                prop_assert!(e.weight.is_finite() && e.weight >= 0.0, "{e:?}");
                prop_assert!(e.ts <= RECORD_TS + AHEAD_MS, "{e:?}");
                if let Some(id) = &e.event_id {
                    prop_assert!(!id.is_empty() && id.len() <= PROPS.max_id_bytes, "{e:?}");
                }
                let again = encode(&s, &e);
                if again.len() <= PROPS.max_event_bytes {
                    let back = decode_event(&s, &PROPS, Some(&again), RECORD_TS);
                    prop_assert_eq!(
                        back.as_ref(),
                        Ok(&e),
                        "re-encoded {}",
                        String::from_utf8_lossy(&again)
                    );
                }
            }
            Err(e) => {
                prop_assert_eq!(InvalidReason::parse(e.reason.as_str()), Some(e.reason));
                prop_assert!(!e.detail.is_empty(), "{e:?}");
                // Details go into DLQ headers: quoted values are truncated.
                prop_assert!(e.detail.len() < 600, "{} bytes: {e:?}", e.detail.len());
            }
        }
        Ok(())
    }

    /// A written `ts`: a whole number of ms, null, or something else.
    #[derive(Debug, Clone)]
    enum Ts {
        Absent,
        Null,
        Ms(u64),
        Other(serde_json::Value),
    }

    /// A written `weight`.
    #[derive(Debug, Clone)]
    enum Weight {
        Absent,
        Null,
        Number(f64),
        Other(serde_json::Value),
    }

    /// An event as written by a producer: valid types for its relation, any ids.
    #[derive(Debug, Clone)]
    struct Written {
        rel: RelId,
        src_type: TypeId,
        dst_type: TypeId,
        src_id: String,
        dst_id: String,
        ts: Ts,
        weight: Weight,
        event_id: Option<String>,
        /// An unknown field the decoder ignores.
        extra: Option<(String, serde_json::Value)>,
    }

    impl Written {
        fn json(&self, s: &Schema) -> serde_json::Value {
            let mut j = serde_json::json!({
                "src": format!("{}:{}", s.type_name(self.src_type), self.src_id),
                "rel": s.relation(self.rel).name,
                "dst": format!("{}:{}", s.type_name(self.dst_type), self.dst_id),
            });
            if let Some((k, v)) = &self.extra {
                j[k] = v.clone();
            }
            match &self.ts {
                Ts::Absent => {}
                Ts::Null => j["ts"] = serde_json::Value::Null,
                Ts::Ms(ms) => j["ts"] = serde_json::json!(ms),
                Ts::Other(v) => j["ts"] = v.clone(),
            }
            match &self.weight {
                Weight::Absent => {}
                Weight::Null => j["weight"] = serde_json::Value::Null,
                Weight::Number(w) => j["weight"] = serde_json::json!(w),
                Weight::Other(v) => j["weight"] = v.clone(),
            }
            if let Some(id) = &self.event_id {
                j["event_id"] = serde_json::json!(id);
            }
            j
        }

        /// The decoder's answer, from the contract: the first failing check in the
        /// documented order (ids, then ts, then weight, then event_id).
        fn expected(&self, s: &Schema, bytes: usize) -> Result<Event, InvalidReason> {
            use InvalidReason as R;
            if bytes > PROPS.max_event_bytes {
                return Err(R::TooLarge);
            }
            for id in [&self.src_id, &self.dst_id] {
                if id.is_empty() {
                    return Err(R::EmptyId);
                }
                if id.len() > PROPS.max_id_bytes {
                    return Err(R::IdTooLong);
                }
            }
            let ts = match &self.ts {
                Ts::Absent | Ts::Null => RECORD_TS,
                Ts::Ms(ms) if *ms <= RECORD_TS + AHEAD_MS => *ms,
                Ts::Ms(_) | Ts::Other(_) => return Err(R::BadTimestamp),
            };
            let weight = match &self.weight {
                Weight::Absent | Weight::Null => 1.0,
                Weight::Number(w) if !(*w as f32).is_finite() => return Err(R::NonFiniteWeight),
                Weight::Number(w) if (*w as f32) < 0.0 => return Err(R::NegativeWeight),
                Weight::Number(w) => *w as f32,
                Weight::Other(_) => return Err(R::WrongType),
            };
            if let Some(id) = &self.event_id {
                if id.is_empty() || id.len() > PROPS.max_id_bytes {
                    return Err(R::BadEventId);
                }
            }
            let _ = s;
            Ok(Event {
                op: Default::default(),
                src: NodeKey {
                    node_type: self.src_type,
                    id: self.src_id.clone(),
                },
                rel: self.rel,
                dst: NodeKey {
                    node_type: self.dst_type,
                    id: self.dst_id.clone(),
                },
                ts,
                weight,
                event_id: self.event_id.clone(),
            })
        }
    }

    /// Any JSON value, nested a few levels.
    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec(("\\PC{0,6}", inner), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    /// Ids: any characters (colons, slashes, quotes, controls, astral), sometimes empty or
    /// over `max_id_bytes`.
    fn id() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[a-z0-9]{1,12}",
            4 => "\\PC{1,8}",
            1 => "[\\x00-\\x1f\"\\\\:/ ]{1,8}",
            1 => Just(String::new()),
            1 => "\\PC{20,30}",
        ]
    }

    fn written() -> impl Strategy<Value = Written> {
        let s = twitter();
        let rels: Vec<(RelId, Vec<TypeId>, Vec<TypeId>)> = (0..s.relations().len())
            .map(|r| {
                let rel = s.relation(r as RelId);
                (r as RelId, rel.src_types.clone(), rel.dst_types.clone())
            })
            .collect();
        let ts = prop_oneof![
            Just(Ts::Absent),
            Just(Ts::Null),
            (0..=RECORD_TS + AHEAD_MS).prop_map(Ts::Ms),
            (RECORD_TS - 10..RECORD_TS + AHEAD_MS + 10).prop_map(Ts::Ms),
            any::<u64>().prop_map(Ts::Ms),
            json_value()
                .prop_filter("not a ts", |v| !v.is_u64() && !v.is_null())
                .prop_map(Ts::Other),
        ];
        let weight = prop_oneof![
            Just(Weight::Absent),
            Just(Weight::Null),
            (0.0f64..100.0).prop_map(Weight::Number),
            any::<f32>()
                .prop_filter("finite", |w| w.is_finite())
                .prop_map(|w| Weight::Number(f64::from(w))),
            any::<f64>()
                .prop_filter("finite", |w| w.is_finite())
                .prop_map(Weight::Number),
            json_value()
                .prop_filter("not a number", |v| !v.is_number() && !v.is_null())
                .prop_map(Weight::Other),
        ];
        let extra = prop::option::of((
            prop::sample::select(vec!["pad", "meta", "ts_ms", "weights", "Src", "src "]),
            json_value(),
        ))
        .prop_map(|e| e.map(|(k, v)| (k.to_owned(), v)));
        (
            prop::sample::select(rels),
            any::<prop::sample::Index>(),
            any::<prop::sample::Index>(),
            id(),
            id(),
            ts,
            weight,
            prop::option::of(id()),
            extra,
        )
            .prop_map(
                |((rel, srcs, dsts), si, di, src_id, dst_id, ts, weight, event_id, extra)| {
                    Written {
                        rel,
                        src_type: *si.get(&srcs),
                        dst_type: *di.get(&dsts),
                        src_id,
                        dst_id,
                        ts,
                        weight,
                        event_id,
                        extra,
                    }
                },
            )
    }

    /// One edit of a payload's bytes.
    #[derive(Debug, Clone)]
    enum Edit {
        Flip(prop::sample::Index, u8),
        Insert(prop::sample::Index, u8),
        Delete(prop::sample::Index, usize),
        Duplicate(prop::sample::Index, usize),
        Splice(prop::sample::Index, &'static str),
        Truncate(prop::sample::Index),
    }

    const FRAGMENTS: [&str; 16] = [
        "\"",
        "\\",
        "\\u",
        "\\ud800",
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "null",
        "-",
        "1e999",
        "\u{0}",
        "\"src\":",
        "\u{1F600}",
    ];

    fn edit() -> impl Strategy<Value = Edit> {
        let at = any::<prop::sample::Index>;
        prop_oneof![
            (at(), 0u8..8).prop_map(|(i, b)| Edit::Flip(i, b)),
            (at(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
            (at(), 1usize..8).prop_map(|(i, n)| Edit::Delete(i, n)),
            (at(), 1usize..16).prop_map(|(i, n)| Edit::Duplicate(i, n)),
            (at(), prop::sample::select(FRAGMENTS.to_vec())).prop_map(|(i, f)| Edit::Splice(i, f)),
            at().prop_map(Edit::Truncate),
        ]
    }

    fn apply(bytes: &mut Vec<u8>, edit: &Edit) {
        let pos = |i: &prop::sample::Index, len: usize| i.index(len + 1);
        match edit {
            Edit::Flip(i, bit) if !bytes.is_empty() => {
                let at = i.index(bytes.len());
                bytes[at] ^= 1 << bit;
            }
            Edit::Flip(..) => {}
            Edit::Insert(i, b) => bytes.insert(pos(i, bytes.len()), *b),
            Edit::Delete(i, n) => {
                let at = pos(i, bytes.len());
                bytes.drain(at..(at + n).min(bytes.len()));
            }
            Edit::Duplicate(i, n) => {
                let at = pos(i, bytes.len());
                let copy = bytes[at..(at + n).min(bytes.len())].to_vec();
                bytes.splice(at..at, copy);
            }
            Edit::Splice(i, f) => {
                let at = pos(i, bytes.len());
                bytes.splice(at..at, f.bytes());
            }
            Edit::Truncate(i) => bytes.truncate(pos(i, bytes.len())),
        }
    }

    proptest! {
        #![proptest_config(config())]

        /// Any bytes at all, and nothing (a tombstone).
        #[test]
        fn arbitrary_bytes_are_an_event_or_a_reason(
            payload in prop::option::weighted(
                0.98,
                prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..1_200),
                    "\\PC{0,64}".prop_map(String::into_bytes),
                    json_value().prop_map(|v| v.to_string().into_bytes()),
                ],
            ),
        ) {
            check_answer(payload.as_deref())?;
        }

        /// Events as a producer writes them, with any ids, times, weights and event ids:
        /// the answer is exactly what the contract says, and a valid one carries its fields.
        #[test]
        fn written_events_decode_to_their_fields_or_the_contracts_reason(w in written()) {
            let s = twitter();
            let bytes = w.json(&s).to_string().into_bytes();
            let got = decode_event(&s, &PROPS, Some(&bytes), RECORD_TS);
            let want = w.expected(&s, bytes.len());
            prop_assert_eq!(
                got.as_ref().map_err(|e| e.reason),
                want.as_ref().map_err(|r| *r),
                "payload {}",
                String::from_utf8_lossy(&bytes)
            );
            check_answer(Some(&bytes))?;
        }

        /// Valid events with their bytes edited (flipped bits, insertions, deletions,
        /// duplicated runs, JSON fragments spliced in, truncation).
        #[test]
        fn mutated_valid_events_are_an_event_or_a_reason(
            w in written(),
            edits in prop::collection::vec(edit(), 1..6),
        ) {
            let s = twitter();
            let mut bytes = w.json(&s).to_string().into_bytes();
            for e in &edits {
                apply(&mut bytes, e);
            }
            check_answer(Some(&bytes))?;
        }
    }
}

#[test]
fn op_is_add_by_default_delete_when_asked_and_anything_else_a_dead_letter() {
    let with = |op: &str| format!(r#"{{"src":"user:a","rel":"follows","dst":"user:b"{op}}}"#);
    assert_eq!(decode(&with("")).unwrap().op, EventOp::Add);
    assert_eq!(decode(&with(r#","op":null"#)).unwrap().op, EventOp::Add);
    assert_eq!(decode(&with(r#","op":"add""#)).unwrap().op, EventOp::Add);
    assert_eq!(
        decode(&with(r#","op":"delete""#)).unwrap().op,
        EventOp::Delete
    );
    for bad in [r#","op":"remove""#, r#","op":1"#, r#","op":"DELETE""#] {
        assert_eq!(reason(&with(bad)), InvalidReason::BadOp, "{bad}");
    }
}

#[test]
fn an_erasure_names_one_node_and_a_malformed_one_is_a_dead_letter() {
    let e = decode(r#"{"op":"erase","node":"user:a","ts":5,"event_id":"gdpr-1"}"#).unwrap();
    assert_eq!(
        (e.op, e.src.id.as_str(), e.ts, e.event_id.as_deref()),
        (EventOp::Erase, "a", 5, Some("gdpr-1"))
    );
    assert_eq!(e.dst, e.src);
    for bad in [
        r#"{"op":"erase"}"#,
        r#"{"op":"erase","node":null}"#,
        r#"{"op":"erase","src":"user:a"}"#,
        r#"{"op":"erase","node":"user:a","rel":"follows"}"#,
        r#"{"op":"erase","node":"user:a","dst":"user:b"}"#,
    ] {
        assert_eq!(reason(bad), InvalidReason::BadErase, "{bad}");
    }
    assert_eq!(
        reason(r#"{"op":"erase","node":"planet:a"}"#),
        InvalidReason::UnknownNodeType
    );
    assert_eq!(
        reason(r#"{"op":"erase","node":"user"}"#),
        InvalidReason::BadNodeRef
    );
    assert_eq!(
        reason(r#"{"op":"erase","node":"user:a","ts":-1}"#),
        InvalidReason::BadTimestamp
    );
}
