//! Configuration parsing on arbitrary bytes: a TOML file through figment into a validated
//! `Config`. It must return a Config or a list of problems, never panic, and never echo a secret.
#![no_main]

use aleph_proxy::config::{from_figment, Config};
use figment::providers::{Format, Toml};
use figment::Figment;
use libfuzzer_sys::fuzz_target;

/// Planted in every input that parses far enough to hold it; must never be shown.
const SECRET: &str = "fuzz-secret-4f1c7d2a9b";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Keys that name files make the parser read them; a fuzzer that finds /dev/zero would hang
    // on it. Those keys are covered by the tests instead.
    // The secret itself is skipped too: under another key it may rightly be quoted back.
    if ["file", "cache", "/dev", "/proc", "\\u", SECRET]
        .iter()
        .any(|k| text.contains(k))
    {
        return;
    }
    check(&Figment::from(Toml::string(text)));
    // The same text after a client secret, quoted (valid) and not (a syntax error): whatever
    // goes wrong later must not quote it back.
    for planted in [
        format!("[auth]\nclient_secret = \"{SECRET}\"\n{text}"),
        format!("[auth]\nclient_secret = {SECRET}\n{text}"),
    ] {
        check(&Figment::from(Toml::string(&planted)));
    }
});

fn check(fig: &Figment) {
    match from_figment(fig) {
        Ok(c) => invariants(&c),
        Err(e) => assert!(!e.to_string().contains(SECRET), "{e}"),
    }
}

fn invariants(c: &Config) {
    assert!(!c.listeners.is_empty());
    assert!(c
        .listeners
        .iter()
        .all(|l| l.credential < c.credentials.len()));
    assert!(!format!("{c:?}").contains(SECRET));
}
