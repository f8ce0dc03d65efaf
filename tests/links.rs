//! Link rewriting, per-listener contracts, range/conditional pass-through and CORS, through the
//! real proxy and the mock API over loopback sockets.

mod support;

use aleph_proxy::mock::{MockOptions, MOCK_CONTRACT, MOCK_CONTRACT_2};
use support::{client, get_json, Harness};

const ITEM: &str = "20240101_120000_SN00_L1D_0000";

/// GET `path` through the proxy with this `Accept-Encoding`.
async fn get_accepting(h: &Harness, path: &str, codings: &str) -> reqwest::Response {
    client()
        .get(h.url(path))
        .header("accept-encoding", codings)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn drf_next_and_previous_point_back_at_the_proxy() {
    let h = Harness::start("").await;
    let v: serde_json::Value = get_json(&h.url("/tasking/tasks/?limit=100&offset=100")).await;
    assert_eq!(v["next"], h.url("/tasking/tasks/?limit=100&offset=200"));
    assert_eq!(v["previous"], h.url("/tasking/tasks/?limit=100&offset=0"));
}

#[tokio::test]
async fn relative_links_and_presigned_urls_are_untouched() {
    let h = Harness::start("").await;
    let v: serde_json::Value = get_json(&h.url("/v2/orders/?limit=25")).await;
    assert_eq!(v["next"], "/v2/orders?offset=25&limit=25");

    let page: serde_json::Value = get_json(&h.url("/archive/stac/search?limit=2")).await;
    let item = &page["features"][0];
    let thumb = item["assets"]["thumbnail"]["href"].as_str().unwrap();
    assert!(thumb.starts_with(&h.mock.object_store_url), "{thumb}");
    assert!(thumb.contains("X-Amz-Signature=deadbeef0000"));
    let data = item["assets"]["analytic"]["href"].as_str().unwrap();
    // The data asset is ours now, and its embedded s3:// query parameter is unchanged.
    assert_eq!(
        data,
        h.url(&format!(
            "/assets/l1d/{ITEM}/analytic?s=s3://satellogic-archive/{ITEM}/analytic.tif"
        ))
    );
    let next = page["links"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["rel"] == "next")
        .unwrap();
    assert!(next["href"]
        .as_str()
        .unwrap()
        .starts_with(&h.url("/archive/stac/search?")));
}

#[tokio::test]
async fn post_search_next_keeps_its_body_and_gets_the_proxy_href() {
    let h = Harness::start("").await;
    // The body goes back to the API as it was issued, even where it holds an upstream URL.
    let upstream_item = format!(
        "{}/archive/stac/collections/l1d/items/{ITEM}",
        h.mock.api_url
    );
    let req = serde_json::json!({"collections": ["l1d"], "limit": 3, "filter-lang": "cql2-json",
        "filter": {"op": "and", "args": [
            {"op": "<", "args": [{"property": "eo:cloud_cover"}, 50]},
            {"op": "<>", "args": [{"property": "self"}, upstream_item]}]}});
    let page: serde_json::Value = client()
        .post(h.url("/archive/stac/search"))
        .json(&req)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let next = page["links"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["rel"] == "next")
        .unwrap();
    assert_eq!(next["href"], h.url("/archive/stac/search"));
    assert_eq!(next["method"], "POST");
    assert_eq!(next["body"]["next"], "cursor-3");
    assert_eq!(next["body"]["filter"], req["filter"]);
}

#[tokio::test]
async fn gzip_bodies_are_decoded_rewritten_and_sent_with_a_correct_length() {
    let h = Harness::start("").await;
    let r = get_accepting(&h, "/tasking/tasks/?limit=5", "gzip").await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("content-encoding").is_none());
    let len: usize = r.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = r.bytes().await.unwrap();
    assert_eq!(body.len(), len);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["next"], h.url("/tasking/tasks/?limit=5&offset=5"));
    // The upstream did answer with gzip.
    let rec = h.mock.state.last_request().unwrap();
    assert_eq!(rec.headers["accept-encoding"], "gzip");
}

#[tokio::test]
async fn codings_the_proxy_cannot_read_are_not_asked_of_the_upstream() {
    // curl --compressed and current browsers offer zstd; an upstream answering in it would send
    // links the proxy cannot rewrite.
    let h = Harness::start("").await;
    for (sent, forwarded) in [
        ("deflate, gzip, br, zstd", "deflate, gzip, br"),
        ("zstd", "identity"),
        ("gzip;q=0.5, br", "gzip;q=0.5, br"),
    ] {
        let r = get_accepting(&h, "/tasking/tasks/?limit=5", sent).await;
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(v["next"], h.url("/tasking/tasks/?limit=5&offset=5"));
        let rec = h.mock.state.last_request().unwrap();
        assert_eq!(rec.headers["accept-encoding"], forwarded, "{sent}");
    }
}

#[tokio::test]
async fn a_head_of_json_does_not_promise_the_upstream_length() {
    // The GET comes back rewritten, so the upstream's length (and byte ranges) would be wrong:
    // GDAL takes a HEAD's Content-Length as the size of what it then reads.
    let h = Harness::start("").await;
    let url = h.url("/tasking/tasks/?limit=5");
    let upstream = reqwest::Client::new()
        .head(format!("{}/tasking/tasks/?limit=5", h.mock.api_url))
        .send()
        .await
        .unwrap();
    assert!(upstream.headers().get("content-length").is_some());
    let head = client().head(&url).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert!(head.headers().get("content-length").is_none(), "{head:?}");
    assert!(head.headers().get("accept-ranges").is_none());
    let get = client().get(&url).send().await.unwrap();
    let len: usize = get.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(get.bytes().await.unwrap().len(), len);
}

#[tokio::test]
async fn a_head_and_its_get_agree_on_the_coding_with_or_without_links_to_rewrite() {
    let h = Harness::start("").await;
    // The task list has links; the product list has none. Both come gzip-compressed.
    for path in ["/tasking/tasks/?limit=5", "/tasking/products/"] {
        let head = client()
            .head(h.url(path))
            .header("accept-encoding", "gzip")
            .send()
            .await
            .unwrap();
        assert_eq!(head.status(), 200);
        assert!(head.headers().get("content-encoding").is_none(), "{path}");
        let get = get_accepting(&h, path, "gzip").await;
        assert_eq!(
            h.mock.state.last_request().unwrap().headers["accept-encoding"],
            "gzip"
        );
        assert!(get.headers().get("content-encoding").is_none(), "{path}");
        assert_eq!(head.headers()["etag"], get.headers()["etag"], "{path}");
        let len: usize = get.headers()["content-length"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let body = get.bytes().await.unwrap();
        assert_eq!(body.len(), len);
        serde_json::from_slice::<serde_json::Value>(&body).expect("identity JSON");
    }
}

#[tokio::test]
async fn a_rewritten_page_revalidates_with_the_tag_it_was_given() {
    // A browser map or an HTTP cache keeps the page with its ETag and asks again with
    // If-None-Match: the 304 must carry the same tag, or the cache cannot refresh its entry.
    let h = Harness::start("").await;
    for codings in ["identity", "gzip"] {
        let first = get_accepting(&h, "/tasking/tasks/?limit=5", codings).await;
        assert_eq!(first.status(), 200);
        let tag = first.headers()["etag"].clone();
        assert!(
            tag.to_str().unwrap().starts_with("W/"),
            "{codings}: {tag:?}"
        );
        let again = client()
            .get(h.url("/tasking/tasks/?limit=5"))
            .header("accept-encoding", codings)
            .header("if-none-match", tag.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304, "{codings}");
        assert_eq!(again.headers()["etag"], tag, "{codings}");
    }
}

#[tokio::test]
async fn location_and_link_headers_are_rewritten() {
    let h = Harness::start("").await;
    let r = client()
        .get(h.url("/tasking/tasks/42"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 301);
    assert_eq!(
        r.headers()["location"],
        h.url("/tasking/tasks/42/").as_str()
    );
    assert_eq!(
        r.headers()["link"],
        format!("<{}>; rel=\"canonical\"", h.url("/tasking/tasks/42/")).as_str()
    );
}

#[tokio::test]
async fn public_url_and_the_off_switch() {
    let h = Harness::start("public_url = \"https://proxy.example.org/aleph\"").await;
    let v: serde_json::Value = get_json(&h.url("/tasking/tasks/?limit=100")).await;
    assert_eq!(
        v["next"],
        "https://proxy.example.org/aleph/tasking/tasks/?limit=100&offset=100"
    );
    // A relative link resolves against the URL the client used, which has the prefix in front.
    let v: serde_json::Value = get_json(&h.url("/v2/orders/?limit=25")).await;
    assert_eq!(v["next"], "/aleph/v2/orders?offset=25&limit=25");

    let h = Harness::start("[rewrite]\nenabled = false").await;
    let v: serde_json::Value = get_json(&h.url("/tasking/tasks/?limit=100")).await;
    assert_eq!(
        v["next"],
        format!("{}/tasking/tasks/?limit=100&offset=100", h.mock.api_url)
    );
}

/// The proxy's `aleph_proxy_links_not_rewritten_total{reason="too_large"}` (0 before the first).
async fn too_large(h: &Harness) -> u64 {
    h.metrics()
        .await
        .lines()
        .find_map(|l| {
            l.strip_prefix("aleph_proxy_links_not_rewritten_total{reason=\"too_large\"} ")
        })
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn bodies_over_the_cap_stream_through_unchanged() {
    // Every test of this binary shares one metrics registry, and only this one passes the cap.
    let h = Harness::start("[rewrite]\nmax_body_bytes = 4000").await;
    let before = too_large(&h).await;
    let r = client()
        .get(h.url("/archive/stac/search?limit=5"))
        .send()
        .await
        .unwrap();
    let body = r.text().await.unwrap();
    assert!(body.len() > 4000);
    assert!(body.contains(&format!("{}/archive/stac/", h.mock.api_url)));
    serde_json::from_str::<serde_json::Value>(&body).unwrap();
    assert_eq!(too_large(&h).await, before + 1);

    // Compressed under the cap, past it once decoded: passed through as sent, and counted.
    let r = get_accepting(&h, "/archive/stac/search?limit=20", "gzip").await;
    assert_eq!(r.headers()["content-encoding"], "gzip");
    let gz = r.bytes().await.unwrap();
    assert!(gz.len() < 4000, "{} bytes compressed", gz.len());
    let mut body = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut body).unwrap();
    assert!(body.len() > 4000);
    assert!(body.contains(&format!("{}/archive/stac/", h.mock.api_url)));
    assert_eq!(too_large(&h).await, before + 2);
}

#[tokio::test]
async fn range_head_and_conditional_requests_pass_through() {
    let h = Harness::start_with(
        MockOptions {
            asset_size: 1 << 20,
            ..MockOptions::default()
        },
        "",
    )
    .await;
    let c = client();
    let url = h.url(&format!("/assets/l1d/{ITEM}/analytic"));
    let r = c
        .get(&url)
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 100-199/1048576");
    let etag = r.headers()["etag"].clone();
    assert_eq!(r.bytes().await.unwrap().len(), 100);

    let r = c.head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "1048576");
    assert_eq!(r.headers()["accept-ranges"], "bytes");

    let r = c
        .get(&url)
        .header("if-none-match", etag.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    // An asset's tag stays strong (If-Range needs a strong one).
    assert_eq!(r.headers()["etag"], etag);
    let rec = h.mock.state.last_request().unwrap();
    assert_eq!(rec.headers["if-none-match"], etag);
    let r = c
        .get(&url)
        .header("if-modified-since", "Mon, 01 Jan 2024 12:00:00 GMT")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
}

#[tokio::test]
async fn each_listener_uses_its_own_contract_and_they_share_one_token() {
    let h = Harness::start_with(
        support::two_contracts(),
        &format!(
            r#"
            [[listeners]]
            listen = "127.0.0.1:0"
            contract = "{MOCK_CONTRACT}"
            [[listeners]]
            listen = "127.0.0.1:0"
            contract = "{MOCK_CONTRACT_2}"
            "#
        ),
    )
    .await;
    let c = client();
    for (addr, want) in [
        (h.proxies[1], MOCK_CONTRACT),
        (h.proxies[2], MOCK_CONTRACT_2),
    ] {
        let r = c
            .get(format!("http://{addr}/archive/stac/search?limit=1"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        // Links point back at the listener that was used, so the contract sticks.
        let href = v["features"][0]["links"][0]["href"].as_str().unwrap();
        assert!(href.starts_with(&format!("http://{addr}/")), "{href}");
        let rec = h.mock.state.last_request_to("/archive/").unwrap();
        assert_eq!(rec.headers["x-satellogic-contract-id"], want);
    }
    assert_eq!(h.token_fetches(), 1);
}

#[tokio::test]
async fn public_url_belongs_to_the_main_listener_and_each_listener_may_have_its_own() {
    // One public URL for every port would send a listener's clients to another contract.
    let h = Harness::start_with(
        support::two_contracts(),
        &format!(
            r#"
            public_url = "https://gis.example.org/aleph"
            [contract]
            default = "{MOCK_CONTRACT}"
            [[listeners]]
            listen = "127.0.0.1:0"
            contract = "{MOCK_CONTRACT}"
            [[listeners]]
            listen = "127.0.0.1:0"
            contract = "{MOCK_CONTRACT_2}"
            public_url = "https://gis.example.org/aleph-b/"
            "#
        ),
    )
    .await;
    for (addr, base) in [
        (h.proxies[0], "https://gis.example.org/aleph".to_string()),
        (h.proxies[1], format!("http://{}", h.proxies[1])),
        (h.proxies[2], "https://gis.example.org/aleph-b".to_string()),
    ] {
        let v: serde_json::Value =
            get_json(&format!("http://{addr}/tasking/tasks/?limit=100")).await;
        assert_eq!(
            v["next"],
            format!("{base}/tasking/tasks/?limit=100&offset=100"),
            "{addr}"
        );
    }
}

#[tokio::test]
async fn cors_is_off_by_default_and_answers_preflights_when_enabled() {
    let h = Harness::start("").await;
    let r = client()
        .get(h.url("/tasking/products/"))
        .header("origin", "http://maps.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());

    let h = Harness::start("[cors]\nallowed_origins = [\"http://maps.example\"]").await;
    let r = client()
        .request(reqwest::Method::OPTIONS, h.url("/archive/stac/search"))
        .header("origin", "http://maps.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://maps.example"
    );
    // (Contract discovery may reach the upstream meanwhile: count the preflight's method only.)
    assert!(
        !h.mock
            .state
            .recorded()
            .iter()
            .any(|r| r.method == http::Method::OPTIONS),
        "preflight reached the upstream"
    );
    let r = client()
        .get(h.url("/tasking/products/"))
        .header("origin", "http://maps.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://maps.example"
    );
    let r = client()
        .get(h.url("/tasking/products/"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
}
