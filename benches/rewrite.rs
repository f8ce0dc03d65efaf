//! Rewriting a 1 MiB STAC search page, the largest body the proxy routinely rewrites.

use std::hint::black_box;

use aleph_proxy::rewrite::Rewriter;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::{json, Value};

const PUBLIC_BASE: &str = "http://127.0.0.1:8080";

/// A FeatureCollection shaped like an Aleph archive search answer: each feature has 5 links and 4
/// assets, of which the data assets point at the API and the previews at presigned S3 URLs.
fn stac_page(target_bytes: usize) -> Vec<u8> {
    let api = "https://api.satellogic.com";
    let stac = format!("{api}/archive/stac");
    let feature = |i: usize| -> Value {
        let id = format!(
            "20240315_101512_SN{:02}_QUICKVIEW_VISUAL_1_0_{i:06}",
            i % 40
        );
        let s3 = format!("s3://satellogic-production-eo-l1d/{id}");
        let presigned = |name: &str| {
            format!(
                "https://satellogic-production-eo-l1d.s3.amazonaws.com/{id}/{name}?X-Amz-Algorithm=AWS4-HMAC-SHA256\
                 &X-Amz-Credential=ASIAEXAMPLE%2F20240315%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20240315T101512Z\
                 &X-Amz-Expires=604800&X-Amz-SignedHeaders=host&X-Amz-Signature={:064x}",
                i * 7919
            )
        };
        let (lon, lat) = (
            -58.0 + (i % 97) as f64 * 0.013,
            -34.5 + (i % 89) as f64 * 0.011,
        );
        json!({
            "type": "Feature",
            "stac_version": "1.0.0",
            "stac_extensions": [
                "https://stac-extensions.github.io/eo/v1.0.0/schema.json",
                "https://stac-extensions.github.io/view/v1.0.0/schema.json"
            ],
            "id": id,
            "collection": "l1d",
            "geometry": {"type": "Polygon", "coordinates": [[
                [lon, lat], [lon + 0.0512, lat], [lon + 0.0512, lat + 0.0487],
                [lon, lat + 0.0487], [lon, lat]
            ]]},
            "bbox": [lon, lat, lon + 0.0512, lat + 0.0487],
            "properties": {
                "datetime": "2024-03-15T10:15:12.123456Z",
                "platform": format!("newsat{}", 20 + i % 20),
                "instruments": ["MSI"],
                "eo:cloud_cover": (i % 100) as f64 * 0.73,
                "view:off_nadir": 12.345678,
                "view:sun_elevation": 48.1234,
                "view:sun_azimuth": 31.9876,
                "gsd": 0.7,
                "satl:outcome_id": format!("{:08x}-0c4f-4b2e-9f5e-{:012x}", i, i * 31),
                "satl:product_name": "QUICKVIEW_VISUAL",
                "proj:epsg": 32721,
                "proj:shape": [4096, 4096],
                "created": "2024-03-15T12:00:00Z",
                "updated": "2024-03-15T12:00:00Z"
            },
            "links": [
                {"rel": "self", "type": "application/geo+json", "href": format!("{stac}/collections/l1d/items/{id}")},
                {"rel": "root", "type": "application/json", "href": format!("{stac}/")},
                {"rel": "parent", "type": "application/json", "href": format!("{stac}/collections/l1d")},
                {"rel": "collection", "type": "application/json", "href": format!("{stac}/collections/l1d")},
                {"rel": "license", "type": "text/html", "href": "https://satellogic.com/terms-of-use/"}
            ],
            "assets": {
                "visual": {"href": format!("{api}/assets/l1d/{id}/visual?s={s3}/visual.tif"), "type": "image/tiff; application=geotiff; profile=cloud-optimized", "roles": ["visual"], "title": "Visual RGB COG"},
                "analytic": {"href": format!("{api}/assets/l1d/{id}/analytic?s={s3}/analytic.tif"), "type": "image/tiff; application=geotiff; profile=cloud-optimized", "roles": ["data"], "title": "Analytic 4-band COG",
                             "eo:bands": [{"name": "red"}, {"name": "green"}, {"name": "blue"}, {"name": "nir"}]},
                "preview": {"href": presigned("preview.png"), "type": "image/png", "roles": ["overview"]},
                "thumbnail": {"href": presigned("thumbnail.png"), "type": "image/png", "roles": ["thumbnail"]}
            }
        })
    };
    let mut features = Vec::new();
    // Room for the page's own links and context, then as many features as fit.
    let mut size = 2048;
    loop {
        let f = feature(features.len());
        size += serde_json::to_vec(&f).unwrap().len() + 1;
        if size > target_bytes {
            break;
        }
        features.push(f);
    }
    let n = features.len();
    let page = json!({
        "type": "FeatureCollection",
        "features": features,
        "links": [
            {"rel": "self", "type": "application/geo+json", "href": format!("{stac}/search?collections=l1d&limit={n}")},
            {"rel": "root", "type": "application/json", "href": format!("{stac}/")},
            {"rel": "next", "type": "application/geo+json", "method": "POST", "href": format!("{stac}/search"),
             "body": {"collections": ["l1d"], "next": "MjAyNC0wMy0xNVQxMDoxNToxMi4xMjM0NTZa"}}
        ],
        "context": {"returned": n, "limit": n, "matched": 12345}
    });
    // Compact, as the API serves it: the most links per byte.
    serde_json::to_vec(&page).unwrap()
}

fn bench(c: &mut Criterion) {
    let rw = Rewriter::new(&url::Url::parse("https://api.satellogic.com").unwrap());
    let page = stac_page(1 << 20);
    let features = serde_json::from_slice::<Value>(&page).unwrap()["features"]
        .as_array()
        .unwrap()
        .len();
    let (_, count) = rw
        .rewrite_json(&page, PUBLIC_BASE)
        .expect("the page has upstream links");
    eprintln!(
        "page: {} bytes, {features} features, {count} links rewritten",
        page.len()
    );

    let mut g = c.benchmark_group("rewrite_json");
    g.throughput(Throughput::Bytes(page.len() as u64));
    g.bench_function("stac_search_page_1MiB", |b| {
        b.iter(|| rw.rewrite_json(black_box(&page), PUBLIC_BASE))
    });
    // The common no-op case: a page without upstream links is only validated, never copied.
    let other = Rewriter::new(&url::Url::parse("https://upstream.invalid").unwrap());
    g.bench_function("stac_search_page_1MiB_nothing_to_rewrite", |b| {
        b.iter(|| other.rewrite_json(black_box(&page), PUBLIC_BASE))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
