"""Parses Prometheus text from stdin with prometheus_client's own parser (a parser krun did
not write) and prints every sample as one JSON list: [{"name", "labels", "value"}]."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

samples = [
    {"name": s.name, "labels": s.labels, "value": s.value}
    for family in text_string_to_metric_families(sys.stdin.read())
    for s in family.samples
]
print(json.dumps(samples))
