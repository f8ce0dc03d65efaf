//! Real clients that no one here wrote, through the proxy: curl, pystac-client, GDAL. Each test
//! skips (saying so) when its tool is missing, unless ALEPH_REQUIRE_CLIENTS=1 (set by .ci/run,
//! which installs them), where a missing tool fails the test.

mod support;

use std::path::Path;
use std::process::Command;

use aleph_proxy::mock::MockOptions;
use support::{get_json, Harness};

fn have(tool: &str, probe: &[&str]) -> bool {
    let ok = Command::new(tool)
        .args(probe)
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("ALEPH_REQUIRE_CLIENTS").as_deref() != Ok("1"),
            "{tool} is required (ALEPH_REQUIRE_CLIENTS=1) but not runnable"
        );
        eprintln!("SKIPPED: {tool} is not installed");
    }
    ok
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "{cmd:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pystac_client_pages_get_and_post_searches_without_credentials() {
    if !have("python3", &["-c", "import pystac_client"]) {
        return;
    }
    let opts = MockOptions {
        stac_items: 23,
        ..MockOptions::default()
    };
    let h = Harness::start_with(opts, "").await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/pystac_paging.py");
    let base = format!("http://{}", h.proxy);
    let store = h.mock.object_store_url.clone();
    let out = tokio::task::spawn_blocking(move || {
        run(Command::new("python3").args([script.to_str().unwrap(), &base, &store, "23"]))
    })
    .await
    .unwrap();
    assert!(out.contains("pystac-client OK"), "{out}");
    // pystac-client sent no credential of its own; every upstream request carried the proxy's.
    for r in h.mock.state.recorded() {
        assert!(r.headers["authorizationtoken"]
            .to_str()
            .unwrap()
            .starts_with("Bearer mock-token-"));
    }
    // It never went around the proxy: the object store saw nothing (thumbnails were not fetched).
    assert!(h.mock.state.object_store.lock().unwrap().is_empty());
}

/// Builds a small Cloud-Optimized GeoTIFF with GDAL itself.
fn make_cog(dir: &Path) -> std::path::PathBuf {
    let raw = dir.join("raw.tif");
    let cog = dir.join("cog.tif");
    run(Command::new("gdal_create").args([
        "-of",
        "GTiff",
        "-outsize",
        "1024",
        "1024",
        "-bands",
        "3",
        "-ot",
        "Byte",
        "-burn",
        "40",
        "-burn",
        "90",
        "-burn",
        "140",
        "-a_srs",
        "EPSG:4326",
        "-a_ullr",
        "-58.4",
        "-34.5",
        "-58.3",
        "-34.6",
        raw.to_str().unwrap(),
    ]));
    run(Command::new("gdal_translate").args([
        "-of",
        "COG",
        // Uncompressed: the file is large enough that GDAL reads it by ranges.
        "-co",
        "COMPRESS=NONE",
        "-co",
        "BLOCKSIZE=256",
        raw.to_str().unwrap(),
        cog.to_str().unwrap(),
    ]));
    cog
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdal_reads_a_cog_window_through_a_rewritten_asset_href() {
    if !have("gdalinfo", &["--version"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cog = make_cog(dir.path());
    let cog_len = std::fs::metadata(&cog).unwrap().len();
    let h = Harness::start_with(
        MockOptions {
            asset_file: Some(cog),
            ..MockOptions::default()
        },
        "",
    )
    .await;
    // The asset href as a client finds it: in a STAC item, rewritten to the proxy.
    let item: serde_json::Value = get_json(&h.url("/archive/stac/search?limit=1")).await;
    let href = item["features"][0]["assets"]["visual"]["href"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(href.starts_with(&h.url("/assets/")), "{href}");
    let vsi = format!("/vsicurl/{href}");
    let out_tif = dir.path().join("window.tif");
    let out_path = out_tif.to_str().unwrap().to_string();
    let (info, _) = tokio::task::spawn_blocking(move || {
        let info = run(Command::new("gdalinfo")
            .arg(&vsi)
            .env("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")
            .env("GDAL_HTTP_MAX_RETRY", "0"));
        let tr = run(Command::new("gdal_translate")
            .args(["-srcwin", "256", "256", "128", "128", &vsi, &out_path])
            .env("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR"));
        (info, tr)
    })
    .await
    .unwrap();
    assert!(info.contains("Size is 1024, 1024"), "{info}");
    assert!(
        info.contains("LAYOUT=COG") || info.contains("Band 3"),
        "{info}"
    );
    let window = run(Command::new("gdalinfo").args(["-stats", out_tif.to_str().unwrap()]));
    assert!(window.contains("Size is 128, 128"), "{window}");
    assert!(
        window.contains("Minimum=90.000") || window.contains("STATISTICS_MEAN=90"),
        "{window}"
    );
    // GDAL used range requests (206) and never downloaded the whole file at once.
    let ranged = h
        .mock
        .state
        .recorded()
        .iter()
        .filter(|r| r.uri.path().starts_with("/assets/") && r.headers.contains_key("range"))
        .count();
    assert!(ranged >= 2, "GDAL made {ranged} range requests");
    assert!(cog_len > 0);
}

/// The mock's own asset (the demo's), no file given: GDAL reads it as a georeferenced GeoTIFF
/// through the proxy, by ranges, as the README's GDAL commands do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdal_reads_the_mocks_own_asset_as_the_demo_serves_it() {
    if !have("gdalinfo", &["--version"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start_with(MockOptions::default(), "").await;
    let item: serde_json::Value = get_json(&h.url("/archive/stac/search?limit=1")).await;
    let href = item["features"][0]["assets"]["analytic"]["href"]
        .as_str()
        .unwrap()
        .to_string();
    let vsi = format!("/vsicurl/{href}");
    let out_tif = dir.path().join("window.tif");
    let out_path = out_tif.to_str().unwrap().to_string();
    let info = tokio::task::spawn_blocking(move || {
        let info = run(Command::new("gdalinfo")
            .arg(&vsi)
            .env("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")
            .env("GDAL_HTTP_MAX_RETRY", "0"));
        run(Command::new("gdal_translate")
            .args(["-srcwin", "512", "512", "100", "100", &vsi, &out_path])
            .env("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR"));
        info
    })
    .await
    .unwrap();
    assert!(info.contains("Size is 1792, 1792"), "{info}");
    assert!(info.contains("ID[\"EPSG\",4326]"), "{info}");
    assert!(info.contains("Block=256x256"), "{info}");
    let window = run(Command::new("gdalinfo").args(["-stats", out_tif.to_str().unwrap()]));
    assert!(window.contains("Size is 100, 100"), "{window}");
    let ranged = h
        .mock
        .state
        .recorded()
        .iter()
        .filter(|r| r.uri.path().starts_with("/assets/") && r.headers.contains_key("range"))
        .count();
    assert!(ranged >= 2, "GDAL made {ranged} range requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_follows_drf_next_links_to_the_end() {
    if !have("curl", &["--version"]) {
        return;
    }
    let h = Harness::start("").await;
    let mut url = h.url("/tasking/tasks/?limit=40");
    let mut seen = 0;
    let mut pages = 0;
    loop {
        let u = url.clone();
        let body = tokio::task::spawn_blocking(move || run(Command::new("curl").args(["-sf", &u])))
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        seen += v["results"].as_array().unwrap().len();
        pages += 1;
        match v["next"].as_str() {
            Some(next) => {
                assert!(next.starts_with(&h.url("/tasking/tasks/")), "{next}");
                url = next.to_string();
            }
            None => break,
        }
    }
    assert_eq!(seen, 250);
    assert_eq!(pages, 7);
}
