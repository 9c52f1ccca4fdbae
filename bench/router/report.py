#!/usr/bin/env python3
"""Prints the benchmark results (results.jsonl from run.sh) as a Markdown table."""
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
sizes = sorted({r["tenants"] for r in rows if "tenants" in r})
print("| tenants | wrk rps direct | wrk rps nginx | wrk rps router | router/nginx | rate | added p50 nginx | added p50 router | added p99 nginx | added p99 router | router RSS MB (loaded / after traffic) | table load s |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for n in sizes:
    g = lambda m, t=None: [r for r in rows if r.get("tenants") == n and r["metric"] == m and (t is None or r.get("target") == t)]
    rps = {t: (g("wrk_rps", t) or [{"value": 0}])[0]["value"] for t in ("direct", "nginx", "router")}
    rss = (g("router_rss_mb") or [{"value": "?"}])[0]["value"]
    rss_after = (g("router_rss_after_traffic_mb") or [{"value": "?"}])[0]["value"]
    rss = f"{rss} / {rss_after}"
    load = (g("router_table_load_s") or [{"value": "?"}])[0]["value"]
    fr = g("fixed_rate")
    for rate in sorted({r["result"]["rate"] for r in fr}):
        res = {r["target"]: r["result"] for r in fr if r["result"]["rate"] == rate}
        d = res["direct"]
        add = lambda t, q: round(res[t][q] - d[q], 3)
        ratio = round(float(rps["router"]) / float(rps["nginx"]), 2) if float(rps["nginx"]) else 0
        print(f"| {n} | {rps['direct']} | {rps['nginx']} | {rps['router']} | {ratio} | {int(rate)} | "
              f"{add('nginx','p50_ms')} | {add('router','p50_ms')} | {add('nginx','p99_ms')} | {add('router','p99_ms')} | {rss} | {load} |")
for r in rows:
    if r["metric"] == "propagation_ms":
        print(f"\nRoute-update propagation over {r['updates']} updates: p50 {r['p50']} ms, p99 {r['p99']} ms, max {r['max']} ms")
