"""Parses a server's /metrics with the official Python client's parser (a
page it cannot parse fails) and checks that the names every dashboard and
alert relies on are there, with samples: a name counts only if at least one
sample of it was exposed (a HELP/TYPE header alone is a family with no
series, e.g. a per-replica gauge with no replica connected).

Usage: metrics.py URL [NAME ...]; prints one `ok:` line per name.
"""

import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def main() -> None:
    url, names = sys.argv[1], sys.argv[2:]
    with urllib.request.urlopen(url, timeout=5) as response:
        content_type = response.headers.get("Content-Type", "")
        assert content_type.startswith("text/plain"), content_type
        text = response.read().decode()
    present = set()
    for family in text_string_to_metric_families(text):
        if not family.samples:
            continue
        # The parser names a counter family without its `_total`, and a
        # histogram by its base name; the samples keep the full names.
        present.add(family.name)
        present.update(sample.name for sample in family.samples)
        if family.type == "counter":
            present.add(family.name + "_total")
    missing = [name for name in names if name not in present]
    if missing:
        print(text)
        sys.exit(f"missing (or without a sample) from {url}: {', '.join(missing)}")
    for name in names:
        print(f"ok: {name}")


if __name__ == "__main__":
    main()
