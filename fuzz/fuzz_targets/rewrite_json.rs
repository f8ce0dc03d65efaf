//! Fuzzes the JSON link rewriter: whatever the bytes, it must not panic, and whatever it returns must
//! be the same document with exactly the upstream URLs rewritten.
#![no_main]

use std::sync::OnceLock;

use aleph_proxy::rewrite::Rewriter;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const PUBLIC_BASE: &str = "http://127.0.0.1:8080/p";

fn rewriter() -> &'static Rewriter {
    static REWRITER: OnceLock<Rewriter> = OnceLock::new();
    REWRITER.get_or_init(|| {
        Rewriter::new(&url::Url::parse("https://api.satellogic.com").expect("valid upstream"))
    })
}

/// The input with every string value (never a key) passed through `rewrite_url`: the oracle.
fn expected(v: &Value, rw: &Rewriter) -> Value {
    match v {
        Value::String(s) => {
            Value::String(rw.rewrite_url(s, PUBLIC_BASE).unwrap_or_else(|| s.clone()))
        }
        Value::Array(a) => Value::Array(a.iter().map(|v| expected(v, rw)).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (k.clone(), expected(v, rw)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fuzz_target!(|data: &[u8]| {
    let rw = rewriter();
    let Some((out, count)) = rw.rewrite_json(data, PUBLIC_BASE) else {
        return;
    };
    assert!(count > 0, "Some with nothing rewritten");
    match serde_json::from_slice::<Value>(data) {
        Ok(input) => {
            let output: Value =
                serde_json::from_slice(&out).expect("rewritten body must parse as JSON");
            assert_eq!(output, expected(&input, rw));
        }
        // serde_json refuses some valid JSON (numbers beyond f64); anything else it refuses must
        // have been refused by the rewriter too.
        Err(e) => assert!(
            e.to_string().starts_with("number out of range"),
            "accepted invalid JSON: {e}"
        ),
    }
});
