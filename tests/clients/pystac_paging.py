"""pystac-client through aleph-proxy, with no credentials of its own.

Usage: pystac_paging.py PROXY_BASE OBJECT_STORE_BASE EXPECTED_ITEMS
Opens the STAC landing page, pages GET and POST searches to the end, and checks that data asset
hrefs point at the proxy and presigned thumbnails at the object store, untouched.
"""
import sys

from pystac_client import Client

proxy, store, expected = sys.argv[1], sys.argv[2], int(sys.argv[3])

catalog = Client.open(f"{proxy}/archive/stac/")
assert catalog.get_self_href().startswith(proxy), catalog.get_self_href()

for method in ("GET", "POST"):
    search = catalog.search(collections=["l1d"], limit=5, method=method)
    items = list(search.items())
    ids = [i.id for i in items]
    assert len(items) == expected, f"{method}: {len(items)} items, want {expected}"
    assert len(set(ids)) == expected, f"{method}: duplicate items"
    for item in items:
        for name in ("analytic", "visual"):
            href = item.assets[name].href
            assert href.startswith(proxy + "/assets/"), f"{method} {name}: {href}"
        thumb = item.assets["thumbnail"].href
        assert thumb.startswith(store), f"thumbnail rewritten: {thumb}"
        assert "X-Amz-Signature=" in thumb
        assert item.get_self_href().startswith(proxy), item.get_self_href()
    pages = -(-expected // 5)
    print(f"pystac-client {method} search: {len(items)} items over {pages} pages through {proxy}")

print("pystac-client OK")
